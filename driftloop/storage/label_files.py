"""Labels in Parquet: one file per model and day of prediction time, beside the feature files.

``<prefix>model=<name>/date=<YYYY-MM-DD>/labels.parquet`` holds every label of the model's
predictions of that UTC day (request id, prediction time, model version, label, when it was
observed), so a training set over months joins two Parquet reads. A day's file is written
whole, under a fixed key, whenever that day has labels newer than the file (``label_files``
keeps a watermark: every label logged before it is in the file): a rewrite replaces the
object in one PUT, so a reader sees the old file or the new one, and a crash between the PUT
and the manifest update only makes the next run write the same file again. Maintenance
exports a day before the hot store drops it (``driftloop.storage.maintenance``), so no label
leaves Postgres unexported.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq

from driftloop.storage.hot_store import ONE_DAY, day_start

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

COMMIT_MARGIN: Final = timedelta(minutes=5)
"""Longer than any label-writing transaction of the feature-logger (a batch, seconds)."""
LABEL_SCHEMA: Final = pa.schema(
    [
        ("request_id", pa.string()),
        ("predicted_at", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.int32()),
        ("label", pa.float64()),
        ("observed_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Whether a day has labels newer than its oldest file: one probe of the day's logged_at index.
_NEWEST = """
SELECT max(logged_at) > coalesce(
    (SELECT min(watermark) FROM label_files WHERE day = $3), '-infinity'
)
FROM labels WHERE predicted_at >= $1 AND predicted_at < $2
"""
# The models with labels of a day newer than their file (or with no file yet).
_STALE = """
SELECT p.model_name, max(l.logged_at) AS watermark
FROM labels l JOIN prediction_log p USING (request_id, predicted_at)
WHERE l.predicted_at >= $1 AND l.predicted_at < $2
GROUP BY p.model_name
HAVING max(l.logged_at) > coalesce(
    (SELECT f.watermark FROM label_files f WHERE f.model_name = p.model_name AND f.day = $3),
    '-infinity'
)
"""
_DAY_LABELS = """
SELECT l.request_id, l.predicted_at, p.model_version, l.label, l.observed_at
FROM labels l JOIN prediction_log p USING (request_id, predicted_at)
WHERE p.model_name = $1 AND l.predicted_at >= $2 AND l.predicted_at < $3
ORDER BY l.predicted_at, l.request_id
"""
_RECORD = """
INSERT INTO label_files (model_name, day, object_key, row_count, watermark)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (model_name, day) DO UPDATE
SET object_key = EXCLUDED.object_key, row_count = EXCLUDED.row_count,
    watermark = EXCLUDED.watermark, written_at = now()
"""


@dataclass(frozen=True, slots=True)
class LabelFile:
    """One day of a model's labels, written."""

    model_name: str
    day: date
    object_key: str
    rows: int


def label_file_key(prefix: str, model_name: str, day: date) -> str:
    """The fixed key of a model's labels of ``day``."""
    return f"{prefix}model={model_name}/date={day.isoformat()}/labels.parquet"


async def export_labels(
    connection: asyncpg.Connection,
    s3: S3Client,
    bucket: str,
    prefix: str,
    days: Iterable[date],
    *,
    commit_margin: timedelta = COMMIT_MARGIN,
) -> list[LabelFile]:
    """Write the label file of every model and day in ``days`` whose labels are newer than it.

    ``commit_margin``: how far behind the read the watermark stays (see ``COMMIT_MARGIN``).
    """
    written = []
    for day in sorted(set(days)):
        lower, upper = day_start(day), day_start(day) + ONE_DAY
        if not await connection.fetchval(_NEWEST, lower, upper, day):
            continue
        for stale in await connection.fetch(_STALE, lower, upper, day):
            model_name = stale["model_name"]
            # One snapshot. logged_at is its writer's transaction start, and a label committed
            # after the snapshot may carry an earlier one: the watermark stays a margin behind
            # the snapshot, so such a label makes the next run write the day again.
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                rows = await connection.fetch(_DAY_LABELS, model_name, lower, upper)
                watermark = await connection.fetchval("SELECT now()") - commit_margin
            if not rows:
                continue
            key = label_file_key(prefix, model_name, day)
            body = await asyncio.to_thread(_label_file, rows)
            await s3.put_object(Bucket=bucket, Key=key, Body=body)
            await connection.execute(_RECORD, model_name, day, key, len(rows), watermark)
            written.append(LabelFile(model_name, day, key, len(rows)))
    if written:
        log.info("wrote %d label files (%d labels)", len(written), sum(f.rows for f in written))
    return written


async def day_exported(connection: asyncpg.Connection, day: date) -> bool:
    """Whether every label of ``day`` is in its model's file (no label newer than the files)."""
    stale: bool | None = await connection.fetchval(
        _NEWEST, day_start(day), day_start(day) + ONE_DAY, day
    )
    return not stale


def _label_file(rows: list[asyncpg.Record]) -> bytes:
    table = pa.table(
        {name: [row[name] for row in rows] for name in LABEL_SCHEMA.names}, schema=LABEL_SCHEMA
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
