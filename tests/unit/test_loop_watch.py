"""The loop's timeline from watched changes, and the demo's line for each kind of change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from driftloop.drift.store import DriftRun
from driftloop.orchestration.airflow import DagRun
from driftloop.orchestration.ledger import LedgerEntry, TriggerState
from driftloop_tools.demo.cli import LoopTally, describe
from driftloop_tools.demo.loop_watch import (
    DagRunChanged,
    DriftAnnounced,
    LoopChange,
    LoopEvent,
    LoopTimeline,
    ModelDecided,
    ServingChanged,
    TriggerRecorded,
    WindowChecked,
)
from schemas.events import (
    ChallengerShadowed,
    DriftDetected,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def at(seconds: float, change: LoopChange) -> LoopEvent:
    return LoopEvent(change, seconds, T0 + timedelta(seconds=seconds))


def window(version: int, end_second: float, outcome: str) -> WindowChecked:
    return WindowChecked(
        DriftRun(
            model_name="bikeshare",
            model_version=version,
            window_start=T0 + timedelta(seconds=end_second - 4),
            window_end=T0 + timedelta(seconds=end_second),
            outcome=outcome,
            window_rows=168,
            labelled_rows=160,
            drift_share=0.6 if outcome == "drifted" else 0.0,
            drifted_features=("temp", "atemp") if outcome == "drifted" else (),
            quality={"rmse": 80.0},
            refusal_reason=None,
            report_uri="s3://bucket/r.json",
            episode_id=None,
            drift_holds=False,
            check_seconds=1.0,
            checked_at=T0 + timedelta(seconds=end_second + 1),
        )
    )


def drift(version: int) -> DriftAnnounced:
    return DriftAnnounced(
        DriftDetected(
            model_name="bikeshare",
            model_version=version,
            episode_id="bikeshare-v1-x",
            window_start=T0,
            window_end=T0 + timedelta(seconds=8),
            window_rows=168,
            drift_share=0.6,
            drifted_features=("temp", "atemp"),
            prediction_drifted=True,
            report_uri="s3://bucket/r.json",
        )
    )


def decision(promoted: bool) -> ModelDecided:
    common = {
        "model_name": "bikeshare",
        "model_version": 2,
        "run_id": uuid4().hex,
        "champion_version": 1,
        "metric_name": "rmse",
        "greater_is_better": False,
        "challenger_score": 40.0,
        "champion_score": 100.0,
        "episode_id": "bikeshare-v1-x",
    }
    if promoted:
        return ModelDecided(ModelPromoted(**common))  # type: ignore[arg-type]
    return ModelDecided(ModelRejected(**common, reason="short of the 0.99 margin"))  # type: ignore[arg-type]


def trigger() -> TriggerRecorded:
    return TriggerRecorded(
        LedgerEntry(
            episode_id="bikeshare-v1-x",
            model_name="bikeshare",
            dag_id="retrain_model",
            dag_run_id="drift-bikeshare-v1-x",
            state=TriggerState.TRIGGERED,
            reason=None,
            triggered_at=T0,
            dag_run_state=None,
        )
    )


def dag_run(state: str) -> DagRunChanged:
    return DagRunChanged(
        "bikeshare-v1-x",
        DagRun(
            dag_id="retrain_model",
            run_id="drift-bikeshare-v1-x",
            state=state,
            queued_at=None,
            start_date=None,
            end_date=None,
        ),
    )


def test_the_timeline_runs_from_the_first_drifted_window_to_the_swap() -> None:
    timeline = LoopTimeline()
    for item in [
        at(5, window(1, 4, "clean")),
        at(9, window(1, 8, "drifted")),
        at(13, window(1, 12, "drifted")),
        at(14, drift(1)),
        at(15, trigger()),
        at(17, dag_run("running")),
        at(50, dag_run("success")),
        at(49, decision(promoted=True)),
        at(51, ServingChanged(2, 1)),
    ]:
        timeline.observe(item)
    stages = dict(timeline.stages())
    assert stages["drift event published"] == 6
    assert stages["DAG run finished"] == 42
    assert timeline.loop_seconds() == 43


def test_no_promotion_no_loop() -> None:
    timeline = LoopTimeline()
    for item in [at(9, window(1, 8, "drifted")), at(49, decision(promoted=False))]:
        timeline.observe(item)
    assert timeline.stages() == []
    assert timeline.loop_seconds() is None


def test_each_change_has_a_line_and_is_tallied() -> None:
    tally = LoopTally()
    changes: list[LoopChange] = [
        window(1, 8, "drifted"),
        drift(1),
        drift(1),
        trigger(),
        dag_run("success"),
        decision(promoted=True),
        ServingChanged(2, 1),
    ]
    lines = [describe(change, tally) for change in changes]
    assert "drift share 0.60 (temp, atemp), rmse 80 on" in lines[0]
    assert "episode bikeshare-v1-x opened" in lines[1]
    assert lines[2] == ""  # the episode goes on: no second line
    assert "promoted" in lines[5]
    assert "now serves version 2 (was 1)" in lines[6]
    assert tally.episodes == {"bikeshare-v1-x"}
    assert tally.promoted == [2]
    assert tally.served == [2]
    assert tally.in_flight == set()
    assert tally.first_drifted_report == "s3://bucket/r.json"
    rejected = describe(decision(promoted=False), tally)
    assert "short of the 0.99 margin" in rejected


def test_a_shadowed_challenger_and_a_rollback_are_told_apart_from_promotions() -> None:
    tally = LoopTally()
    scores = {
        "model_name": "bikeshare",
        "run_id": "c" * 32,
        "metric_name": "rmse",
        "greater_is_better": False,
        "challenger_score": 40.1,
        "champion_score": 52.7,
    }
    shadowed = ChallengerShadowed.model_validate(
        {**scores, "model_version": 3, "champion_version": 2}
    )
    rolled_back = ModelRolledBack.model_validate(
        {
            **scores,
            "model_version": 2,
            "champion_version": 3,
            "reason": "v3 served rmse 52.7 on its first 200 labelled rows, v2 in shadow 40.1",
            "live_rows": 200,
        }
    )

    lines = [describe(ModelDecided(event), tally) for event in (shadowed, rolled_back)]

    assert "shadowed" in lines[0]
    assert "promoted" not in lines[0]
    assert "rolled back" in lines[1]
    assert "v3 -> v2: rmse 52.7 served against 40.1 in shadow on 200 labelled rows" in lines[1]
    assert tally.promoted == []
    assert tally.decisions == ["v3 in shadow", "v3 rolled back to v2"]
