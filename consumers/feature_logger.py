"""feature-logger: every prediction and label, exactly once, in Postgres and Parquet.

Consumes ``predictions`` and ``labels`` in one group. Each micro-batch is written to
Postgres (COPY into staging, ``INSERT … ON CONFLICT``, unique by request id) and its offsets
are committed after the database commit; the same predictions are buffered and flushed to
the object store as Parquet with their own offsets (``driftloop.storage.featurestore``). On a timer
it runs storage maintenance (``driftloop.storage.maintenance``): daily partitions of the log
tables made ahead and dropped past the hot retention, labels written to Parquet, retention
of files and reports applied, closed hours compacted. Run with
``python -m consumers.feature_logger``; metrics on ``FEATURE_LOGGER_METRICS_PORT`` (9101).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Annotated, Any, Final, cast

import asyncpg
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from consumers.service import serve
from driftloop.drift.report_retention import REPORT_PREFIX
from driftloop.events import kafka
from driftloop.events.consumer_loop import (
    DUPLICATES,
    RECORDS_OUT,
    WRITE_SECONDS,
    ConsumerLoop,
    Delivery,
    LoopOptions,
    install_stop_signals,
)
from driftloop.events.producer import EventProducer
from driftloop.settings import (
    KafkaSettings,
    ObjectStoreSettings,
    PostgresSettings,
    ServiceSettings,
)
from driftloop.storage.database import UNAVAILABLE_ERRORS
from driftloop.storage.featurestore import FeatureStore
from driftloop.storage.hot_store import hot_retention
from driftloop.storage.maintenance import (
    ModelRetention,
    ParquetTarget,
    StoragePolicy,
    maintain_storage,
)
from driftloop.storage.migrations import SCHEMA_NAME
from driftloop.storage.objectstore import UNAVAILABLE_ERRORS as OBJECT_STORE_ERRORS
from driftloop.storage.objectstore import s3_client
from driftloop.storage.prediction_log import (
    PredictionLog,
    WriteCounts,
    open_prediction_log,
)
from schemas.events import TOPIC_EVENTS, GroundTruth, PredictionEvent
from schemas.features import declared_specs, load_feature_spec
from schemas.topics import Topic

NAME: Final = "feature-logger"
log = logging.getLogger(NAME)

PENDING_LABELS = Counter(
    "driftloop_feature_logger_labels_pending_total",
    "Labels stored as pending because their prediction was not logged yet.",
)
PENDING_MOVED = Counter(
    "driftloop_feature_logger_pending_labels_moved_total",
    "Pending labels joined to their prediction by the periodic sweep.",
)
PENDING_EXPIRED = Counter(
    "driftloop_feature_logger_pending_labels_expired_total",
    "Pending labels deleted after the retention without their prediction arriving.",
)
SKETCHED_ROWS = Counter(
    "driftloop_feature_logger_sketched_rows_total",
    "New predictions sketched for the drift monitor, by whether their version's layout was "
    "published (sketched) or not yet (counted only; the monitor rebuilds their window).",
    ["outcome"],
)
SKETCH_SECONDS = Counter(
    "driftloop_feature_logger_sketch_seconds_total",
    "Time spent sketching new predictions for the drift monitor.",
)
PARQUET_BUFFERED = Gauge(
    "driftloop_feature_logger_parquet_buffered_rows",
    "Predictions buffered for the next Parquet flush.",
)
HOT_STORE_PARTITIONS = Counter(
    "driftloop_hot_store_partitions_total",
    "Daily partitions of prediction_log and labels made ahead or dropped past the retention.",
    ["action"],
)
STORAGE_MAINTENANCE_FAILURES = Counter(
    "driftloop_storage_maintenance_failures_total",
    "Partition maintenance or compaction runs that failed (retried at the next interval).",
)
LABEL_FILES = Counter(
    "driftloop_parquet_label_files_written_total",
    "Label files (one per model and day) written or rewritten to the object store.",
)
COMPACTED_FILES = Counter(
    "driftloop_parquet_compacted_files_total",
    "Parquet flush files merged into one file per model-hour by compaction.",
)
PARQUET_FLUSH_FAILURES = Counter(
    "driftloop_feature_logger_parquet_flush_failures_total",
    "Parquet flushes that failed because the object store or Postgres was unavailable.",
)

Seconds = Annotated[float, Field(gt=0)]


class FeatureLoggerSettings(ServiceSettings):
    """The feature logger (``FEATURE_LOGGER_*``) and the connections it uses."""

    model_config = SettingsConfigDict(env_prefix="FEATURE_LOGGER_")

    group: str = Field(
        default="feature-logger",
        description="FEATURE_LOGGER_GROUP: Kafka consumer group (default feature-logger).",
    )
    db_schema: str = Field(
        default="public",
        pattern=SCHEMA_NAME.pattern,
        description="FEATURE_LOGGER_DB_SCHEMA: Postgres schema of the log tables (default "
        "public; tests use one per test).",
    )
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=5000,
        description="FEATURE_LOGGER_MAX_BATCH: records per micro-batch (default 5000).",
    )
    poll_timeout_ms: Annotated[int, Field(ge=1)] = Field(
        default=200,
        description="FEATURE_LOGGER_POLL_TIMEOUT_MS: longest wait for a batch (default 200).",
    )
    parquet_enabled: bool = Field(
        default=True,
        description="FEATURE_LOGGER_PARQUET_ENABLED: also write Parquet to the object store "
        "(default true).",
    )
    parquet_prefix: str = Field(
        default="features/",
        description="FEATURE_LOGGER_PARQUET_PREFIX: key prefix in S3_DATA_BUCKET "
        "(default features/).",
    )
    flush_interval_seconds: Seconds = Field(
        default=60.0,
        description="FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS: Parquet flush interval, at most "
        "one file per model/date/hour partition per interval (default 60).",
    )
    max_buffered_rows: Annotated[int, Field(ge=1)] = Field(
        default=200_000,
        description="FEATURE_LOGGER_MAX_BUFFERED_ROWS: flush early at this many buffered rows; "
        "consumption pauses when a full buffer cannot be flushed (default 200000).",
    )
    feature_spec: str = Field(
        default="bikeshare",
        description="FEATURE_LOGGER_FEATURE_SPEC: a declaration (name or YAML path) whose model's "
        "Parquet columns take its types, beside every declared model's (default bikeshare; "
        "an undeclared model's types are inferred).",
    )
    pending_label_retention_hours: Annotated[float, Field(gt=0)] = Field(
        default=168.0,
        description="FEATURE_LOGGER_PENDING_LABEL_RETENTION_HOURS: how long a label waits for "
        "its prediction before it is deleted (default 168 = 7 days, the labels topic's "
        "retention).",
    )
    pending_sweep_interval_seconds: Seconds = Field(
        default=60.0,
        description="FEATURE_LOGGER_PENDING_SWEEP_INTERVAL_SECONDS: how often pending labels "
        "are joined and expired (default 60).",
    )
    storage_maintenance_interval_seconds: Seconds = Field(
        default=600.0,
        description="FEATURE_LOGGER_STORAGE_MAINTENANCE_INTERVAL_SECONDS: how often the daily "
        "partitions of prediction_log and labels are made ahead and the expired ones dropped, "
        "then closed hours' Parquet files compacted (default 600; one replica at a time).",
    )
    compaction_settle_seconds: Annotated[float, Field(ge=0)] = Field(
        default=900.0,
        description="FEATURE_LOGGER_COMPACTION_SETTLE_SECONDS: how long after an hour ends its "
        "Parquet files are merged into one (default 900; a later flush of it adds a file, "
        "merged at the next run).",
    )
    partitions_ahead_days: Annotated[int, Field(ge=0, le=60)] = Field(
        default=3,
        description="FEATURE_LOGGER_PARTITIONS_AHEAD_DAYS: days of partitions made ahead of "
        "today (default 3).",
    )
    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        default=9101,
        description="FEATURE_LOGGER_METRICS_PORT: Prometheus /metrics port (default 9101; 0 "
        "picks a free port).",
    )

    labels_prefix: str = Field(
        default="labels/",
        description="FEATURE_LOGGER_LABELS_PREFIX: key prefix of the label files in "
        "S3_DATA_BUCKET (default labels/).",
    )
    report_prefix: str = Field(
        default=REPORT_PREFIX,
        min_length=1,
        description="FEATURE_LOGGER_REPORT_PREFIX: key prefix of the drift reports whose "
        "retention maintenance applies; the drift-monitor's DRIFT_MONITOR_REPORT_PREFIX "
        "(default drift-reports/).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    s3: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)

    def storage_policy(self) -> StoragePolicy:
        """Maintenance's policy: these settings and the model declarations' hot retention."""
        specs = declared_specs()
        return StoragePolicy(
            hot_retention=hot_retention(specs),
            ahead_days=self.partitions_ahead_days,
            compaction_settle=timedelta(seconds=self.compaction_settle_seconds),
            labels_prefix=self.labels_prefix,
            models=tuple(ModelRetention.of(spec) for spec in specs),
            report_prefix=self.report_prefix,
        )


class FeatureLogger:
    """Writes each batch to the prediction log, then buffers and flushes it as Parquet.

    A due flush runs as a task beside the next batch's Postgres write: ``write`` starts it and
    returns; the next ``write`` logs its batch in Postgres, then waits for that flush before
    adding to the buffer the flush is writing, and handles its outcome as an inline flush
    would (a failure leaves the rows buffered for a retry, a full buffer pauses consumption,
    a non-transient error stops the loop). The store converts rows to Arrow as they are added,
    so what the flush does on the event loop is short; it encodes the files in a thread.
    """

    def __init__(
        self,
        prediction_log: PredictionLog,
        store: FeatureStore | None,
        *,
        predictions_topic: str,
        pending_retention: timedelta,
        sweep_interval_seconds: float,
    ) -> None:
        self.prediction_log = prediction_log
        self.store = store
        self.predictions_topic = predictions_topic
        self.pending_retention = pending_retention
        self.sweep_interval_seconds = sweep_interval_seconds
        self._next_sweep = time.monotonic()
        self._next_flush_attempt = 0.0
        self._flush_backoff = 0.5
        self._flushing: asyncio.Task[int] | None = None

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, UNAVAILABLE_ERRORS + OBJECT_STORE_ERRORS)

    async def write(self, deliveries: Sequence[Delivery[PredictionEvent | GroundTruth]]) -> None:
        predictions: list[Delivery[PredictionEvent]] = []
        labels: list[GroundTruth] = []
        for delivery in deliveries:
            if isinstance(delivery.event, PredictionEvent):
                predictions.append(cast("Delivery[PredictionEvent]", delivery))
            else:
                labels.append(delivery.event)
        counts = WriteCounts()
        if predictions or labels:
            started = time.perf_counter()
            counts = await self.prediction_log.write(predictions, labels)
            WRITE_SECONDS.labels(NAME, "postgres").observe(time.perf_counter() - started)
            RECORDS_OUT.labels(NAME, "postgres").inc(
                counts.predictions_inserted + counts.labels_written + counts.labels_pending
            )
            DUPLICATES.labels(NAME, "postgres").inc(counts.predictions_duplicate)
            PENDING_LABELS.inc(counts.labels_pending)
            SKETCHED_ROWS.labels("sketched").inc(counts.sketched_rows)
            SKETCHED_ROWS.labels("unsketched").inc(counts.unsketched_rows)
            SKETCH_SECONDS.inc(counts.sketch_seconds)
        if self.store is not None:
            # The flush in flight writes the buffer that add changes.
            await self._flush_landed()
            self.store.add(predictions, counts.first_records)
            self._start_flush_when_due()
            if self.store.buffered_rows >= self.store.max_buffered_rows:
                # A full buffer is flushed before the batch counts as written: if the flush
                # fails, the batch is retried with consumption paused, so the buffer stops
                # growing.
                await self._flush_landed()
            PARQUET_BUFFERED.set(self.store.buffered_rows)
        if time.monotonic() >= self._next_sweep:
            sweep = await self.prediction_log.sweep_pending_labels(self.pending_retention)
            PENDING_MOVED.inc(sweep.moved)
            PENDING_EXPIRED.inc(sweep.expired)
            if sweep.expired:
                log.warning("deleted %d pending labels older than the retention", sweep.expired)
            self._next_sweep = time.monotonic() + self.sweep_interval_seconds

    def _start_flush_when_due(self) -> None:
        store = self.store
        if (
            store is None
            or self._flushing is not None
            or not store.flush_due()
            or time.monotonic() < self._next_flush_attempt
        ):
            return
        self._flushing = asyncio.create_task(self._flush(store), name=f"{NAME}-parquet-flush")

    async def _flush(self, store: FeatureStore) -> int:
        started = time.perf_counter()
        rows = await store.flush()
        WRITE_SECONDS.labels(NAME, "parquet").observe(time.perf_counter() - started)
        RECORDS_OUT.labels(NAME, "parquet").inc(rows)
        return rows

    async def _flush_landed(self, *, pause_when_full: bool = True) -> None:
        """Wait for the flush in flight, if any, and take its outcome.

        A transient failure is counted and retried after a backoff; it raises only when the
        buffer is full (and ``pause_when_full``), so the loop pauses consumption until a
        flush succeeds. Any other failure raises.
        """
        flushing = self._flushing
        if flushing is None:
            return
        try:
            # Shielded: a cancelled write leaves the flush to finish; close() waits for it.
            await asyncio.shield(flushing)
        except Exception as error:
            self._flushing = None
            store = self.store
            if store is None or not self.is_transient(error):
                raise
            PARQUET_FLUSH_FAILURES.inc()
            if pause_when_full and store.buffered_rows >= store.max_buffered_rows:
                raise  # buffer full: the loop pauses consumption until a flush succeeds
            # Parquet keeps its own offsets, so Postgres logging goes on while the object store
            # is away; the buffer absorbs the gap up to max_buffered_rows.
            log.warning("Parquet flush failed (%s); retry in %.1fs", error, self._flush_backoff)
            self._next_flush_attempt = time.monotonic() + self._flush_backoff
            self._flush_backoff = min(self._flush_backoff * 2, 30.0)
            return
        self._flushing = None
        self._flush_backoff = 0.5

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        if self.store is not None:
            await self._flush_landed(pause_when_full=False)
            await self.store.restore(
                consumer, [tp for tp in partitions if tp.topic == self.predictions_topic]
            )

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        if self.store is None:
            return
        try:
            # A flush in flight holds rows of the revoked partitions: it lands first, and a
            # failed one is retried here at once.
            await self._flush_landed(pause_when_full=False)
            await self.store.flush()
        except Exception as error:
            if not self.is_transient(error):
                raise
            log.warning("flush on revoke failed (%s); the next owner replays the buffer", error)
        self.store.release(partitions)

    async def close(self) -> None:
        """Flush the buffered rows on a clean stop; a failure leaves them to the replay."""
        if self.store is None:
            return
        try:
            await self._flush_landed(pause_when_full=False)
            await self.store.flush()
        except Exception as error:
            if not self.is_transient(error):
                raise
            log.warning("final flush failed (%s); rows will be replayed at the next start", error)

    async def abandon(self) -> None:
        """After a failure: let a flush in flight finish (it is consistent), start no other."""
        flushing, self._flushing = self._flushing, None
        if flushing is None:
            return
        try:
            await flushing
        except Exception as error:  # noqa: BLE001 - the loop's own failure is what propagates
            log.warning("Parquet flush in flight at the stop failed (%s)", error)


async def maintain_periodically(
    pool: asyncpg.Pool, parquet: ParquetTarget | None, policy: StoragePolicy, interval: float
) -> None:
    """Run storage maintenance every ``interval`` seconds until cancelled.

    A failed run is counted and retried at the next interval: the writer makes any missing
    day itself and readers take any number of files, so logging never waits for this.
    """
    while True:
        try:
            report = await maintain_storage(pool, parquet, policy)
        except Exception:  # maintenance must never stop the logging
            STORAGE_MAINTENANCE_FAILURES.inc()
            log.exception("storage maintenance failed; retry in %.0fs", interval)
        else:
            HOT_STORE_PARTITIONS.labels("created").inc(len(report.partitions.created))
            HOT_STORE_PARTITIONS.labels("dropped").inc(len(report.partitions.dropped))
            LABEL_FILES.inc(len(report.label_files))
            if report.compaction is not None:
                COMPACTED_FILES.inc(report.compaction.files_replaced)
        await asyncio.sleep(interval)


async def run_feature_logger(settings: FeatureLoggerSettings) -> None:
    """Run the feature logger until SIGTERM/SIGINT (or a non-transient failure)."""
    topics = {
        settings.kafka.topic(topic): TOPIC_EVENTS[topic]
        for topic in (Topic.PREDICTIONS, Topic.LABELS)
    }
    options = LoopOptions(
        name=NAME,
        group=settings.group,
        topics=topics,
        dead_letter_topics={
            settings.kafka.topic(topic): settings.kafka.topic(topic.dead_letter)
            for topic in (Topic.PREDICTIONS, Topic.LABELS)
        },
        max_batch=settings.max_batch,
        poll_timeout_ms=settings.poll_timeout_ms,
    )
    # Three sessions: the batch writes, the Parquet flush, and storage maintenance (whose
    # compaction holds its session, and that session's lock, for the whole run).
    prediction_log = await open_prediction_log(settings.postgres, settings.db_schema, max_size=3)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_closing, "Postgres pool", prediction_log.close)
        store = None
        if settings.parquet_enabled:
            # A failed flush is retried by the logger's own backoff while Postgres logging goes
            # on; botocore's five attempts held the loop 12-26 s per failed flush.
            s3 = await stack.enter_async_context(s3_client(settings.s3, max_attempts=2))
            specs = [load_feature_spec(settings.feature_spec)] if settings.feature_spec else []
            specs += declared_specs()
            store = FeatureStore(
                prediction_log.pool,
                s3,
                settings.s3.data_bucket,
                settings.parquet_prefix,
                flush_interval_seconds=settings.flush_interval_seconds,
                max_buffered_rows=settings.max_buffered_rows,
                specs=specs,
                declarations=declared_specs,
            )
        maintenance = asyncio.create_task(
            maintain_periodically(
                prediction_log.pool,
                ParquetTarget(store.s3, settings.s3.data_bucket) if store is not None else None,
                settings.storage_policy(),
                settings.storage_maintenance_interval_seconds,
            ),
            name=f"{NAME}-storage-maintenance",
        )
        stack.push_async_callback(_cancelled, maintenance)
        producer = EventProducer(settings.kafka, f"{NAME}-dlq")
        await producer.start()
        stack.push_async_callback(_closing, "producer", producer.close)
        consumer = kafka.consumer(
            settings.kafka,
            settings.group,
            # Range assignment gives one consumer the same partition number of both topics;
            # both are keyed by request id, so a label usually meets its prediction's consumer.
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await kafka.start_with_retry(consumer, settings.kafka)
        stack.push_async_callback(_closing, "consumer", consumer.stop)
        logger = FeatureLogger(
            prediction_log,
            store,
            predictions_topic=settings.kafka.topic(Topic.PREDICTIONS),
            pending_retention=timedelta(hours=settings.pending_label_retention_hours),
            sweep_interval_seconds=settings.pending_sweep_interval_seconds,
        )
        # Runs before the clients close; after a clean stop close() has settled the flush.
        stack.push_async_callback(logger.abandon)
        loop = ConsumerLoop(options, consumer, producer, logger)
        install_stop_signals(loop.stop)
        await loop.run()
        log.info("consumption stopped; flushing Parquet and closing")
        await logger.close()
    log.info("stopped cleanly")


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _closing(what: str, close: Callable[[], Awaitable[None]]) -> None:
    log.info("closing the %s", what)
    await close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m consumers.feature_logger``."""
    serve("consumers.feature_logger", FeatureLoggerSettings, run_feature_logger, argv=argv)


if __name__ == "__main__":
    main()
