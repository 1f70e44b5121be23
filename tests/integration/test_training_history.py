"""The retrain extract's history: hot days from Postgres, the days it dropped from the Parquet
lake, every labelled row once."""

from __future__ import annotations

import io
import uuid
from datetime import date, timedelta

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driftloop.settings import ObjectStoreSettings, PostgresSettings
from driftloop.storage.hot_store import ensure_partitions
from driftloop.storage.label_files import LABEL_SCHEMA, label_file_key
from driftloop.training.retrain import read_labelled_rows
from tests.integration.test_compaction import (
    FILES_PER_HOUR,
    HOURS,
    ROWS_PER_FILE,
    Layout,
    layout,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.integration

HOT_DAY = HOURS[0] + timedelta(days=1)
"""The day Postgres still holds; the layout's files are the day before, dropped from it."""
HOT_ROWS = 40


async def label_the_old_day(built: Layout) -> set[str]:
    """Label every other row of the files (a label file, as maintenance exports it before the
    day is dropped); nothing of that day is left in Postgres."""
    ids, moments = [], []
    for row in await built.pool.fetch("SELECT object_key FROM feature_files"):
        response = await built.s3.get_object(Bucket=built.bucket, Key=row["object_key"])
        table = pq.read_table(io.BytesIO(await response["Body"].read()))
        ids += table.column("request_id").to_pylist()
        moments += table.column("predicted_at").to_pylist()
    chosen = sorted(ids)[::2]
    at = dict(zip(ids, moments, strict=True))
    table = pa.table(
        {
            "request_id": chosen,
            "predicted_at": [at[rid] for rid in chosen],
            "model_version": [1] * len(chosen),
            "label": [1.0] * len(chosen),
            "observed_at": [at[rid] for rid in chosen],
        },
        schema=LABEL_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    day: date = HOURS[0].date()
    key = label_file_key(f"{built.prefix}labels/", "bikeshare", day)
    await built.s3.put_object(Bucket=built.bucket, Key=key, Body=sink.getvalue())
    await built.pool.execute(
        "INSERT INTO label_files (model_name, day, object_key, row_count, watermark) "
        "VALUES ('bikeshare', $1, $2, $3, now())",
        day,
        key,
        len(chosen),
    )
    return set(chosen)


async def log_hot_rows(built: Layout) -> set[str]:
    """Labelled rows of the hot day, in Postgres only (not flushed to Parquet yet)."""
    ids = [f"{built.schema}-hot-{index}" for index in range(HOT_ROWS)]
    moments = [HOT_DAY + timedelta(minutes=index) for index in range(HOT_ROWS)]
    async with built.pool.acquire() as connection:
        await ensure_partitions(connection, {HOT_DAY.date()})
        await connection.executemany(
            "INSERT INTO prediction_log (request_id, event_id, predicted_at, model_name, "
            "model_version, run_id, features, prediction, latency_ms, source, kafka_partition, "
            "kafka_offset) VALUES ($1, $2, $3, 'bikeshare', 1, 'run', $4, 1.0, 1.0, 'http', 0, $5)",
            [
                (rid, uuid.uuid4(), moment, orjson.dumps({"temp": 0.25}).decode(), index)
                for index, (rid, moment) in enumerate(zip(ids, moments, strict=True))
            ],
        )
        await connection.executemany(
            "INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id) "
            "VALUES ($1, $2, 2.0, $2, $3)",
            [(rid, moment, uuid.uuid4()) for rid, moment in zip(ids, moments, strict=True)],
        )
    return set(ids)


async def test_history_older_than_the_hot_store_comes_from_parquet(
    layout: Layout,  # noqa: F811 - the fixture
    postgres_settings: PostgresSettings,
    object_store_settings: ObjectStoreSettings,
) -> None:
    old = await label_the_old_day(layout)
    hot = await log_hot_rows(layout)
    cutoff = HOT_DAY + timedelta(hours=23)
    arguments = (postgres_settings, layout.schema, "bikeshare", 1)

    everything = await read_labelled_rows(
        *arguments, cutoff=cutoff, limit=10_000, object_store=object_store_settings
    )
    hot_only = await read_labelled_rows(*arguments, cutoff=cutoff, limit=10_000)
    newest = await read_labelled_rows(
        *arguments, cutoff=cutoff, limit=HOT_ROWS + 10, object_store=object_store_settings
    )

    ids = [row["request_id"] for row in everything]
    assert len(ids) == len(set(ids)) == len(hot) + len(old)
    assert set(ids) == hot | old
    assert len(old) == len(HOURS) * FILES_PER_HOUR * ROWS_PER_FILE // 2
    assert {row["request_id"] for row in hot_only} == hot
    # Newest first: the hot rows, then the newest of the lake's.
    moments = [row["predicted_at"] for row in everything]
    assert moments == sorted(moments, reverse=True)
    assert [row["request_id"] for row in newest] == ids[: HOT_ROWS + 10]
    lake_row = everything[-1]
    assert lake_row["features"] == {"temp": 0.5}
    assert lake_row["label"] == 1.0
    assert lake_row["prediction"] == float(lake_row["request_id"].rsplit("-", 1)[1])
