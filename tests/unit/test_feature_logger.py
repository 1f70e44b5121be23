"""The feature logger without anything running: migrations, Parquet buffering, settings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from consumers.feature_logger import FeatureLoggerSettings
from driftloop.consumer_loop import Delivery
from driftloop.featurestore import FeatureStore, PartitionKey, feature_column
from driftloop.migrations import MigrationError, shipped_migrations
from schemas.events import PredictionEvent
from schemas.features import load_feature_spec

TOPIC = "predictions"
TP0 = TopicPartition(TOPIC, 0)
TP1 = TopicPartition(TOPIC, 1)


def delivery(offset: int, partition: int = 0, hour: int = 10) -> Delivery[PredictionEvent]:
    event = PredictionEvent(
        request_id=f"r-{partition}-{offset}",
        model_name="bikeshare",
        model_version=2,
        run_id=uuid.uuid4().hex,
        features={"season": 1, "mnth": "Jan", "hr": 3, "temp": 0.5, "weathersit": None},
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
    keys = sorted(feature_store._buffer.rows, key=lambda key: key.hour)
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
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEATURE_LOGGER_DB_SCHEMA", "t_abc")
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "x")
    settings: Any = FeatureLoggerSettings()
    assert settings.db_schema == "t_abc"
    assert settings.metrics_port == 9101
    with pytest.raises(ValidationError):
        FeatureLoggerSettings(db_schema="drop table; --")
