"""Parquet compaction on the real Postgres and S3 server: kill -9 mid-compaction, then every row
is listed exactly once; a rerun finishes the work and leaves no object outside the manifest."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driftloop.settings import ObjectStoreSettings, PostgresSettings
from driftloop.storage.compaction import compact
from driftloop.storage.database import open_migrated_pool
from driftloop.storage.featurestore import BASE_SCHEMA, PartitionKey, parquet_file
from driftloop.storage.objectstore import s3_client

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.integration

FILES_PER_HOUR = 4
ROWS_PER_FILE = 50
NOW = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)
# Two closed hours, and the hour in progress (not compacted: flushes still land in it).
HOURS = [NOW - timedelta(hours=3), NOW - timedelta(hours=2), NOW]

# Runs one compaction, and stops dead at the named step: the test kills it there.
RUNNER = """
import asyncio, sys
from datetime import datetime
from driftloop.storage.compaction import compact
from driftloop.storage.database import create_pool
from driftloop.storage.objectstore import s3_client
from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings

schema, bucket, stop_at, now = sys.argv[1:5]

async def hook(step):
    if step == stop_at:
        print("reached", step, flush=True)
        await asyncio.Event().wait()

async def main():
    pool = await create_pool(load_settings(PostgresSettings), schema=schema)
    async with s3_client(load_settings(ObjectStoreSettings)) as s3:
        await compact(pool, s3, bucket, now=datetime.fromisoformat(now), on_step=hook)
    print("finished", flush=True)

asyncio.run(main())
"""


@dataclass
class Layout:
    schema: str
    prefix: str
    pool: asyncpg.Pool
    s3: S3Client
    bucket: str
    request_ids: set[str]


async def put_flush_file(layout: Layout, moment: datetime, flush: int, first: int) -> None:
    """A committed flush file of the hour of ``moment``, as the feature-logger writes one."""
    rows = range(first, first + ROWS_PER_FILE)
    ids = [f"{layout.schema}-{index}" for index in rows]
    table = pa.table(
        {
            "request_id": ids,
            "event_id": [str(uuid.uuid4()) for _ in rows],
            "predicted_at": [moment + timedelta(seconds=index % 60) for index in rows],
            "model_name": ["bikeshare"] * len(ids),
            "model_version": [1] * len(ids),
            "run_id": ["run"] * len(ids),
            "prediction": [float(index) for index in rows],
            "latency_ms": [1.0] * len(ids),
            "source": ["http"] * len(ids),
            "kafka_partition": [0] * len(ids),
            "kafka_offset": list(rows),
            "temp": [0.5] * len(ids),
        },
        schema=BASE_SCHEMA.append(pa.field("temp", pa.float64())),
    )
    offsets = orjson.dumps({"predictions:0": [first, first + ROWS_PER_FILE - 1]})
    key = PartitionKey("bikeshare", moment.date(), moment.hour)
    object_key = key.object_key(layout.prefix, f"flush-{flush}")
    await layout.s3.put_object(
        Bucket=layout.bucket, Key=object_key, Body=parquet_file(table, offsets)
    )
    await layout.pool.execute(
        "INSERT INTO feature_files (object_key, flush_id, model_name, partition_date, "
        "partition_hour, row_count, offsets) VALUES ($1, $2, 'bikeshare', $3, $4, $5, $6)",
        object_key,
        f"flush-{flush}",
        key.day,
        key.hour,
        len(ids),
        offsets.decode(),
    )
    layout.request_ids.update(ids)


@pytest.fixture
async def layout(
    unique: str, postgres_settings: PostgresSettings, object_store_settings: ObjectStoreSettings
) -> AsyncIterator[Layout]:
    pool = await open_migrated_pool(postgres_settings, unique)
    try:
        async with s3_client(object_store_settings) as s3:
            built = Layout(
                unique,
                f"tests/{unique}/features/",
                pool,
                s3,
                object_store_settings.data_bucket,
                set(),
            )
            flush = 0
            for moment in HOURS:
                for _ in range(FILES_PER_HOUR):
                    await put_flush_file(built, moment, flush, flush * ROWS_PER_FILE)
                    flush += 1
            yield built
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await pool.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await pool.close()


async def manifest_rows(layout: Layout) -> Counter[str]:
    """How many times each request id appears across the files the manifest lists."""
    seen: Counter[str] = Counter()
    for row in await layout.pool.fetch("SELECT object_key FROM feature_files"):
        response = await layout.s3.get_object(Bucket=layout.bucket, Key=row["object_key"])
        table = pq.read_table(io.BytesIO(await response["Body"].read()), columns=["request_id"])
        seen.update(table.column("request_id").to_pylist())
    return seen


async def stored_keys(layout: Layout) -> set[str]:
    keys: set[str] = set()
    paginator = layout.s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=layout.bucket, Prefix=layout.prefix):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


async def files_per_hour(layout: Layout) -> list[int]:
    rows = await layout.pool.fetch(
        "SELECT count(*) AS files FROM feature_files "
        "GROUP BY partition_date, partition_hour ORDER BY partition_date, partition_hour"
    )
    return [row["files"] for row in rows]


@pytest.mark.parametrize("step", ["put", "swapped"])
async def test_kill_9_mid_compaction_lists_every_row_exactly_once(
    layout: Layout, step: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUNNER,
        layout.schema,
        layout.bucket,
        step,
        NOW.isoformat(),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
        assert line.decode().split() == ["reached", step]
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    # The manifest lists each row once: the old files of the interrupted hour, or its new one.
    seen = await manifest_rows(layout)
    assert set(seen) == layout.request_ids
    assert set(seen.values()) == {1}
    stray = await layout.pool.fetchval("SELECT count(*) FROM feature_garbage")
    assert stray >= 1  # what the killed run left for the next one to delete

    report = await compact(layout.pool, layout.s3, layout.bucket, now=NOW)

    assert not report.skipped
    seen = await manifest_rows(layout)
    assert set(seen) == layout.request_ids
    assert set(seen.values()) == {1}
    # Closed hours: one file each; the hour in progress is left to its flushes.
    assert await files_per_hour(layout) == [1, 1, FILES_PER_HOUR]
    manifest = {
        row["object_key"] for row in await layout.pool.fetch("SELECT object_key FROM feature_files")
    }
    assert await stored_keys(layout) == manifest
    assert await layout.pool.fetchval("SELECT count(*) FROM feature_garbage") == 0


async def test_compacted_file_is_sorted_and_keeps_the_offsets_it_holds(layout: Layout) -> None:
    report = await compact(layout.pool, layout.s3, layout.bucket, now=NOW)
    assert [hour.rows for hour in report.hours] == [FILES_PER_HOUR * ROWS_PER_FILE] * 2
    assert report.files_replaced == 2 * FILES_PER_HOUR
    first = report.hours[0]
    response = await layout.s3.get_object(Bucket=layout.bucket, Key=first.object_key)
    parquet = pq.ParquetFile(io.BytesIO(await response["Body"].read()))
    table = parquet.read()
    moments = table.column("predicted_at").to_pylist()
    assert moments == sorted(moments)
    assert table.schema.field("temp").type == pa.float64()
    metadata = parquet.schema_arrow.metadata or {}
    assert orjson.loads(metadata[b"driftloop.kafka_offsets"]) == {
        "predictions:0": [0, FILES_PER_HOUR * ROWS_PER_FILE - 1]
    }
    # Nothing left to do: a second run changes nothing.
    again = await compact(layout.pool, layout.s3, layout.bucket, now=NOW)
    assert again.hours == ()
