"""The bounded hot store on the real Postgres: the upgrade of unpartitioned tables, request-id
uniqueness across daily partitions, and partition drops that lose nothing inside the hot window.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from driftloop.events.consumer_loop import Delivery
from driftloop.settings import PostgresSettings
from driftloop.storage.hot_store import existing_days, maintain
from driftloop.storage.migrations import MIGRATIONS_DIR, apply_migrations
from driftloop.storage.prediction_log import PredictionLog, open_prediction_log
from schemas.events import GroundTruth, PredictionEvent

pytestmark = pytest.mark.integration

RUN_ID = uuid.uuid4().hex
MIDNIGHT = datetime(2026, 3, 10, tzinfo=UTC)


def delivery(request_id: str, moment: datetime, offset: int) -> Delivery[PredictionEvent]:
    event = PredictionEvent(
        request_id=request_id,
        model_name="bikeshare",
        model_version=1,
        run_id=RUN_ID,
        features={"season": 1, "mnth": "March", "hr": moment.hour, "temp": 0.3},
        prediction=float(offset),
        latency_ms=1.0,
        source="http",
        occurred_at=moment,
    )
    return Delivery(event, "predictions", 0, offset)


def label(request_id: str, value: float, observed_at: datetime) -> GroundTruth:
    return GroundTruth(request_id=request_id, label=value, observed_at=observed_at)


@pytest.fixture
async def admin(
    unique: str, postgres_settings: PostgresSettings
) -> AsyncIterator[asyncpg.Connection]:
    """A connection working in the test's own schema, dropped afterwards."""
    connection = await asyncpg.connect(postgres_settings.dsn())
    await connection.execute(f"CREATE SCHEMA {unique}")
    await connection.execute(f"SET search_path TO {unique}")
    try:
        yield connection
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await connection.close()


@pytest.fixture
async def prediction_log(
    unique: str, postgres_settings: PostgresSettings, admin: asyncpg.Connection
) -> AsyncIterator[PredictionLog]:
    log = await open_prediction_log(postgres_settings, unique)
    try:
        yield log
    finally:
        await log.close()


async def logged(connection: asyncpg.Connection) -> dict[str, datetime]:
    rows = await connection.fetch("SELECT request_id, predicted_at FROM prediction_log")
    return {row["request_id"]: row["predicted_at"] for row in rows}


async def test_upgrade_converts_the_unpartitioned_tables_with_every_row(
    admin: asyncpg.Connection, unique: str, tmp_path: Path
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in MIGRATIONS_DIR.glob("000[1-5]_*.sql"):
        shutil.copy(path, before / path.name)
    await apply_migrations(admin, unique, before)
    moments = [MIDNIGHT - timedelta(days=1, hours=1), MIDNIGHT - timedelta(seconds=1), MIDNIGHT]
    for index, moment in enumerate(moments):
        await admin.execute(
            """
            INSERT INTO prediction_log (request_id, event_id, predicted_at, model_name,
                model_version, run_id, features, prediction, latency_ms, source,
                kafka_partition, kafka_offset)
            VALUES ($1, $2, $3, 'bikeshare', 1, 'run', '{"temp": 0.3}', $4, 1.0, 'http', 0, $5)
            """,
            f"old-{index}",
            uuid.uuid4(),
            moment,
            float(index),
            index,
        )
    await admin.execute(
        "INSERT INTO labels (request_id, label, observed_at, event_id) VALUES ($1, 7.0, $2, $3)",
        "old-1",
        MIDNIGHT,
        uuid.uuid4(),
    )

    # 0006 partitions the tables; every later migration is applied after it.
    later = sorted(int(path.name[:4]) for path in MIGRATIONS_DIR.glob("*.sql"))[5:]
    assert later[0] == 6
    assert await apply_migrations(admin, unique) == later

    assert await logged(admin) == {f"old-{i}": moment for i, moment in enumerate(moments)}
    days = await existing_days(admin)
    expected_days = {date(2026, 3, 8), date(2026, 3, 9), date(2026, 3, 10)}
    assert days == {"prediction_log": expected_days, "labels": expected_days}
    # Each row sits in its own day's partition.
    placed = await admin.fetch(
        "SELECT request_id, tableoid::regclass::text AS part FROM prediction_log ORDER BY 1"
    )
    assert [row["part"] for row in placed] == [
        "prediction_log_p20260308",
        "prediction_log_p20260309",
        "prediction_log_p20260310",
    ]
    label_row = await admin.fetchrow(
        "SELECT predicted_at, label, tableoid::regclass::text AS part FROM labels"
    )
    assert label_row is not None
    assert (label_row["predicted_at"], label_row["label"]) == (moments[1], 7.0)
    assert label_row["part"] == "labels_p20260309"


async def test_replay_across_a_partition_boundary_logs_each_request_once(
    prediction_log: PredictionLog, admin: asyncpg.Connection
) -> None:
    batch = [
        delivery("late-evening", MIDNIGHT - timedelta(microseconds=1), 0),
        delivery("midnight", MIDNIGHT, 1),
        delivery("next-morning", MIDNIGHT + timedelta(hours=9), 2),
    ]
    first = await prediction_log.write(batch, [])
    assert (first.predictions_inserted, first.predictions_duplicate) == (3, 0)

    # The same records again (a Kafka replay), and a client retry of two request ids whose new
    # events fall in the other day: nothing is added, and the first records stay the logged ones.
    retries = [
        delivery("late-evening", MIDNIGHT + timedelta(minutes=5), 3),
        delivery("next-morning", MIDNIGHT - timedelta(hours=2), 4),
    ]
    again = await prediction_log.write([*batch, *retries], [])
    assert (again.predictions_inserted, again.predictions_duplicate) == (0, 5)
    assert again.first_records == frozenset({(0, 0), (0, 1), (0, 2)})
    assert await logged(admin) == {
        "late-evening": MIDNIGHT - timedelta(microseconds=1),
        "midnight": MIDNIGHT,
        "next-morning": MIDNIGHT + timedelta(hours=9),
    }

    # Inside one batch too: the first record of a request wins, whichever day the next one is in.
    same_batch = [
        delivery("twice", MIDNIGHT + timedelta(hours=1), 5),
        delivery("twice", MIDNIGHT - timedelta(hours=1), 6),
    ]
    counts = await prediction_log.write(same_batch, [])
    assert (counts.predictions_inserted, counts.predictions_duplicate) == (1, 1)
    assert (await logged(admin))["twice"] == MIDNIGHT + timedelta(hours=1)

    # Labels join their predictions on both sides of the boundary, each in its prediction's day.
    labelled = await prediction_log.write(
        [],
        [
            label("late-evening", 1.0, MIDNIGHT + timedelta(hours=10)),
            label("midnight", 2.0, MIDNIGHT + timedelta(hours=10)),
        ],
    )
    assert labelled.labels_written == 2
    rows = await admin.fetch(
        "SELECT request_id, tableoid::regclass::text AS part FROM labels ORDER BY request_id"
    )
    assert [(row["request_id"], row["part"]) for row in rows] == [
        ("late-evening", "labels_p20260309"),
        ("midnight", "labels_p20260310"),
    ]


async def test_partition_drop_loses_nothing_inside_the_hot_window(
    prediction_log: PredictionLog, admin: asyncpg.Connection
) -> None:
    now = datetime(2026, 3, 20, 15, 30, tzinfo=UTC)
    retention = timedelta(days=7)
    horizon = now - retention  # 2026-03-13 15:30
    # A row every 5 hours over 12 days, and rows right around the horizon.
    moments = [now - timedelta(hours=5 * step) for step in range(12 * 24 // 5)]
    moments += [horizon - timedelta(microseconds=1), horizon, horizon + timedelta(microseconds=1)]
    batch = [delivery(f"r{index}", moment, index) for index, moment in enumerate(moments)]
    assert (await prediction_log.write(batch, [])).predictions_inserted == len(batch)
    labels = [label(f"r{index}", float(index), now) for index in range(len(batch))]
    assert (await prediction_log.write([], labels)).labels_written == len(batch)

    report = await maintain(admin, retention=retention, ahead_days=2, now=now)

    assert not report.skipped
    assert report.horizon == horizon
    kept = {f"r{index}": moment for index, moment in enumerate(moments) if moment >= horizon}
    remaining = await logged(admin)
    # Nothing at or after the horizon is lost; whole days before it are gone; the horizon's
    # own day stays whole (its rows before the horizon go with the day, later).
    assert kept.items() <= remaining.items()
    horizon_day = datetime(2026, 3, 13, tzinfo=UTC)
    assert min(remaining.values()) >= horizon_day
    assert remaining == {
        f"r{index}": moment for index, moment in enumerate(moments) if moment >= horizon_day
    }
    label_ids = {row["request_id"] for row in await admin.fetch("SELECT request_id FROM labels")}
    assert label_ids == set(remaining)
    days = await existing_days(admin)
    assert min(days["prediction_log"]) == date(2026, 3, 13)
    assert {date(2026, 3, 21), date(2026, 3, 22)} <= days["prediction_log"]
    assert days["labels"] == days["prediction_log"]
    assert "prediction_log_p20260312" in report.dropped
    assert "labels_p20260312" in report.dropped

    # Idempotent: a second run finds nothing to do.
    second = await maintain(admin, retention=retention, ahead_days=2, now=now)
    assert (second.created, second.dropped) == ((), ())

    # A late row for a dropped day: the writer knew that day's partition, makes it again, and
    # logs the row (the next maintenance drops it with its day).
    late = await prediction_log.write([delivery("late", moments[-4], 10_000)], [])
    assert late.predictions_inserted == 1
    assert "late" in await logged(admin)


async def test_one_maintenance_at_a_time_per_schema(
    admin: asyncpg.Connection, unique: str, postgres_settings: PostgresSettings
) -> None:
    await apply_migrations(admin, unique)
    other = await asyncpg.connect(postgres_settings.dsn(), server_settings={"search_path": unique})
    try:
        async with other.transaction():
            # A maintenance in progress: it holds the schema's lock to its transaction's end.
            running = await maintain(other, retention=timedelta(days=3), now=MIDNIGHT)
            assert not running.skipped
            assert running.created
            skipped = await maintain(admin, retention=timedelta(days=3), now=MIDNIGHT)
            assert skipped.skipped
    finally:
        await other.close()
    done = await maintain(admin, retention=timedelta(days=3), now=MIDNIGHT)
    assert not done.skipped
    assert (done.created, done.dropped) == ((), ())
