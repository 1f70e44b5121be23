"""drift-monitor: each closed time window of the champion's traffic judged; DriftDetected on drift.

Judges each monitored model's champion version in windows of prediction time, from the slice
sketches the feature-logger writes with the rows, against thresholds calibrated on that
version's reference (``driftloop.drift``); an Evidently report on a uniform sample of each
window goes to the object store and each run to ``drift_runs``; it
exports the scores to Prometheus and publishes ``DriftDetected`` to ``drift.events`` once drift
holds for the policy's consecutive windows. Run with ``python -m consumers.drift_monitor``;
metrics on ``DRIFT_MONITOR_METRICS_PORT`` (9103). ``python -m consumers.drift_monitor status``
prints the latest windows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from consumers.service import serve
from driftloop.drift.monitor import DriftMonitor, MonitorOptions
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reference import RegistryChampions
from driftloop.drift.reports import REPORT_PREFIX, ReportDocuments, ReportKeys, put_report
from driftloop.drift.store import open_drift_store
from driftloop.events.consumer_loop import install_stop_signals
from driftloop.events.producer import EventProducer
from driftloop.leader import LeaderLock
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ModelNames,
    ObjectStoreSettings,
    PostgresSettings,
    ServiceSettings,
    chosen_models,
)
from driftloop.storage.migrations import SCHEMA_NAME
from driftloop.storage.objectstore import s3_client
from schemas.events import DriftDetected
from schemas.features import declared_specs
from schemas.topics import Topic

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

NAME: Final = "drift-monitor"
log = logging.getLogger(NAME)

Seconds = Annotated[float, Field(gt=0)]


class DriftMonitorSettings(ServiceSettings):
    """The drift monitor (``DRIFT_MONITOR_*``) and the connections it uses."""

    model_config = SettingsConfigDict(env_prefix="DRIFT_MONITOR_")

    models: ModelNames = Field(
        default=(),
        description="DRIFT_MONITOR_MODELS: comma-separated registered models to monitor "
        "(default empty: the registered_model_name of every declaration in schemas/models).",
    )
    window_seconds: Seconds | None = Field(
        default=None,
        description="DRIFT_MONITOR_WINDOW_SECONDS: span of every model's windows, overriding "
        "each declaration's monitoring.window (default unset: the declarations'); a multiple "
        "of 0.1. For replays faster than real time, such as the demo's.",
    )
    settle_seconds: Annotated[float, Field(ge=0)] = Field(
        default=10.0,
        description="DRIFT_MONITOR_SETTLE_SECONDS: how long after a window closes its rows may "
        "still be arriving through the feature-logger; the window is judged after (default "
        "10). Rows later than that are counted as late and left out.",
    )
    max_merged_windows: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=10,
        description="DRIFT_MONITOR_MAX_MERGED_WINDOWS: a window with fewer rows than the "
        "policy's min_rows takes in the next ones, up to this many in all; then it is refused "
        "(default 10).",
    )
    report_sample_rows: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=10_000,
        description="DRIFT_MONITOR_REPORT_SAMPLE_ROWS: rows of the uniform sample of each "
        "window the Evidently report and the quality figures run on (default 10000).",
    )
    poll_seconds: Seconds = Field(
        default=2.0,
        description="DRIFT_MONITOR_POLL_SECONDS: pause between rounds over the models (default 2).",
    )
    champion_refresh_seconds: Seconds = Field(
        default=5.0,
        description="DRIFT_MONITOR_CHAMPION_REFRESH_SECONDS: how often the champion alias is "
        "resolved again; a new version switches windows and reference (default 5).",
    )
    backoff_max_seconds: Seconds = Field(
        default=30.0,
        description="DRIFT_MONITOR_BACKOFF_MAX_SECONDS: longest pause before retrying a model "
        "whose check failed (default 30).",
    )
    policy: DriftPolicy = Field(
        default_factory=DriftPolicy,
        description="DRIFT_MONITOR_POLICY: JSON object overriding fields of the drift policy, "
        'e.g. {"consecutive_windows": 3} (default: driftloop.drift.policy.DriftPolicy).',
    )
    report_prefix: str = Field(
        default=REPORT_PREFIX,
        min_length=1,
        description="DRIFT_MONITOR_REPORT_PREFIX: object key prefix of the reports in the data "
        "bucket (default drift-reports/).",
    )
    clean_html_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.05,
        description="DRIFT_MONITOR_CLEAN_HTML_SHARE: share of clean windows whose report keeps "
        "its HTML (chosen by a hash of the window; drifted windows always do; default 0.05).",
    )
    db_schema: str = Field(
        default="public",
        pattern=SCHEMA_NAME.pattern,
        description="DRIFT_MONITOR_DB_SCHEMA: Postgres schema of the prediction log and the "
        "drift runs (default public; tests use one per test).",
    )
    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        default=9103,
        description="DRIFT_MONITOR_METRICS_PORT: Prometheus /metrics port (default 9103; 0 picks "
        "a free port).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    s3: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    def monitored_models(self) -> list[str]:
        """The models monitored: the configured ones, else every declared model."""
        return chosen_models(self.models)

    def monitor_options(self) -> MonitorOptions:
        return MonitorOptions(
            window=None if self.window_seconds is None else timedelta(seconds=self.window_seconds),
            settle=timedelta(seconds=self.settle_seconds),
            max_merged_windows=self.max_merged_windows,
            sample_rows=self.report_sample_rows,
            champion_refresh=timedelta(seconds=self.champion_refresh_seconds),
            report_prefix=self.report_prefix,
            clean_html_share=self.clean_html_share,
        )


def kafka_publisher(
    producer: EventProducer, topic: str
) -> Callable[[DriftDetected], Awaitable[None]]:
    """Publishes a drift event keyed by model and waits for the broker's acknowledgement."""

    async def publish(event: DriftDetected) -> None:
        await producer.send_event(topic, event)

    return publish


def report_store(
    s3: S3Client, bucket: str
) -> Callable[[str, str, ReportDocuments], Awaitable[str]]:
    """Stores a window's report in ``bucket``; returns the JSON document's URI."""

    async def store(json_key: str, html_key: str, documents: ReportDocuments) -> str:
        return await put_report(s3, bucket, ReportKeys(json=json_key, html=html_key), documents)

    return store


async def run_drift_monitor(settings: DriftMonitorSettings) -> None:
    """Run the monitor until SIGTERM/SIGINT."""
    models = settings.monitored_models()
    store = await open_drift_store(settings.postgres, settings.db_schema)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        s3 = await stack.enter_async_context(s3_client(settings.s3))
        producer = EventProducer(settings.kafka, NAME)
        await producer.start()
        stack.push_async_callback(producer.close)
        topic = settings.kafka.topic(Topic.DRIFT_EVENTS)
        monitor = DriftMonitor(
            store=store,
            champions=RegistryChampions(settings.mlflow.tracking_uri),
            publish=kafka_publisher(producer, topic),
            store_report=report_store(s3, settings.s3.data_bucket),
            models=models,
            declared=settings.monitored_models,
            policy=settings.policy,
            options=settings.monitor_options(),
        )
        stopping = asyncio.Event()
        install_stop_signals(stopping.set)
        log.info(
            "monitoring %s: windows of %s (min %d rows, %d in a row to drift), events to %s",
            models,
            "each declaration's span"
            if settings.window_seconds is None
            else f"{settings.window_seconds} s",
            settings.policy.min_rows,
            settings.policy.consecutive_windows,
            topic,
        )
        await monitor.run(
            stopping,
            poll_seconds=settings.poll_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
        )
    log.info("stopped cleanly")


async def print_status(settings: DriftMonitorSettings, limit: int) -> None:
    """Print the latest windows judged, newest first."""
    # Each model's quality is shown by its promotion metric, as the retrain DAG judges it.
    metrics = {spec.registered_model_name: spec.promotion_metric.value for spec in declared_specs()}
    store = await open_drift_store(settings.postgres, settings.db_schema, give_up_after_seconds=10)
    try:
        for run in await store.recent(limit=limit):
            share = "-" if run.drift_share is None else f"{run.drift_share:.2f}"
            metric = metrics.get(run.model_name, "quality")
            value = (run.quality or {}).get(metric)
            past = (
                f" > limit {run.quality_limit:.4g}"
                if run.quality_degraded and run.quality_limit is not None
                else ""
            )
            print(  # noqa: T201 - a command-line report
                f"{run.checked_at:%Y-%m-%d %H:%M:%S}\t{run.model_name} v{run.model_version}\t"
                f"{run.outcome}\t{run.window_rows} rows\tshare {share}\t"
                f"{','.join(run.drifted_features) or '-'}\t"
                f"{metric} {'-' if value is None else f'{value:.4g}'}{past}\t"
                f"{run.episode_id or '-'}{' (event)' if run.drift_holds else ''}\t"
                f"{run.report_uri or run.refusal_reason or ''}"
            )
    finally:
        await store.close()


def _quiet_service_log() -> None:
    # A service log has no terminal: no MLflow download progress bars in it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Evidently's quality preset also scores slices of one row, where scikit-learn warns that
    # R² is undefined; the window's R² itself is computed on every labelled row.
    warnings.filterwarnings("ignore", message=r"R\^2 score is not well-defined")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m consumers.drift_monitor [run | status [--limit N]]`` (default: run)."""
    serve(
        "consumers.drift_monitor",
        DriftMonitorSettings,
        run_drift_monitor,
        status=print_status,
        # One working replica per schema; the others wait (driftloop.leader).
        leader=lambda settings: LeaderLock(
            settings.postgres, f"consumers.drift_monitor/{settings.db_schema}"
        ),
        before_run=_quiet_service_log,
        argv=argv,
    )


if __name__ == "__main__":
    main()
