"""The retrain trigger without a stack: run ids, decisions, and the consumer against fakes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from consumers.retrain_trigger import (
    EVENT_CONF_KEYS,
    RetrainTrigger,
    RetrainTriggerSettings,
    dag_run_conf,
)
from driftloop.orchestration.airflow import AirflowClient, AirflowUnavailableError
from driftloop.orchestration.ledger import (
    RUN_ID_MAX_LENGTH,
    Decision,
    LedgerEntry,
    PriorTrigger,
    TriggerState,
    dag_run_id_for,
    decide,
)
from driftloop.settings import AirflowApiSettings, SettingsError, load_settings
from schemas.events import DriftDetected

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
MODELS = frozenset({"bikeshare"})


def drift(
    episode_id: str = "bikeshare:1:20260701T000000Z",
    model: str = "bikeshare",
    *,
    window_end: datetime = NOW,
    window: timedelta = HOUR,
) -> DriftDetected:
    return DriftDetected(
        model_name=model,
        model_version=1,
        episode_id=episode_id,
        window_start=window_end - window,
        window_end=window_end,
        window_rows=500,
        drift_share=0.6,
        drifted_features=("temp", "hum"),
        prediction_drifted=True,
        report_uri="s3://driftloop-data/reports/x.json",
    )


def entry(state: TriggerState, episode_id: str = "bikeshare:1:20260701T000000Z") -> LedgerEntry:
    return LedgerEntry(
        episode_id=episode_id,
        model_name="bikeshare",
        dag_id="retrain_model",
        dag_run_id=dag_run_id_for(episode_id),
        state=state,
        reason=None,
        triggered_at=NOW if state.accepted else None,
        dag_run_state=None,
    )


# --- run ids ---------------------------------------------------------------------------------


def test_run_id_keeps_an_allowed_episode_id_readable() -> None:
    assert dag_run_id_for("bikeshare:3:20260701T000000Z") == "drift-bikeshare:3:20260701T000000Z"


def test_run_id_is_stable() -> None:
    assert dag_run_id_for("a b/c") == dag_run_id_for("a b/c")


def test_run_id_replaces_forbidden_characters_without_collisions() -> None:
    first, second = dag_run_id_for("a b"), dag_run_id_for("a/b")
    assert first.startswith("drift-a_b-")
    assert second.startswith("drift-a_b-")
    assert first != second
    assert dag_run_id_for("a_b") == "drift-a_b"


@pytest.mark.parametrize("episode_id", ["x" * 400, "é" * 300, "a b" * 100, "ok"])
def test_run_id_matches_airflows_pattern_and_length(episode_id: str) -> None:
    run_id = dag_run_id_for(episode_id)
    assert len(run_id) <= RUN_ID_MAX_LENGTH
    assert all(c.isascii() and (c.isalnum() or c in "_.~:+-") for c in run_id)


# --- decisions -------------------------------------------------------------------------------


def verdict(
    event: DriftDetected | None = None,
    *,
    previous: LedgerEntry | None = None,
    last: PriorTrigger | None = None,
    cooldown: timedelta = HOUR,
) -> Decision:
    return decide(
        event or drift(),
        known_models=MODELS,
        previous=previous,
        last_trigger=last,
        cooldown=cooldown,
    ).decision


def test_first_event_of_a_known_model_triggers() -> None:
    assert verdict() is Decision.TRIGGER


@pytest.mark.parametrize("state", [TriggerState.TRIGGERED, TriggerState.ALREADY_TRIGGERED])
def test_an_accepted_episode_is_a_duplicate(state: TriggerState) -> None:
    assert verdict(previous=entry(state)) is Decision.DUPLICATE


def test_unknown_model_is_refused_with_a_reason() -> None:
    result = decide(
        drift(model="nobody"),
        known_models=MODELS,
        previous=None,
        last_trigger=None,
        cooldown=HOUR,
    )
    assert result.decision is Decision.UNKNOWN_MODEL
    assert result.reason is not None
    assert "nobody" in result.reason


def test_another_episode_inside_the_cooldown_is_suppressed() -> None:
    last = PriorTrigger("older-episode", NOW - timedelta(minutes=59))
    result = decide(drift(), known_models=MODELS, previous=None, last_trigger=last, cooldown=HOUR)
    assert result.decision is Decision.SUPPRESS_COOLDOWN
    assert result.reason is not None
    assert "older-episode" in result.reason


def test_the_cooldown_ends() -> None:
    last = PriorTrigger("older-episode", NOW - HOUR)
    assert verdict(last=last) is Decision.TRIGGER


def test_the_cooldown_counts_prediction_time_not_when_the_event_is_handled() -> None:
    # A window of last year, handled now (a replay, a backlog): two windows a week apart in
    # prediction time are a week apart whatever the clock says when they are decided.
    last = PriorTrigger("older-episode", datetime(2011, 5, 1, tzinfo=UTC))
    week_later = drift(window_end=datetime(2011, 5, 8, tzinfo=UTC))
    assert verdict(week_later, last=last, cooldown=timedelta(days=6)) is Decision.TRIGGER
    assert verdict(week_later, last=last, cooldown=timedelta(days=8)) is Decision.SUPPRESS_COOLDOWN


def test_a_late_window_older_than_the_last_trigger_is_inside_the_cooldown() -> None:
    last = PriorTrigger("newer-episode", NOW)
    late = drift("late-episode", window_end=NOW - timedelta(days=30))
    assert verdict(late, last=last, cooldown=HOUR) is Decision.SUPPRESS_COOLDOWN


def test_zero_cooldown_never_suppresses() -> None:
    last = PriorTrigger("older-episode", NOW)
    assert verdict(last=last, cooldown=timedelta(0)) is Decision.TRIGGER


@pytest.mark.parametrize("state", [TriggerState.SUPPRESSED_COOLDOWN, TriggerState.FAILED])
def test_a_suppressed_or_failed_episode_is_decided_again(state: TriggerState) -> None:
    assert verdict(previous=entry(state)) is Decision.TRIGGER
    last = PriorTrigger("older-episode", NOW - timedelta(minutes=1))
    assert verdict(previous=entry(state), last=last) is Decision.SUPPRESS_COOLDOWN


# --- settings --------------------------------------------------------------------------------


def test_models_are_comma_separated_and_default_to_the_declarations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No .env: a checkout's own (a stack on shifted ports) must not change the defaults.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETRAIN_TRIGGER_METRICS_PORT", raising=False)
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("AIRFLOW_API_PASSWORD", "x")
    monkeypatch.setenv("RETRAIN_TRIGGER_MODELS", "")
    assert "bikeshare" in RetrainTriggerSettings().known_models()
    monkeypatch.setenv("RETRAIN_TRIGGER_MODELS", " a , b,,")
    settings = RetrainTriggerSettings()
    assert settings.known_models() == frozenset({"a", "b"})
    assert settings.dag_id == "retrain_model"
    assert settings.metrics_port == 9104


# --- the consumer against an in-memory ledger and a scripted Airflow -------------------------


@dataclass
class MemoryLedger:
    rows: dict[str, LedgerEntry] = field(default_factory=dict)
    window_ends: dict[str, datetime] = field(default_factory=dict)

    async def entry(self, episode_id: str) -> LedgerEntry | None:
        return self.rows.get(episode_id)

    async def last_trigger(self, model_name: str) -> PriorTrigger | None:
        accepted = [
            row
            for row in self.rows.values()
            if row.model_name == model_name and row.triggered_at is not None
        ]
        if not accepted:
            return None
        latest = max(accepted, key=lambda row: self.window_ends[row.episode_id])
        return PriorTrigger(latest.episode_id, self.window_ends[latest.episode_id])

    async def record(
        self,
        event: DriftDetected,
        *,
        dag_id: str,
        dag_run_id: str,
        state: TriggerState,
        reason: str | None,
        triggered_at: datetime | None,
    ) -> bool:
        current = self.rows.get(event.episode_id)
        if current is not None and current.state.accepted:
            return False
        self.window_ends[event.episode_id] = event.window_end
        self.rows[event.episode_id] = LedgerEntry(
            event.episode_id,
            event.model_name,
            dag_id,
            dag_run_id,
            state,
            reason,
            triggered_at,
            None,
        )
        return True


@dataclass
class ScriptedAirflow:
    up: bool = True
    status: int | None = None
    runs: list[str] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": "a.b.c"})
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": "Dag not found"})
        run_id = json.loads(request.content)["dag_run_id"]
        if run_id in self.runs:
            return httpx.Response(409, json={"detail": "exists"})
        self.runs.append(run_id)
        return httpx.Response(200, json={})


@dataclass
class Rig:
    ledger: MemoryLedger
    airflow: ScriptedAirflow
    trigger: RetrainTrigger
    clock: list[datetime]


@pytest.fixture
async def rig() -> Rig:
    ledger = MemoryLedger()
    airflow = ScriptedAirflow()
    clock = [NOW]
    client = AirflowClient(
        AirflowApiSettings(url="http://airflow.test", password=SecretStr("pw")),
        transport=httpx.MockTransport(airflow),
        attempts=1,
    )
    trigger = RetrainTrigger(
        ledger,  # type: ignore[arg-type]
        client,
        dag_id="retrain_model",
        cooldown=HOUR,
        known_models=MODELS,
        clock=lambda: clock[0],
    )
    return Rig(ledger, airflow, trigger, clock)


async def test_a_duplicated_event_triggers_one_run(rig: Rig) -> None:
    event = drift("e1")
    assert await rig.trigger.handle(event) is TriggerState.TRIGGERED
    assert await rig.trigger.handle(event) is None
    assert rig.airflow.runs == ["drift-e1"]
    assert rig.ledger.rows["e1"].state is TriggerState.TRIGGERED


async def test_a_run_created_by_an_earlier_attempt_is_already_triggered(rig: Rig) -> None:
    rig.airflow.runs.append("drift-e1")  # created, but the ledger write never happened
    assert await rig.trigger.handle(drift("e1")) is TriggerState.ALREADY_TRIGGERED
    assert rig.ledger.rows["e1"].triggered_at == NOW


async def test_cooldown_suppresses_then_releases_the_episode(rig: Rig) -> None:
    await rig.trigger.handle(drift("e1"))
    later = NOW + timedelta(minutes=10)
    assert await rig.trigger.handle(drift("e2", window_end=later)) is (
        TriggerState.SUPPRESSED_COOLDOWN
    )
    assert rig.airflow.runs == ["drift-e1"]
    # The wall clock moving on does not end the cooldown: the next window's end does.
    rig.clock[0] = NOW + 10 * HOUR
    assert await rig.trigger.handle(drift("e2", window_end=later)) is (
        TriggerState.SUPPRESSED_COOLDOWN
    )
    next_window = NOW + HOUR + timedelta(minutes=1)
    assert await rig.trigger.handle(drift("e2", window_end=next_window)) is (TriggerState.TRIGGERED)
    assert rig.airflow.runs == ["drift-e1", "drift-e2"]


async def test_a_cooldown_in_windows_scales_with_the_window(rig: Rig) -> None:
    # A replay at 30 simulated hours a second has 5.6 s windows for a week of traffic: two
    # windows of cooldown are 11.2 s of its prediction time, two weeks of its simulated time.
    rig.trigger.cooldown_windows = 2
    rig.trigger.cooldown = timedelta(0)
    window = timedelta(seconds=5.6)
    await rig.trigger.handle(drift("e1", window=window))
    second = drift("e2", window_end=NOW + 1.5 * window, window=window)
    assert await rig.trigger.handle(second) is TriggerState.SUPPRESSED_COOLDOWN
    third = drift("e3", window_end=NOW + 2 * window, window=window)
    assert await rig.trigger.handle(third) is TriggerState.TRIGGERED


async def test_the_longer_of_the_seconds_and_the_windows_applies(rig: Rig) -> None:
    # A test or an operator that sets the seconds is not overridden by a shorter windows'
    # cooldown from a .env, and the other way round.
    rig.trigger.cooldown_windows = 2
    rig.trigger.cooldown = HOUR
    short = drift("e1", window=timedelta(seconds=5.6))
    assert rig.trigger.cooldown_for(short) == HOUR
    long = drift("e2", window=timedelta(days=7))
    assert rig.trigger.cooldown_for(long) == timedelta(days=14)


async def test_unknown_model_is_recorded_failed_without_calling_airflow(rig: Rig) -> None:
    assert await rig.trigger.handle(drift("e9", model="stranger")) is TriggerState.FAILED
    assert rig.airflow.runs == []
    reason = rig.ledger.rows["e9"].reason
    assert reason is not None
    assert "stranger" in reason


async def test_a_model_declared_since_the_start_is_retrained(rig: Rig) -> None:
    declared = set(MODELS)
    rig.trigger.known_models = lambda: frozenset(declared)
    assert await rig.trigger.handle(drift("e9", model="churn")) is TriggerState.FAILED
    declared.add("churn")
    assert await rig.trigger.handle(drift("e10", model="churn")) is TriggerState.TRIGGERED
    assert rig.airflow.runs == ["drift-e10"]


async def test_a_missing_dag_is_recorded_failed(rig: Rig) -> None:
    rig.airflow.status = 404
    assert await rig.trigger.handle(drift("e1")) is TriggerState.FAILED
    reason = rig.ledger.rows["e1"].reason
    assert reason is not None
    assert "404" in reason
    assert rig.ledger.rows["e1"].triggered_at is None


async def test_airflow_down_raises_a_transient_error_and_records_nothing(rig: Rig) -> None:
    rig.airflow.up = False
    with pytest.raises(AirflowUnavailableError) as raised:
        await rig.trigger.handle(drift("e1"))
    assert rig.trigger.is_transient(raised.value)
    assert rig.ledger.rows == {}
    rig.airflow.up = True
    assert await rig.trigger.handle(drift("e1")) is TriggerState.TRIGGERED


def test_conf_carries_the_episode_as_json() -> None:
    conf = dag_run_conf(drift("e1"))
    assert json.loads(json.dumps(conf)) == conf
    assert conf["episode_id"] == "e1"
    assert conf["drifted_features"] == ["temp", "hum"]
    assert set(conf) == EVENT_CONF_KEYS


def test_conf_extras_carry_the_namespace_and_cannot_hide_the_event() -> None:
    conf = dag_run_conf(
        drift("e1"), {"postgres_schema": "t1", "topic_prefix": "t1.", "episode_id": "forged"}
    )
    assert conf["postgres_schema"] == "t1"
    assert conf["topic_prefix"] == "t1."
    assert conf["episode_id"] == "e1"


def test_dag_params_setting_refuses_event_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # The secrets a checkout's .env would give: the test needs no .env to pass.
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("AIRFLOW_API_PASSWORD", "x")
    monkeypatch.setenv("RETRAIN_TRIGGER_DAG_PARAMS", '{"promotion_margin": 0.5}')
    settings = load_settings(RetrainTriggerSettings)
    assert settings.conf_extras()["promotion_margin"] == 0.5
    assert settings.conf_extras()["postgres_schema"] == settings.db_schema
    monkeypatch.setenv("RETRAIN_TRIGGER_DAG_PARAMS", '{"model_name": "other"}')
    with pytest.raises(SettingsError, match="model_name"):
        load_settings(RetrainTriggerSettings)


def test_entry_is_a_plain_record() -> None:
    row = entry(TriggerState.FAILED)
    assert replace(row, reason="x").reason == "x"
