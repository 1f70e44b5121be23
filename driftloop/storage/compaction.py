"""Parquet compaction: the flush files of a model-hour merged into one file, exactly once.

The feature-logger writes one file per flush and model-hour; at a steady rate that is a file
a minute per model, which every reader pays for. Compaction merges the committed files of each
closed hour (the manifest ``feature_files`` lists them) into one file sorted by prediction
time, and swaps the manifest atomically:

1. the new object key is listed in ``feature_garbage`` (``unfinished_compaction``);
2. the merged file is put;
3. in one transaction: the replaced files leave ``feature_files`` (all of them, or the swap
   is abandoned: someone else changed that hour), the new file enters it, its garbage entry
   goes, and the replaced keys are listed as garbage (``replaced``);
4. the listed objects are deleted from the store, then their entries.

A crash before 3 leaves the old files in the manifest and the new object listed as garbage; a
crash after 3 leaves the new file in the manifest and the old objects listed. Either way the
manifest lists every row exactly once, and the next run deletes what is listed (step 4 runs
first). One compaction runs at a time per schema (a session advisory lock; a run that finds
it taken does nothing), so an entry found at the start of a run is never a live run's.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from driftloop.leader import lock_key
from driftloop.storage.featurestore import parquet_file

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

StepHook = Callable[[str], Awaitable[None]]
"""Called with the name of each step reached (``put``, ``swapped``); tests stop a run there."""

DEFAULT_SETTLE: Final = timedelta(minutes=15)
"""How long after an hour ends it is compacted: later flushes of that hour are rare by then."""

_HOURS_TO_COMPACT = """
SELECT model_name, partition_date, partition_hour
FROM feature_files
WHERE partition_date + make_interval(hours => partition_hour + 1) <= $1
GROUP BY model_name, partition_date, partition_hour
HAVING count(*) > 1
ORDER BY partition_date, partition_hour, model_name
LIMIT $2
"""
_FILES_OF_HOUR = """
SELECT object_key, row_count, offsets::text AS offsets FROM feature_files
WHERE model_name = $1 AND partition_date = $2 AND partition_hour = $3
ORDER BY object_key
"""


@dataclass(frozen=True, slots=True)
class HourCompacted:
    """One model-hour merged: the files it replaced and the file that holds their rows now."""

    model_name: str
    day: date
    hour: int
    replaced: tuple[str, ...]
    object_key: str
    rows: int


@dataclass(frozen=True, slots=True)
class CompactionReport:
    """What one compaction run did."""

    hours: tuple[HourCompacted, ...] = ()
    garbage_deleted: int = 0
    skipped: bool = False
    """Another session was compacting this schema; this run did nothing."""

    @property
    def files_replaced(self) -> int:
        return sum(len(hour.replaced) for hour in self.hours)


class CompactionConflictError(RuntimeError):
    """The hour's files changed while they were merged; the swap was abandoned."""


async def collect_garbage(connection: asyncpg.Connection, s3: S3Client, bucket: str) -> int:
    """Delete every object listed in ``feature_garbage``, then its entry; returns how many.

    A key that is also in the manifest is never deleted (only its entry): the manifest wins.
    """
    rows = await connection.fetch(
        "SELECT g.object_key, f.object_key IS NOT NULL AS listed FROM feature_garbage g "
        "LEFT JOIN feature_files f USING (object_key) ORDER BY g.object_key"
    )
    for row in rows:
        if not row["listed"]:
            await s3.delete_object(Bucket=bucket, Key=row["object_key"])
        await connection.execute(
            "DELETE FROM feature_garbage WHERE object_key = $1", row["object_key"]
        )
    return len(rows)


async def compact(
    pool: asyncpg.Pool,
    s3: S3Client,
    bucket: str,
    *,
    settle: timedelta = DEFAULT_SETTLE,
    max_hours: int = 24,
    now: datetime | None = None,
    on_step: StepHook | None = None,
) -> CompactionReport:
    """Merge the files of up to ``max_hours`` closed model-hours having more than one file.

    An hour is closed ``settle`` after it ends. Leftovers of an earlier run are deleted first.
    The run holds one connection of ``pool`` throughout (its lock is that session's).
    """
    if max_hours < 1:
        raise ValueError(f"max_hours must be at least 1, got {max_hours}")
    moment = now if now is not None else datetime.now(UTC)
    async with pool.acquire() as holder:
        schema = await holder.fetchval("SELECT current_schema()")
        key = lock_key(f"driftloop.storage.compaction.{schema}")
        if not await holder.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return CompactionReport(skipped=True)
        try:
            deleted = await collect_garbage(holder, s3, bucket)
            cutoff = (moment - settle).astimezone(UTC).replace(tzinfo=None)
            hours = await holder.fetch(_HOURS_TO_COMPACT, cutoff, max_hours)
            done = []
            for row in hours:
                try:
                    hour = await compact_hour(
                        holder,
                        s3,
                        bucket,
                        row["model_name"],
                        row["partition_date"],
                        row["partition_hour"],
                        on_step=on_step,
                    )
                except CompactionConflictError as error:
                    log.warning("%s; the next run merges that hour again", error)
                    continue
                if hour is not None:
                    done.append(hour)
            # The replaced files of this run.
            deleted += await collect_garbage(holder, s3, bucket)
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", key)
    report = CompactionReport(tuple(done), deleted)
    if done:
        log.info(
            "compacted %d model-hours: %d files into %d",
            len(done),
            report.files_replaced,
            len(done),
        )
    return report


async def compact_hour(
    connection: asyncpg.Connection,
    s3: S3Client,
    bucket: str,
    model_name: str,
    day: date,
    hour: int,
    *,
    on_step: StepHook | None = None,
) -> HourCompacted | None:
    """Merge the committed files of one model-hour into one; None when it has one file or none.

    Call it under the compaction lock (``compact`` does); it lists its garbage, and leaves its
    deletion to ``collect_garbage``.
    """
    files = await connection.fetch(_FILES_OF_HOUR, model_name, day, hour)
    if len(files) < 2:
        return None
    keys = [row["object_key"] for row in files]
    expected_rows = sum(row["row_count"] for row in files)
    tables = []
    for object_key in keys:
        response = await s3.get_object(Bucket=bucket, Key=object_key)
        body = await response["Body"].read()
        tables.append(await asyncio.to_thread(pq.read_table, io.BytesIO(body)))
    merged = pa.concat_tables(
        [table.replace_schema_metadata(None) for table in tables], promote_options="permissive"
    )
    if merged.num_rows != expected_rows:
        raise RuntimeError(
            f"{model_name} {day} {hour:02d}h: the files hold {merged.num_rows} rows, the manifest "
            f"says {expected_rows}; not compacting it"
        )
    merged = merged.sort_by([("predicted_at", "ascending"), ("request_id", "ascending")])
    offsets = _merged_offsets(row["offsets"] for row in files)
    body = await asyncio.to_thread(parquet_file, merged, offsets)
    compaction_id = f"compacted-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    new_key = f"{keys[0].rsplit('/', 1)[0]}/{compaction_id}.parquet"

    await connection.execute(
        "INSERT INTO feature_garbage (object_key, reason) VALUES ($1, 'unfinished_compaction')",
        new_key,
    )
    await s3.put_object(Bucket=bucket, Key=new_key, Body=body)
    if on_step is not None:
        await on_step("put")
    async with connection.transaction():
        removed = await connection.fetch(
            "DELETE FROM feature_files WHERE object_key = ANY($1::text[]) RETURNING object_key",
            keys,
        )
        if len(removed) != len(keys):
            raise CompactionConflictError(
                f"{model_name} {day} {hour:02d}h changed while it was merged"
            )
        await connection.execute(
            "INSERT INTO feature_files (object_key, flush_id, model_name, partition_date, "
            "partition_hour, row_count, offsets) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            new_key,
            compaction_id,
            model_name,
            day,
            hour,
            merged.num_rows,
            offsets.decode(),
        )
        await connection.execute("DELETE FROM feature_garbage WHERE object_key = $1", new_key)
        await connection.executemany(
            "INSERT INTO feature_garbage (object_key, reason) VALUES ($1, 'replaced')",
            [(object_key,) for object_key in keys],
        )
    if on_step is not None:
        await on_step("swapped")
    return HourCompacted(model_name, day, hour, tuple(keys), new_key, merged.num_rows)


def _merged_offsets(documents: Iterable[str]) -> bytes:
    """The envelope of the files' ``"topic:partition" -> [lowest, highest]`` offsets."""
    ranges: dict[str, list[int]] = {}
    for document in documents:
        for partition, (low, high) in orjson.loads(document).items():
            span = ranges.setdefault(partition, [low, high])
            span[0], span[1] = min(span[0], low), max(span[1], high)
    return orjson.dumps(dict(sorted(ranges.items())))
