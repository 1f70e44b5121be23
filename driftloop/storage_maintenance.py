"""One storage maintenance run, as the feature-logger's timer and ``driftloop storage maintain``
both do it: label files, then the hot store's partitions, then Parquet compaction.

The order matters: a day's labels are written to Parquet (``driftloop.label_files``) before the
hot store may drop that day, and the drop asks again with the day locked (``may_drop``), so no
label leaves Postgres without being in Parquet. Without an object store (Parquet disabled) the
hot store is maintained alone and expired labels are dropped with their day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from driftloop.compaction import CompactionReport, compact
from driftloop.hot_store import MaintenanceReport, existing_days, maintain
from driftloop.label_files import COMMIT_MARGIN, LabelFile, day_exported, export_labels

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass(frozen=True, slots=True)
class StoragePolicy:
    """What maintenance keeps, makes ahead and merges."""

    hot_retention: timedelta
    ahead_days: int
    compaction_settle: timedelta
    labels_prefix: str
    label_commit_margin: timedelta = COMMIT_MARGIN


@dataclass(frozen=True, slots=True)
class ParquetTarget:
    """Where the Parquet files are: the object store client and its bucket."""

    s3: S3Client
    bucket: str


@dataclass(frozen=True, slots=True)
class StorageReport:
    """What one maintenance run did."""

    partitions: MaintenanceReport
    label_files: tuple[LabelFile, ...] = ()
    compaction: CompactionReport | None = None


async def maintain_storage(
    pool: asyncpg.Pool,
    parquet: ParquetTarget | None,
    policy: StoragePolicy,
    *,
    now: datetime | None = None,
) -> StorageReport:
    """Export the label files that fell behind, maintain the partitions, compact closed hours."""
    async with pool.acquire() as connection:
        written: list[LabelFile] = []
        if parquet is not None:
            days = (await existing_days(connection))["labels"]
            written = await export_labels(
                connection,
                parquet.s3,
                parquet.bucket,
                policy.labels_prefix,
                days,
                commit_margin=policy.label_commit_margin,
            )
        partitions = await maintain(
            connection,
            retention=policy.hot_retention,
            ahead_days=policy.ahead_days,
            now=now,
            may_drop=day_exported if parquet is not None else None,
        )
    compaction = None
    if parquet is not None:
        compaction = await compact(
            pool, parquet.s3, parquet.bucket, settle=policy.compaction_settle, now=now
        )
    return StorageReport(partitions, tuple(written), compaction)
