"""The prediction log in Postgres: idempotent micro-batch writes of predictions and labels.

A batch is copied (binary ``COPY``) into session-local staging tables, then inserted with
``ON CONFLICT`` in the same transaction, so a batch replayed after a crash adds nothing. Both
tables are partitioned by day of prediction time (``driftloop.storage.hot_store``): a batch creates
the partitions of its days when they are missing, and a request id stays unique across partitions
(see ``_INSERT_PREDICTIONS``). The rows a batch logged first are sketched for the drift
monitor by slice of prediction time (``driftloop.drift.slices``), and the sketches written in
that transaction too. A label whose prediction is not logged yet waits in
``pending_labels``; it moves to ``labels`` when its prediction arrives (or at the next sweep),
and is deleted after the retention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

import asyncpg
import orjson

from driftloop.drift.slices import SLICE_COLUMNS, LayoutCache, slice_deltas
from driftloop.events.consumer_loop import Delivery
from driftloop.settings import PostgresSettings
from driftloop.storage.database import open_migrated_pool
from driftloop.storage.hot_store import ensure_partitions, partition_day
from schemas.events import GroundTruth, PredictionEvent

PREDICTION_COLUMNS: Final = (
    "request_id",
    "event_id",
    "predicted_at",
    "model_name",
    "model_version",
    "run_id",
    "features",
    "prediction",
    "latency_ms",
    "source",
    "kafka_partition",
    "kafka_offset",
)
LABEL_COLUMNS: Final = ("request_id", "label", "observed_at", "event_id")

# Postgres errors that mean "the database is not reachable right now", not "this data is bad".

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staged_predictions
    (LIKE prediction_log INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS staged_labels
    (LIKE pending_labels INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
"""
# Partitions are by prediction time, so the primary key is (request_id, predicted_at): a replay
# of the same event meets its first copy there. Another event reusing a logged request id (a
# client retrying with the same X-Request-ID, so another timestamp) is refused by the anti-join,
# which probes the primary key's index (request_id first) of each partition; the first record
# of a request within the batch wins, as it would one by one.
_INSERT_PREDICTIONS = """
INSERT INTO prediction_log (request_id, event_id, predicted_at, model_name, model_version,
                            run_id, features, prediction, latency_ms, source,
                            kafka_partition, kafka_offset)
SELECT DISTINCT ON (s.request_id)
       s.request_id, s.event_id, s.predicted_at, s.model_name, s.model_version,
       s.run_id, s.features, s.prediction, s.latency_ms, s.source, s.kafka_partition,
       s.kafka_offset
FROM staged_predictions s
WHERE NOT EXISTS (SELECT 1 FROM prediction_log p WHERE p.request_id = s.request_id)
ORDER BY s.request_id, s.kafka_partition, s.kafka_offset
ON CONFLICT (request_id, predicted_at) DO NOTHING
"""
# The anti-join above sees only committed rows: two writers of the same Kafka partition (a
# rebalance hands it over while the old owner still writes) take turns. The topic is keyed by
# request id, so every event of one request is on one partition.
_LOCK_KAFKA_PARTITIONS = """
SELECT pg_advisory_xact_lock(hashtext('driftloop.storage.prediction_log.' || current_schema()), k)
FROM (SELECT DISTINCT kafka_partition AS k FROM staged_predictions ORDER BY 1) AS partitions
"""
# Which records of the batch logged their request first (a replayed or duplicate record did not).
_FIRST_RECORDS = """
SELECT s.kafka_partition, s.kafka_offset
FROM staged_predictions s JOIN prediction_log p USING (request_id)
WHERE p.kafka_partition = s.kafka_partition AND p.kafka_offset = s.kafka_offset
"""
# A later observation of the same request's label replaces an earlier one; a replay of the same
# label changes nothing. DISTINCT ON keeps one row per key, as ON CONFLICT DO UPDATE requires.
# A label is stored in its prediction's day (labels.predicted_at), so both leave together.
_INSERT_KNOWN_LABELS = """
INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id)
SELECT DISTINCT ON (s.request_id) s.request_id, p.predicted_at, s.label, s.observed_at,
       s.event_id
FROM staged_labels s JOIN prediction_log p USING (request_id)
ORDER BY s.request_id, s.observed_at DESC
ON CONFLICT (request_id, predicted_at) DO UPDATE
SET label = EXCLUDED.label, observed_at = EXCLUDED.observed_at, event_id = EXCLUDED.event_id
WHERE labels.observed_at < EXCLUDED.observed_at
"""
_INSERT_PENDING_LABELS = """
INSERT INTO pending_labels (request_id, label, observed_at, event_id)
SELECT DISTINCT ON (s.request_id) s.request_id, s.label, s.observed_at, s.event_id
FROM staged_labels s
WHERE NOT EXISTS (SELECT 1 FROM prediction_log p WHERE p.request_id = s.request_id)
ORDER BY s.request_id, s.observed_at DESC
ON CONFLICT (request_id) DO UPDATE
SET label = EXCLUDED.label, observed_at = EXCLUDED.observed_at, event_id = EXCLUDED.event_id
WHERE pending_labels.observed_at < EXCLUDED.observed_at
"""
# Pending labels whose prediction is now logged: those of this batch's predictions, or (the
# sweep) all of them, which catches a label and its prediction committed concurrently.
_MOVE_PENDING_OF_BATCH = """
WITH moved AS (
    DELETE FROM pending_labels l USING staged_predictions s
    WHERE l.request_id = s.request_id
    RETURNING l.request_id, l.label, l.observed_at, l.event_id
)
INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id)
SELECT DISTINCT ON (m.request_id) m.request_id, p.predicted_at, m.label, m.observed_at,
       m.event_id
FROM moved m JOIN prediction_log p USING (request_id)
ORDER BY m.request_id
ON CONFLICT (request_id, predicted_at) DO UPDATE
SET label = EXCLUDED.label, observed_at = EXCLUDED.observed_at, event_id = EXCLUDED.event_id
WHERE labels.observed_at < EXCLUDED.observed_at
"""
_MOVE_ALL_PENDING = """
WITH moved AS (
    DELETE FROM pending_labels l USING prediction_log p
    WHERE l.request_id = p.request_id
    RETURNING l.request_id, p.predicted_at, l.label, l.observed_at, l.event_id
)
INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id)
SELECT request_id, predicted_at, label, observed_at, event_id FROM moved
ON CONFLICT (request_id, predicted_at) DO UPDATE
SET label = EXCLUDED.label, observed_at = EXCLUDED.observed_at, event_id = EXCLUDED.event_id
WHERE labels.observed_at < EXCLUDED.observed_at
"""


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """What one batch changed: new rows, and records the log already held."""

    predictions_inserted: int = 0
    predictions_duplicate: int = 0
    labels_written: int = 0
    labels_pending: int = 0
    first_records: frozenset[tuple[int, int]] | None = None
    """(partition, offset) of the records that logged their request first; None: all of them."""
    sketched_rows: int = 0
    """New rows sketched for the drift monitor."""
    unsketched_rows: int = 0
    """New rows of versions with no published layout yet (counted, not sketched)."""
    sketch_seconds: float = 0.0
    """Time spent sketching the new rows (the drift monitor's per-row cost, paid here)."""


@dataclass(frozen=True, slots=True)
class SweepCounts:
    """What a pending-label sweep did."""

    moved: int
    expired: int


def _affected(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 42" or "DELETE 3".
    return int(status.rsplit(" ", 1)[-1])


async def _prepare_session(connection: asyncpg.Connection) -> None:
    await connection.execute(_STAGING)


async def open_prediction_log(
    settings: PostgresSettings,
    schema: str = "public",
    *,
    max_size: int = 2,
    give_up_after_seconds: float = 300.0,
) -> PredictionLog:
    """Apply the migrations to ``schema`` and open a pool whose sessions work in it."""
    pool = await open_migrated_pool(
        settings,
        schema,
        max_size=max_size,
        init=_prepare_session,
        give_up_after_seconds=give_up_after_seconds,
    )
    return PredictionLog(pool, schema)


_LAYOUT = "SELECT layout::text FROM drift_baselines WHERE model_name = $1 AND model_version = $2"


class PredictionLog:
    """Writes predictions and labels to the platform database, idempotently."""

    def __init__(self, pool: asyncpg.Pool, schema: str, *, sketches: bool = True) -> None:
        self.pool = pool
        self.schema = schema
        self.layouts: LayoutCache | None = LayoutCache(self._layout) if sketches else None
        self._partition_days: set[date] = set()
        """Days known to have their partitions (maintenance may drop one: see ``write``)."""

    async def _layout(self, model_name: str, model_version: int) -> str | None:
        document: str | None = await self.pool.fetchval(_LAYOUT, model_name, model_version)
        return document

    async def close(self) -> None:
        await self.pool.close()

    async def write(
        self, predictions: Sequence[Delivery[PredictionEvent]], labels: Sequence[GroundTruth]
    ) -> WriteCounts:
        """Insert a batch in one transaction; rows already logged are left as they are."""
        days = {partition_day(delivery.event.occurred_at) for delivery in predictions}
        await self._ensure_partitions(days - self._partition_days)
        try:
            return await self._write(predictions, labels)
        except asyncpg.CheckViolationError as error:
            # Maintenance dropped a day this process still knew (a row later than the hot
            # retention): the transaction rolled back whole; make the day again and rewrite.
            if "no partition" not in str(error):
                raise
            self._partition_days.clear()
            await self._ensure_partitions(days)
            return await self._write(predictions, labels)

    async def _ensure_partitions(self, days: set[date]) -> None:
        if not days:
            return
        async with self.pool.acquire() as connection:
            await ensure_partitions(connection, days)
        self._partition_days |= days

    async def _write(
        self, predictions: Sequence[Delivery[PredictionEvent]], labels: Sequence[GroundTruth]
    ) -> WriteCounts:
        inserted = labelled = pending = sketched = unsketched = 0
        sketch_seconds = 0.0
        first_records: frozenset[tuple[int, int]] | None = None
        layouts = self.layouts
        if predictions and layouts is not None:
            await layouts.prepare(
                (delivery.event.model_name, delivery.event.model_version)
                for delivery in predictions
            )
        async with self.pool.acquire() as connection, connection.transaction():
            if predictions:
                await connection.copy_records_to_table(
                    "staged_predictions",
                    records=[_prediction_row(delivery) for delivery in predictions],
                    columns=PREDICTION_COLUMNS,
                )
                await connection.execute(_LOCK_KAFKA_PARTITIONS)
                inserted = _affected(await connection.execute(_INSERT_PREDICTIONS))
                if inserted < len(predictions):
                    first_records = frozenset(
                        (row[0], row[1]) for row in await connection.fetch(_FIRST_RECORDS)
                    )
                if layouts is not None and inserted:
                    # Only the rows this batch logged first: a replay sketches nothing twice.
                    first = [
                        delivery.event
                        for delivery in predictions
                        if first_records is None
                        or (delivery.partition, delivery.offset) in first_records
                    ]
                    started = time.perf_counter()
                    deltas = slice_deltas(first, layouts)
                    sketch_seconds = time.perf_counter() - started
                    await connection.copy_records_to_table(
                        "drift_sketches",
                        records=[delta.record() for delta in deltas],
                        columns=SLICE_COLUMNS,
                    )
                    unsketched = sum(delta.unsketched_rows for delta in deltas)
                    sketched = len(first) - unsketched
                labelled += _affected(await connection.execute(_MOVE_PENDING_OF_BATCH))
            if labels:
                await connection.copy_records_to_table(
                    "staged_labels",
                    records=[_label_row(event) for event in labels],
                    columns=LABEL_COLUMNS,
                )
                labelled += _affected(await connection.execute(_INSERT_KNOWN_LABELS))
                pending = _affected(await connection.execute(_INSERT_PENDING_LABELS))
        return WriteCounts(
            inserted,
            len(predictions) - inserted,
            labelled,
            pending,
            first_records,
            sketched,
            unsketched,
            sketch_seconds,
        )

    async def sweep_pending_labels(self, retention: timedelta) -> SweepCounts:
        """Move pending labels whose prediction arrived; delete those older than ``retention``."""
        async with self.pool.acquire() as connection, connection.transaction():
            moved = _affected(await connection.execute(_MOVE_ALL_PENDING))
            expired = _affected(
                await connection.execute(
                    "DELETE FROM pending_labels WHERE received_at < now() - $1::interval",
                    retention,
                )
            )
        return SweepCounts(moved, expired)


def _prediction_row(delivery: Delivery[PredictionEvent]) -> tuple[object, ...]:
    event = delivery.event
    return (
        event.request_id,
        event.event_id,
        event.occurred_at,
        event.model_name,
        event.model_version,
        event.run_id,
        orjson.dumps(event.features).decode(),
        event.prediction,
        event.latency_ms,
        event.source,
        delivery.partition,
        delivery.offset,
    )


def _label_row(event: GroundTruth) -> tuple[object, ...]:
    return (event.request_id, event.label, event.observed_at, event.event_id)
