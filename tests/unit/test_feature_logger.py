"""The feature logger without anything running: migrations, Parquet buffering, settings."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from consumers.feature_logger import FeatureLogger, FeatureLoggerSettings
from driftloop.events.consumer_loop import Delivery
from driftloop.storage.featurestore import FeatureStore, PartitionKey, feature_column, parquet_file
from driftloop.storage.migrations import MigrationError, shipped_migrations
from driftloop.storage.prediction_log import PredictionLog, SweepCounts, WriteCounts
from schemas.events import PredictionEvent
from schemas.features import load_feature_spec

TOPIC = "predictions"
TP0 = TopicPartition(TOPIC, 0)
TP1 = TopicPartition(TOPIC, 1)


def delivery(
    offset: int,
    partition: int = 0,
    hour: int = 10,
    features: dict[str, int | float | str | None] | None = None,
    model_name: str = "bikeshare",
) -> Delivery[PredictionEvent]:
    event = PredictionEvent(
        request_id=f"r-{partition}-{offset}",
        model_name=model_name,
        model_version=2,
        run_id=uuid.uuid4().hex,
        features=features
        if features is not None
        else {"season": 1, "mnth": "Jan", "hr": 3, "temp": 0.5, "weathersit": None},
        prediction=12.5,
        latency_ms=1.0,
        source="http",
        occurred_at=datetime(2026, 1, 5, hour, 30, tzinfo=UTC),
    )
    return Delivery(event, TOPIC, partition, offset)


def store(committed: dict[TopicPartition, int | None]) -> FeatureStore:
    feature_store = FeatureStore(
        pool=None,
        s3=None,  # type: ignore[arg-type]
        bucket="bucket",
        prefix="features/",
        flush_interval_seconds=60,
        max_buffered_rows=10,
        specs=[load_feature_spec("bikeshare")],
    )
    feature_store._committed.update(committed)
    return feature_store


def test_migrations_are_numbered_without_gaps_and_checksummed() -> None:
    migrations = shipped_migrations()
    assert [migration.version for migration in migrations] == list(range(1, len(migrations) + 1))
    assert "prediction_log" in migrations[0].sql
    assert len({migration.checksum for migration in migrations}) == len(migrations)


def test_a_misnamed_or_missing_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "0003_third.sql").write_text("SELECT 3;")
    with pytest.raises(MigrationError, match="without gaps"):
        shipped_migrations(tmp_path)
    (tmp_path / "two.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError, match="NNNN_name"):
        shipped_migrations(tmp_path)


def test_buffer_skips_what_the_files_hold_and_what_it_already_has() -> None:
    feature_store = store({TP0: 5, TP1: None})
    assert feature_store.add([delivery(offset) for offset in range(8)]) == 3  # 5, 6, 7
    # A batch retried after a failed write adds nothing.
    assert feature_store.add([delivery(offset) for offset in range(8)]) == 0
    assert feature_store.add([delivery(0, partition=1)]) == 1
    # A partition this consumer does not own (revoked meanwhile) is ignored.
    assert feature_store.add([delivery(0, partition=2)]) == 0
    assert feature_store.buffered_rows == 4


def test_only_the_record_that_logged_a_request_first_becomes_a_row() -> None:
    feature_store = store({TP0: 0})
    added = feature_store.add([delivery(0), delivery(1), delivery(2)], frozenset({(0, 1)}))
    assert added == 1
    # The skipped records still count as seen: a later batch does not reconsider them.
    assert feature_store.add([delivery(0), delivery(2)]) == 0


def test_rows_are_grouped_by_model_date_and_hour() -> None:
    feature_store = store({TP0: 0})
    feature_store.add([delivery(0, hour=9), delivery(1, hour=9), delivery(2, hour=10)])
    keys = sorted(feature_store._buffer.files, key=lambda key: key.hour)
    assert [key.hour for key in keys] == [9, 10]
    assert keys[0].object_key("features/", "f1") == (
        "features/model=bikeshare/date=2026-01-05/hour=09/f1.parquet"
    )


def test_a_full_buffer_is_due_at_once() -> None:
    feature_store = store({TP0: 0})
    feature_store.add([delivery(offset) for offset in range(3)])
    assert not feature_store.flush_due()
    feature_store.add([delivery(offset) for offset in range(3, 12)])
    assert feature_store.flush_due()


def test_parquet_columns_follow_the_declaration() -> None:
    feature_store = store({TP0: 0})
    rows = [delivery(3), delivery(4)]
    table, offsets = feature_store._table(
        PartitionKey("bikeshare", rows[0].event.occurred_at.date(), 10), rows
    )
    assert table.schema.field("hr").type == pa.int64()
    assert table.schema.field("temp").type == pa.float64()
    assert table.schema.field("mnth").type == pa.string()
    # Declared features missing from an event are null columns of the declared type.
    assert table.column("windspeed").to_pylist() == [None, None]
    assert table.column("kafka_offset").to_pylist() == [3, 4]
    assert offsets == b'{"predictions:0":[3,4]}'


def test_a_feature_named_like_a_base_column_is_renamed() -> None:
    assert feature_column("prediction") == "feature_prediction"
    assert feature_column("temp") == "temp"


def test_settings_have_their_prefix_and_refuse_a_bad_schema(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No .env: a checkout's own (a stack on shifted ports) must not change the defaults.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEATURE_LOGGER_METRICS_PORT", raising=False)
    monkeypatch.setenv("FEATURE_LOGGER_DB_SCHEMA", "t_abc")
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "x")
    settings: Any = FeatureLoggerSettings()
    assert settings.db_schema == "t_abc"
    assert settings.metrics_port == 9101
    with pytest.raises(ValidationError):
        FeatureLoggerSettings(db_schema="drop table; --")


def buffered_file(feature_store: FeatureStore, key: PartitionKey) -> tuple[pa.Table, bytes]:
    """The file a flush writes for ``key``: the batches converted at add time, or ``_table``."""
    file = feature_store._buffer.files[key]
    if file.batches is None:
        return feature_store._table(key, file.rows)
    return pa.Table.from_batches(file.batches), orjson.dumps(file.offsets)


@pytest.mark.parametrize(
    ("off_declaration", "converted_at_add"),
    [
        ({}, True),
        ({"temp": 1, "extra": "ignored"}, True),  # an int is a float; undeclared keys are not kept
        ({"hr": "three"}, False),  # off its declaration: the file falls back as a whole
        ({"hr": 2**70}, False),
    ],
)
def test_batches_converted_at_add_make_the_file_table_makes(
    off_declaration: dict[str, Any], converted_at_add: bool
) -> None:
    feature_store = store({TP0: 0, TP1: 0})
    features: dict[str, Any] = {
        "season": 1,
        "mnth": "Jan",
        "hr": 3,
        "temp": 0.5,
        "weathersit": None,
    }
    # Two batches, partitions interleaved, one row off the declaration in the second.
    feature_store.add([delivery(offset, partition=offset % 2) for offset in range(4)])
    feature_store.add(
        [delivery(4, features={**features, **off_declaration}), delivery(5, partition=1)]
    )
    key = next(iter(feature_store._buffer.files))
    file = feature_store._buffer.files[key]
    assert (file.batches is not None) is converted_at_add
    rows = file.rows
    assert [row.offset for row in rows] == [0, 1, 2, 3, 4, 5]
    if off_declaration.get("hr") == 2**70:
        with pytest.raises(OverflowError):  # as before: a flush of such a row fails
            feature_store._table(key, rows)
        return
    table, offsets = buffered_file(feature_store, key)
    reference, reference_offsets = feature_store._table(key, rows)
    assert table.schema.equals(reference.schema, check_metadata=True)
    assert table.equals(reference)
    assert offsets == reference_offsets == b'{"predictions:0":[0,4],"predictions:1":[1,5]}'
    assert table.column("event_id").to_pylist() == [str(row.event.event_id) for row in rows]
    assert table.column("predicted_at").to_pylist() == [row.event.occurred_at for row in rows]
    written = pq.read_table(io.BytesIO(parquet_file(table, offsets)))
    assert written.schema.metadata[b"driftloop.kafka_offsets"] == offsets
    assert written.column("hr").type == (pa.int64() if converted_at_add else pa.string())


def test_an_undeclared_model_infers_its_columns_at_flush() -> None:
    feature_store = store({TP0: 0})
    feature_store.add(
        [
            delivery(0, model_name="other", features={"a": 1, "b": "x"}),
            delivery(1, model_name="other", features={"a": 2.5, "c": None}),
        ]
    )
    key = next(iter(feature_store._buffer.files))
    assert feature_store._buffer.files[key].batches is None
    table, _ = buffered_file(feature_store, key)
    assert table.column_names[-3:] == ["a", "b", "c"]
    assert table.column("a").to_pylist() == [1.0, 2.5]
    assert table.column("c").type == pa.null()


class FakeLog:
    """The prediction log of the FeatureLogger tests: records its writes."""

    def __init__(self) -> None:
        self.writes = 0
        self.written = asyncio.Event()

    async def write(self, predictions: Sequence[Any], labels: Sequence[Any]) -> WriteCounts:
        await asyncio.sleep(0)
        self.writes += 1
        self.written.set()
        return WriteCounts(predictions_inserted=len(predictions))

    async def sweep_pending_labels(self, retention: timedelta) -> SweepCounts:
        return SweepCounts(0, 0)


class FakeStore:
    """A feature store whose flushes wait for the test, and fail when it says so."""

    def __init__(self, max_buffered_rows: int = 100) -> None:
        self.max_buffered_rows = max_buffered_rows
        self.buffered_rows = 0
        self.added: list[int] = []
        self.flushes = 0
        self.released = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.flushing = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.in_flight = False

    def add(self, deliveries: Sequence[Any], first_records: Any = None) -> int:
        assert not self.in_flight, "add while a flush is in flight"
        self.added.append(len(deliveries))
        self.buffered_rows += len(deliveries)
        return len(deliveries)

    def flush_due(self) -> bool:
        return self.buffered_rows > 0

    async def flush(self) -> int:
        assert not self.in_flight, "two flushes at once"
        self.in_flight = True
        self.flushes += 1
        self.flushing.set()
        try:
            await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            rows, self.buffered_rows = self.buffered_rows, 0
            return rows
        finally:
            self.in_flight = False

    def release(self, partitions: Any) -> None:
        assert not self.in_flight, "release while a flush is in flight"
        self.released = True


def feature_logger(fake_store: FakeStore) -> tuple[FeatureLogger, FakeLog]:
    fake_log = FakeLog()
    logger = FeatureLogger(
        cast("PredictionLog", fake_log),
        cast("FeatureStore", fake_store),
        predictions_topic=TOPIC,
        pending_retention=timedelta(days=7),
        sweep_interval_seconds=3600,
    )
    return logger, fake_log


async def test_a_due_flush_runs_beside_the_next_postgres_write() -> None:
    fake_store = FakeStore()
    logger, fake_log = feature_logger(fake_store)
    fake_store.gate.clear()
    await logger.write([delivery(0)])  # returns with its flush in flight
    await fake_store.flushing.wait()
    assert fake_store.in_flight
    fake_log.written.clear()
    second = asyncio.create_task(logger.write([delivery(1)]))
    await fake_log.written.wait()
    # The second batch is in Postgres while the flush goes on; it joins the buffer after it.
    assert fake_store.added == [1]
    fake_store.gate.set()
    await second
    assert fake_store.added == [1, 1]
    assert fake_store.flushes == 2  # the second batch's own flush, in flight in turn
    await logger.close()
    assert not fake_store.in_flight


async def test_a_failed_background_flush_is_retried_after_a_backoff() -> None:
    fake_store = FakeStore()
    logger, _ = feature_logger(fake_store)
    fake_store.fail_with = OSError("object store down")
    await logger.write([delivery(0)])
    await logger.write([delivery(1)])  # takes the failure: counted, not raised
    assert fake_store.flushes == 1  # no new attempt before the backoff
    assert fake_store.buffered_rows == 2
    logger._next_flush_attempt = 0.0
    fake_store.fail_with = None
    await logger.write([])
    await logger.write([])
    assert fake_store.flushes == 2
    assert fake_store.buffered_rows == 0


async def test_a_full_buffer_that_cannot_be_flushed_fails_the_write() -> None:
    fake_store = FakeStore(max_buffered_rows=1)
    logger, _ = feature_logger(fake_store)
    fake_store.fail_with = OSError("object store down")
    with pytest.raises(OSError, match="down"):
        # Full: its flush is waited for, and its failure pauses consumption (the loop retries).
        await logger.write([delivery(0)])
    assert fake_store.flushes == 1
    fake_store.fail_with = None
    await logger.write([delivery(0)])  # the retry flushes at once, no backoff of its own
    assert fake_store.flushes == 2
    assert fake_store.buffered_rows == 0


async def test_a_non_transient_background_failure_raises_from_the_next_write() -> None:
    fake_store = FakeStore()
    logger, _ = feature_logger(fake_store)
    fake_store.fail_with = RuntimeError("fenced")
    await logger.write([delivery(0)])
    with pytest.raises(RuntimeError, match="fenced"):
        await logger.write([delivery(1)])


async def test_a_revoke_waits_for_the_flush_in_flight_then_flushes_and_releases() -> None:
    fake_store = FakeStore()
    logger, _ = feature_logger(fake_store)
    fake_store.gate.clear()
    await logger.write([delivery(0)])
    await fake_store.flushing.wait()
    revoking = asyncio.create_task(logger.on_revoked(frozenset({TP0})))
    await asyncio.sleep(0.01)
    assert not revoking.done()  # release, its last step, waits for the flush
    fake_store.gate.set()
    await revoking
    assert fake_store.released
    assert fake_store.flushes == 2  # the revoke's own flush (of nothing left) after it


async def test_a_revoke_retries_a_flush_that_failed_in_flight() -> None:
    fake_store = FakeStore()
    logger, _ = feature_logger(fake_store)
    fake_store.gate.clear()
    fake_store.fail_with = OSError("object store down")
    await logger.write([delivery(0)])
    await fake_store.flushing.wait()
    revoking = asyncio.create_task(logger.on_revoked(frozenset({TP0})))
    await asyncio.sleep(0.01)
    fake_store.fail_with = None
    fake_store.gate.set()
    await revoking
    assert fake_store.flushes == 2
    assert fake_store.buffered_rows == 0
    assert fake_store.released


async def test_a_cancelled_write_leaves_the_flush_to_finish_for_close() -> None:
    fake_store = FakeStore()
    logger, _ = feature_logger(fake_store)
    fake_store.gate.clear()
    await logger.write([delivery(0)])
    await fake_store.flushing.wait()
    second = asyncio.create_task(logger.write([delivery(1)]))
    await asyncio.sleep(0.01)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert fake_store.in_flight is True  # the flush itself was not cancelled
    fake_store.gate.set()
    await logger.abandon()
    assert logger._flushing is None
    assert fake_store.buffered_rows == 0
