"""retrain-trigger: one Airflow DAG run per drift episode, through the REST API.

Consumes ``drift.events`` in one group on the shared consumer loop. Each ``DriftDetected`` is
decided against the ledger (``retrain_triggers``): a duplicate of an accepted episode is
skipped, an unknown model is recorded as failed, another episode of the model inside the
cooldown (in prediction time: the event's window end against the window end that last
triggered, ``driftloop.orchestration.ledger``) is recorded as suppressed, anything else
triggers the DAG with the run id
``drift-<episode_id>`` — a replay gets 409 from Airflow, never a second run. While Airflow is
unreachable the loop pauses and retries the batch, so the offset is committed only after the
trigger was accepted and written to the ledger. A background task follows the DAG runs'
states into the ledger. Run with ``python -m consumers.retrain_trigger``; metrics on
``RETRAIN_TRIGGER_METRICS_PORT`` (9104). ``python -m consumers.retrain_trigger status`` refreshes
and prints the ledger's latest rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from consumers.service import serve
from driftloop.events import kafka
from driftloop.events.consumer_loop import (
    RECORDS_OUT,
    ConsumerLoop,
    Delivery,
    LoopOptions,
    install_stop_signals,
)
from driftloop.events.producer import EventProducer
from driftloop.leader import LeaderLock
from driftloop.orchestration.airflow import (
    AirflowAuthError,
    AirflowClient,
    AirflowError,
    AirflowRejectedError,
    AirflowUnavailableError,
    TriggerOutcome,
)
from driftloop.orchestration.ledger import (
    Decision,
    RetrainLedger,
    TriggerState,
    dag_run_id_for,
    decide,
    open_retrain_ledger,
)
from driftloop.settings import (
    AirflowApiSettings,
    KafkaSettings,
    ModelNames,
    PostgresSettings,
    ServiceSettings,
    chosen_models,
)
from driftloop.storage.database import UNAVAILABLE_ERRORS
from driftloop.storage.migrations import SCHEMA_NAME
from schemas.events import TOPIC_EVENTS, DriftDetected
from schemas.topics import Topic

NAME: Final = "retrain-trigger"
log = logging.getLogger(NAME)

TRIGGERS = Counter(
    "driftloop_retrain_triggers_total",
    "Drift events handled, by outcome (triggered, already_triggered, suppressed_cooldown, "
    "failed, duplicate).",
    ["outcome"],
)
UNKNOWN_MODELS = Counter(
    "driftloop_retrain_unknown_models_total",
    "Drift events for a model the trigger does not retrain (recorded as failed).",
)
AIRFLOW_ERRORS = Counter(
    "driftloop_retrain_airflow_errors_total",
    "Airflow REST failures: unavailable and auth (batch retried), rejected (recorded failed), "
    "status (a DAG run state refresh failed).",
    ["kind"],
)
LAST_TRIGGER = Gauge(
    "driftloop_retrain_last_trigger_timestamp_seconds",
    "Unix time of the last DAG run Airflow accepted, by model.",
    ["model"],
)
DAG_RUNS_FINISHED = Counter(
    "driftloop_retrain_dag_runs_finished_total",
    "Triggered DAG runs seen reaching a terminal state by the status refresh, by state.",
    ["state"],
)

Seconds = Annotated[float, Field(gt=0)]

# Airflow or Postgres away: the loop pauses consumption and retries the batch, uncommitted.
TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    AirflowUnavailableError,
    *UNAVAILABLE_ERRORS,
)
# Keys of the run conf that come from the drift event (dag_run_conf).
EVENT_CONF_KEYS: Final = frozenset(
    {
        "model_name",
        "model_version",
        "episode_id",
        "event_id",
        "window_start",
        "window_end",
        "window_rows",
        "drift_share",
        "drifted_features",
        "prediction_drifted",
        "report_uri",
    }
)
# Failures the status refresh shrugs off: the next round catches up.
REFRESH_ERRORS: Final[tuple[type[BaseException], ...]] = (AirflowError, *UNAVAILABLE_ERRORS)


class RetrainTriggerSettings(ServiceSettings):
    """The retrain trigger (``RETRAIN_TRIGGER_*``) and the connections it uses."""

    model_config = SettingsConfigDict(env_prefix="RETRAIN_TRIGGER_")

    group: str = Field(
        default="retrain-trigger",
        description="RETRAIN_TRIGGER_GROUP: Kafka consumer group (default retrain-trigger).",
    )
    dag_id: str = Field(
        default="retrain_model",
        min_length=1,
        description="RETRAIN_TRIGGER_DAG_ID: Airflow DAG triggered per episode "
        "(default retrain_model).",
    )
    cooldown_seconds: Annotated[float, Field(ge=0)] = Field(
        default=3600.0,
        description="RETRAIN_TRIGGER_COOLDOWN_SECONDS: after a model's run is triggered, other "
        "episodes of that model whose window ends within this much prediction time of the "
        "triggering window's end are suppressed (default 3600).",
    )
    cooldown_windows: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="RETRAIN_TRIGGER_COOLDOWN_WINDOWS: a cooldown of this many of the drifted "
        "model's windows (each event's window end minus start); the longer of it and "
        "RETRAIN_TRIGGER_COOLDOWN_SECONDS applies. It scales with the window, so a replay "
        "faster than real time (DRIFT_MONITOR_WINDOW_SECONDS) keeps the same cooldown in "
        "simulated time (default unset).",
    )
    dag_params: dict[str, Any] = Field(
        default_factory=dict,
        description="RETRAIN_TRIGGER_DAG_PARAMS: JSON object of DAG params added to every run's "
        'conf, e.g. {"promotion_margin": 0.05} (default {}: the DAG\'s defaults).',
    )
    models: ModelNames = Field(
        default=(),
        description="RETRAIN_TRIGGER_MODELS: comma-separated registered models to retrain "
        "(default empty: the registered_model_name of every declaration in schemas/models).",
    )
    db_schema: str = Field(
        default="public",
        pattern=SCHEMA_NAME.pattern,
        description="RETRAIN_TRIGGER_DB_SCHEMA: Postgres schema of the ledger (default public; "
        "tests use one per test).",
    )
    max_batch: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=100,
        description="RETRAIN_TRIGGER_MAX_BATCH: drift events per batch (default 100).",
    )
    poll_timeout_ms: Annotated[int, Field(ge=1)] = Field(
        default=500,
        description="RETRAIN_TRIGGER_POLL_TIMEOUT_MS: longest wait for a batch (default 500).",
    )
    airflow_timeout_seconds: Seconds = Field(
        default=10.0,
        description="RETRAIN_TRIGGER_AIRFLOW_TIMEOUT_SECONDS: timeout of one REST call "
        "(default 10).",
    )
    airflow_attempts: Annotated[int, Field(ge=1, le=20)] = Field(
        default=3,
        description="RETRAIN_TRIGGER_AIRFLOW_ATTEMPTS: tries of one REST call before the batch "
        "is handed to the loop's pause-and-retry (default 3).",
    )
    backoff_max_seconds: Seconds = Field(
        default=15.0,
        description="RETRAIN_TRIGGER_BACKOFF_MAX_SECONDS: longest pause between retries of a "
        "batch while Airflow or Postgres is down (default 15).",
    )
    status_refresh_seconds: Seconds = Field(
        default=15.0,
        description="RETRAIN_TRIGGER_STATUS_REFRESH_SECONDS: how often the DAG run states of "
        "unfinished triggers are read into the ledger (default 15).",
    )
    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        default=9104,
        description="RETRAIN_TRIGGER_METRICS_PORT: Prometheus /metrics port (default 9104; 0 "
        "picks a free port).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    airflow: AirflowApiSettings = Field(default_factory=AirflowApiSettings)

    @field_validator("dag_params")
    @classmethod
    def _params_do_not_hide_the_episode(cls, value: dict[str, Any]) -> dict[str, Any]:
        hidden = sorted(set(value) & EVENT_CONF_KEYS)
        if hidden:
            raise ValueError(f"{', '.join(hidden)}: set from the drift event, not a DAG param")
        return value

    def conf_extras(self) -> dict[str, Any]:
        """What every run's conf carries besides the event: where the data lives, DAG params.

        The retrain DAG reads the prediction log from ``postgres_schema`` and publishes its
        decision to ``model.events`` under ``topic_prefix``: the namespace this trigger serves.
        """
        return {
            "postgres_schema": self.db_schema,
            "topic_prefix": self.kafka.topic_prefix,
            **self.dag_params,
        }

    def known_models(self) -> frozenset[str]:
        """The models retrained: the configured ones, else every declared model (the
        declaration folders read anew)."""
        return frozenset(chosen_models(self.models))


class RetrainTrigger:
    """Decides each drift event against the ledger and triggers the DAG at most once."""

    def __init__(
        self,
        ledger: RetrainLedger,
        airflow: AirflowClient,
        *,
        dag_id: str,
        cooldown: timedelta,
        cooldown_windows: float | None = None,
        known_models: frozenset[str] | Callable[[], frozenset[str]],
        conf_extras: Mapping[str, Any] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.ledger = ledger
        self.airflow = airflow
        self.dag_id = dag_id
        self.cooldown = cooldown
        self.cooldown_windows = cooldown_windows
        # A callable is asked at every event: a model declared since the start is retrained.
        self.known_models = known_models
        self.conf_extras = dict(conf_extras or {})
        self._clock = clock

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, TRANSIENT_ERRORS)

    async def write(self, deliveries: Sequence[Delivery[DriftDetected]]) -> None:
        # One at a time and in order: an event's decision depends on the ledger rows the
        # earlier events of the batch wrote (the cooldown, duplicates within the batch).
        for delivery in deliveries:
            await self.handle(delivery.event)

    def cooldown_for(self, event: DriftDetected) -> timedelta:
        """The cooldown after ``event``'s model triggered: the fixed one, or a number of its
        windows when that is longer (a setting of either never shortens the other)."""
        if self.cooldown_windows is None:
            return self.cooldown
        return max(self.cooldown, (event.window_end - event.window_start) * self.cooldown_windows)

    async def handle(self, event: DriftDetected) -> TriggerState | None:
        """Decide, trigger if due, record; None for a duplicate of an accepted episode."""
        previous = await self.ledger.entry(event.episode_id)
        last_trigger = await self.ledger.last_trigger(event.model_name)
        known = self.known_models
        verdict = decide(
            event,
            known_models=known() if callable(known) else known,
            previous=previous,
            last_trigger=last_trigger,
            cooldown=self.cooldown_for(event),
        )
        if verdict.decision is Decision.DUPLICATE:
            TRIGGERS.labels("duplicate").inc()
            log.info("episode %s: %s; nothing to do", event.episode_id, verdict.reason)
            return None
        run_id = dag_run_id_for(event.episode_id)
        triggered_at: datetime | None = None
        reason = verdict.reason
        if verdict.decision is Decision.UNKNOWN_MODEL:
            UNKNOWN_MODELS.inc()
            state = TriggerState.FAILED
        elif verdict.decision is Decision.SUPPRESS_COOLDOWN:
            state = TriggerState.SUPPRESSED_COOLDOWN
        else:
            state, reason = await self._trigger(event, run_id)
            if state.accepted:
                triggered_at = self._clock()
        await self.ledger.record(
            event,
            dag_id=self.dag_id,
            dag_run_id=run_id,
            state=state,
            reason=reason,
            triggered_at=triggered_at,
        )
        TRIGGERS.labels(state.value).inc()
        RECORDS_OUT.labels(NAME, "postgres").inc()
        if triggered_at is not None:
            LAST_TRIGGER.labels(event.model_name).set(triggered_at.timestamp())
        log_level = logging.WARNING if state is TriggerState.FAILED else logging.INFO
        log.log(
            log_level,
            "episode %s of %s v%d (drift share %.2f): %s%s",
            event.episode_id,
            event.model_name,
            event.model_version,
            event.drift_share,
            state.value,
            f" ({reason})" if reason else f" as {self.dag_id}/{run_id}",
        )
        return state

    async def _trigger(self, event: DriftDetected, run_id: str) -> tuple[TriggerState, str | None]:
        try:
            outcome = await self.airflow.trigger_dag_run(
                self.dag_id,
                run_id,
                dag_run_conf(event, self.conf_extras),
                note=f"drift episode {event.episode_id} of {event.model_name}",
            )
        except AirflowRejectedError as error:
            AIRFLOW_ERRORS.labels("rejected").inc()
            return TriggerState.FAILED, str(error)
        except AirflowAuthError:
            AIRFLOW_ERRORS.labels("auth").inc()
            raise
        except AirflowUnavailableError:
            AIRFLOW_ERRORS.labels("unavailable").inc()
            raise
        if outcome is TriggerOutcome.ALREADY_EXISTS:
            return TriggerState.ALREADY_TRIGGERED, "Airflow answered 409: the run already existed"
        return TriggerState.TRIGGERED, None

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


def dag_run_conf(event: DriftDetected, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``conf`` of the retrain DAG run: the episode and the window that drifted, and extras
    (namespace, DAG params; they cannot replace the event's keys)."""
    return {
        **(extras or {}),
        "model_name": event.model_name,
        "model_version": event.model_version,
        "episode_id": event.episode_id,
        "event_id": str(event.event_id),
        "window_start": event.window_start.isoformat(),
        "window_end": event.window_end.isoformat(),
        "window_rows": event.window_rows,
        "drift_share": event.drift_share,
        "drifted_features": list(event.drifted_features),
        "prediction_drifted": event.prediction_drifted,
        "report_uri": event.report_uri,
    }


async def refresh_dag_run_states(ledger: RetrainLedger, airflow: AirflowClient) -> int:
    """Read the state of every unfinished triggered DAG run into the ledger; returns updates."""
    updated = 0
    for entry in await ledger.open_runs():
        try:
            run = await airflow.get_dag_run(entry.dag_id, entry.dag_run_id)
        except AirflowRejectedError as error:
            log.warning("DAG run %s/%s: %s", entry.dag_id, entry.dag_run_id, error)
            continue
        if run.state == entry.dag_run_state:
            continue
        await ledger.update_run_state(entry.episode_id, run.state, run.start_date, run.end_date)
        updated += 1
        if run.finished:
            DAG_RUNS_FINISHED.labels(run.state).inc()
        log.info("DAG run %s/%s is %s", entry.dag_id, entry.dag_run_id, run.state)
    return updated


async def follow_dag_runs(
    ledger: RetrainLedger, airflow: AirflowClient, interval: float, stopping: asyncio.Event
) -> None:
    """Refresh the ledger's DAG run states every ``interval`` seconds until ``stopping``."""
    while not stopping.is_set():
        try:
            await refresh_dag_run_states(ledger, airflow)
        except REFRESH_ERRORS as error:
            AIRFLOW_ERRORS.labels("status").inc()
            log.warning("DAG run states not refreshed: %s", error)
        except Exception:
            # A bug here must not end the following for good, nor the consumer: log, go on.
            log.exception("DAG run state refresh failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval)


async def run_retrain_trigger(settings: RetrainTriggerSettings) -> None:
    """Run the retrain trigger until SIGTERM/SIGINT (or a non-transient failure)."""
    topic = settings.kafka.topic(Topic.DRIFT_EVENTS)
    options = LoopOptions(
        name=NAME,
        group=settings.group,
        topics={topic: TOPIC_EVENTS[Topic.DRIFT_EVENTS]},
        dead_letter_topics={topic: settings.kafka.topic(Topic.DRIFT_EVENTS.dead_letter)},
        max_batch=settings.max_batch,
        poll_timeout_ms=settings.poll_timeout_ms,
        backoff_max_seconds=settings.backoff_max_seconds,
    )
    _start_counters_at_zero()
    ledger = await open_retrain_ledger(settings.postgres, settings.db_schema)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_closing, "Postgres pool", ledger.close)
        airflow = AirflowClient(
            settings.airflow,
            timeout_seconds=settings.airflow_timeout_seconds,
            attempts=settings.airflow_attempts,
        )
        stack.push_async_callback(_closing, "Airflow client", airflow.aclose)
        producer = EventProducer(settings.kafka, f"{NAME}-dlq")
        await producer.start()
        stack.push_async_callback(_closing, "producer", producer.close)
        consumer = kafka.consumer(settings.kafka, settings.group)
        await kafka.start_with_retry(consumer, settings.kafka)
        stack.push_async_callback(_closing, "consumer", consumer.stop)
        trigger = RetrainTrigger(
            ledger,
            airflow,
            dag_id=settings.dag_id,
            cooldown=timedelta(seconds=settings.cooldown_seconds),
            cooldown_windows=settings.cooldown_windows,
            known_models=settings.known_models,
            conf_extras=settings.conf_extras(),
        )
        loop = ConsumerLoop(options, consumer, producer, trigger)
        install_stop_signals(loop.stop)
        follower = asyncio.create_task(
            follow_dag_runs(ledger, airflow, settings.status_refresh_seconds, loop.stopping),
            name="follow-dag-runs",
        )
        try:
            log.info(
                "triggering %s for models %s (cooldown %.0f s%s of prediction time) from %s",
                settings.dag_id,
                sorted(settings.known_models()),
                settings.cooldown_seconds,
                f" or {settings.cooldown_windows:g} windows, the longer"
                if settings.cooldown_windows is not None
                else "",
                topic,
            )
            await loop.run()
        finally:
            loop.stop()
            await follower
    log.info("stopped cleanly")


def _start_counters_at_zero() -> None:
    # A counter series that first appears at 1 is invisible to increase()/rate(): the first
    # failed DAG run or trigger after a restart would not alert. Every outcome starts at 0.
    for outcome in [*(state.value for state in TriggerState), "duplicate"]:
        TRIGGERS.labels(outcome)
    for finished in ("success", "failed"):
        DAG_RUNS_FINISHED.labels(finished)
    for kind in ("unavailable", "auth", "rejected", "status"):
        AIRFLOW_ERRORS.labels(kind)


async def _closing(what: str, close: Callable[[], Awaitable[None]]) -> None:
    log.info("closing the %s", what)
    await close()


async def print_status(settings: RetrainTriggerSettings, limit: int) -> None:
    """Refresh the unfinished DAG runs' states, then print the latest ledger rows."""
    ledger = await open_retrain_ledger(
        settings.postgres, settings.db_schema, give_up_after_seconds=10
    )
    try:
        async with AirflowClient(settings.airflow, attempts=1) as airflow:
            try:
                await refresh_dag_run_states(ledger, airflow)
            except AirflowError as error:
                print(f"DAG run states not refreshed: {error}", file=sys.stderr)  # noqa: T201
        for entry in await ledger.recent(limit):
            triggered = (
                entry.triggered_at.isoformat(timespec="seconds") if entry.triggered_at else "-"
            )
            print(  # noqa: T201 - a command-line report
                f"{entry.episode_id}\t{entry.model_name}\t{entry.state.value}\t"
                f"{entry.dag_id}/{entry.dag_run_id}\t{entry.dag_run_state or '-'}\t{triggered}\t"
                f"{entry.reason or ''}"
            )
    finally:
        await ledger.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m consumers.retrain_trigger [run | status [--limit N]]`` (default: run)."""
    serve(
        "consumers.retrain_trigger",
        RetrainTriggerSettings,
        run_retrain_trigger,
        status=print_status,
        # One working replica per schema; the others wait (driftloop.leader).
        leader=lambda settings: LeaderLock(
            settings.postgres, f"consumers.retrain_trigger/{settings.db_schema}"
        ),
        argv=argv,
    )


if __name__ == "__main__":
    main()
