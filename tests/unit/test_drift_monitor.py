"""The drift monitor's core against in-memory fakes of the log, the registry and the broker.

Evidently runs for real on the Bike Sharing data: winter rows against a winter reference stay
clean, summer rows drift.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from driftloop import training
from driftloop.drift.assessment import PREDICTION_COLUMN, DriftAssessment
from driftloop.drift.episodes import EpisodeState
from driftloop.drift.monitor import CheckResult, DriftMonitor, MonitorOptions
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reports import ReportDocuments
from driftloop.drift.store import PREDICTED_AT_COLUMN, WindowRecord
from schemas.events import DriftDetected
from schemas.features import FeatureSpec, load_feature_spec

SPEC = load_feature_spec("bikeshare")
MODEL = "bikeshare"
START = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
ROWS = 150


def logged(frame: pd.DataFrame, version: int, first: datetime) -> pd.DataFrame:
    """Rows as the log holds them: one a second from ``first``, prediction = the truth."""
    rows = frame[[*SPEC.feature_names, SPEC.target.name]].reset_index(drop=True).copy()
    rows[PREDICTION_COLUMN] = rows[SPEC.target.name].astype("float64")
    rows[PREDICTED_AT_COLUMN] = [first + timedelta(seconds=i) for i in range(len(rows))]
    rows["version"] = version
    return rows


@dataclass
class FakeStore:
    rows: pd.DataFrame
    states: dict[str, EpisodeState] = field(default_factory=dict)
    records: list[WindowRecord] = field(default_factory=list)

    async def window(
        self,
        spec: FeatureSpec,
        model_name: str,
        model_version: int,
        *,
        after: datetime,
        before: datetime,
        limit: int,
    ) -> pd.DataFrame:
        moments = self.rows[PREDICTED_AT_COLUMN]
        chosen = self.rows[
            (self.rows["version"] == model_version) & (moments >= after) & (moments < before)
        ]
        return chosen.sort_values(PREDICTED_AT_COLUMN).head(limit).drop(columns="version")

    async def state(self, model_name: str) -> EpisodeState | None:
        return self.states.get(model_name)

    async def save_state(self, state: EpisodeState) -> None:
        self.states[state.model_name] = state

    async def record(self, record: WindowRecord, state: EpisodeState) -> bool:
        self.records.append(record)
        self.states[state.model_name] = state
        return True


@dataclass
class FakeChampions:
    version: int
    references: dict[int, pd.DataFrame]

    def champion_version(self, model_name: str) -> int | None:
        return self.version

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        return self.references[version]

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        return SPEC


@dataclass
class Rig:
    monitor: DriftMonitor
    store: FakeStore
    champions: FakeChampions
    published: list[DriftDetected]
    reports: dict[str, bytes]
    now: list[datetime]


@pytest.fixture(scope="module")
def seasons() -> dict[str, pd.DataFrame]:
    data = training.read_dataset(SPEC)
    return {
        "winter": data[data["mnth"].isin(["Jan", "Feb"])].reset_index(drop=True),
        "summer": data[data["mnth"].isin(["July", "Aug"])].reset_index(drop=True),
    }


def rig(rows: pd.DataFrame, references: dict[int, pd.DataFrame], **options: object) -> Rig:
    store = FakeStore(rows)
    champions = FakeChampions(version=1, references=references)
    published: list[DriftDetected] = []
    reports: dict[str, bytes] = {}
    now = [START + timedelta(hours=2)]

    async def publish(event: DriftDetected) -> None:
        published.append(event)

    async def store_report(json_key: str, html_key: str, documents: ReportDocuments) -> str:
        reports[json_key] = documents.json
        reports[html_key] = documents.html
        return f"s3://bucket/{json_key}"

    monitor = DriftMonitor(
        store=store,
        champions=champions,
        publish=publish,
        store_report=store_report,
        models=[MODEL],
        policy=DriftPolicy(min_rows=100),
        options=replace(
            MonitorOptions(window_rows=ROWS, champion_refresh=timedelta(0)),
            **options,  # type: ignore[arg-type]
        ),
        clock=lambda: now[0],
    )
    return Rig(monitor, store, champions, published, reports, now)


def drifted(result: CheckResult | None) -> bool:
    """Whether the check judged a window and found it drifted."""
    assert result is not None
    assert isinstance(result.verdict, DriftAssessment), result.verdict
    return result.verdict.drifted


def reference(frame: pd.DataFrame) -> pd.DataFrame:
    return logged(frame, 0, START - timedelta(days=1)).drop(columns=["version"])


async def test_winter_stays_quiet_and_summer_opens_one_episode(
    seasons: dict[str, pd.DataFrame],
) -> None:
    winter = logged(seasons["winter"].iloc[:ROWS], 1, START)
    summer = logged(seasons["summer"].iloc[: 3 * ROWS], 1, START + timedelta(seconds=ROWS))
    r = rig(pd.concat([winter, summer], ignore_index=True), {1: reference(seasons["winter"])})

    first = await r.monitor.check(MODEL)
    assert first is not None
    assert not drifted(first)
    assert r.published == []
    second = await r.monitor.check(MODEL)
    assert drifted(second)
    assert r.published == []  # one drifted window is not yet drift
    third = await r.monitor.check(MODEL)
    assert third is not None
    assert third.step is not None
    assert third.step.opened
    (event,) = r.published
    assert event.episode_id == third.step.episode_id
    assert event.model_version == 1
    assert {"temp", "atemp"} <= set(event.drifted_features)
    assert event.report_uri in {f"s3://bucket/{key}" for key in r.reports}
    fourth = await r.monitor.check(MODEL)
    assert fourth is not None
    assert [e.episode_id for e in r.published] == [event.episode_id] * 2
    # Windows never share a row: each starts after the previous one ended.
    records = r.store.records
    assert [rec.window_end <= nxt.window_start for rec, nxt in itertools.pairwise(records)] == [
        True
    ] * 3
    assert await r.monitor.check(MODEL) is None  # nothing left
    assert r.store.states[MODEL].episode_id == event.episode_id


async def test_a_partial_window_waits_for_its_age(seasons: dict[str, pd.DataFrame]) -> None:
    rows = logged(seasons["winter"].iloc[:120], 1, START)
    r = rig(rows, {1: reference(seasons["winter"])}, max_window_age=timedelta(hours=3))
    assert await r.monitor.check(MODEL) is None  # 120 rows, 2 hours old: not due
    r.now[0] = START + timedelta(hours=3, minutes=1)
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert result.verdict.window_rows == 120


async def test_rows_younger_than_the_settle_time_wait(seasons: dict[str, pd.DataFrame]) -> None:
    rows = logged(seasons["winter"].iloc[:ROWS], 1, START)
    r = rig(rows, {1: reference(seasons["winter"])}, settle=timedelta(seconds=30))
    r.now[0] = START + timedelta(seconds=ROWS)  # the last 30 rows are younger than 30 s
    assert await r.monitor.check(MODEL) is None


async def test_a_refused_window_is_recorded_and_passed(seasons: dict[str, pd.DataFrame]) -> None:
    rows = logged(seasons["winter"].iloc[:ROWS], 1, START)
    rows["temp"] = float("nan")
    r = rig(rows, {1: reference(seasons["winter"])})
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert result.verdict.outcome == "refused"
    assert result.step is None
    assert r.reports == {}
    assert r.published == []
    assert r.store.states[MODEL].last_window_end == result.window.end
    assert r.store.states[MODEL].drifted_streak == 0
    assert await r.monitor.check(MODEL) is None  # not read again


async def test_a_failed_publish_repeats_the_window(seasons: dict[str, pd.DataFrame]) -> None:
    summer = logged(seasons["summer"].iloc[: 2 * ROWS], 1, START)
    r = rig(summer, {1: reference(seasons["winter"])})
    await r.monitor.check(MODEL)
    failures = [RuntimeError("broker away")]
    sent = r.monitor.publish

    async def flaky(event: DriftDetected) -> None:
        if failures:
            raise failures.pop()
        await sent(event)

    r.monitor.publish = flaky
    with pytest.raises(RuntimeError):
        await r.monitor.check(MODEL)
    assert len(r.store.records) == 1  # the failed window was not recorded
    again = await r.monitor.check(MODEL)
    assert again is not None
    assert again.event is not None
    assert r.store.records[-1].window_end == again.window.end
    assert len(r.published) == 1


async def test_a_new_champion_switches_reference_and_episode(
    seasons: dict[str, pd.DataFrame],
) -> None:
    v1 = logged(seasons["summer"].iloc[: 2 * ROWS], 1, START)
    v2 = logged(seasons["summer"].iloc[2 * ROWS : 3 * ROWS], 2, START + timedelta(minutes=10))
    references = {1: reference(seasons["winter"]), 2: reference(seasons["summer"])}
    r = rig(pd.concat([v1, v2], ignore_index=True), references)
    await r.monitor.check(MODEL)
    await r.monitor.check(MODEL)
    assert r.store.states[MODEL].episode_id is not None
    r.champions.version = 2
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert result.model_version == 2
    assert not drifted(result)  # summer against summer
    state = r.store.states[MODEL]
    assert state.model_version == 2
    assert state.episode_id is None


def test_windows_smaller_than_the_policy_minimum_are_refused() -> None:
    with pytest.raises(ValueError, match="below the policy's minimum"):
        rig(pd.DataFrame(), {}, window_rows=50)
