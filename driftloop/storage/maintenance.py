"""One storage maintenance run, as the feature-logger's timer and ``driftloop storage maintain``
both do it: label files, the hot store's partitions, Parquet and report retention, then
Parquet compaction.

The order matters: a day's labels are written to Parquet (``driftloop.storage.label_files``) before
the hot store may drop that day, and the drop asks again with the day locked (``may_drop``), so no
label leaves Postgres without being in Parquet. Without an object store (Parquet disabled) the
hot store is maintained alone and expired labels are dropped with their day.

Retention of the object store, per model (``retention`` in its declaration): feature and label
files of whole days past ``retention.parquet`` leave the manifests and are listed as garbage,
which the compaction run right after deletes under its lock (never beside a compaction in
flight); reports past ``retention.reports`` are deleted, then the oldest HTML past
``retention.report_html_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from driftloop.drift.report_retention import REPORT_PREFIX, ReportExpiry, expire_reports
from driftloop.storage.compaction import CompactionReport, compact
from driftloop.storage.hot_store import MaintenanceReport, existing_days, maintain, partition_day
from driftloop.storage.label_files import COMMIT_MARGIN, LabelFile, day_exported, export_labels
from schemas.features import FeatureSpec

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass(frozen=True, slots=True)
class ModelRetention:
    """How long one model's files and reports are kept in the object store."""

    model_name: str
    parquet: timedelta | None
    reports: timedelta
    report_html_bytes: int

    @classmethod
    def of(cls, spec: FeatureSpec) -> ModelRetention:
        """The retention a model declares (its registered name keys its files and reports)."""
        return cls(
            spec.registered_model_name,
            spec.retention.parquet,
            spec.retention.reports,
            spec.retention.report_html_bytes,
        )


@dataclass(frozen=True, slots=True)
class StoragePolicy:
    """What maintenance keeps, makes ahead and merges."""

    hot_retention: timedelta
    ahead_days: int
    compaction_settle: timedelta
    labels_prefix: str
    label_commit_margin: timedelta = COMMIT_MARGIN
    models: tuple[ModelRetention, ...] = ()
    report_prefix: str = REPORT_PREFIX


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
    expired_files: int = 0
    """Feature and label files past their model's Parquet retention (deleted by compaction)."""
    reports: tuple[ReportExpiry, ...] = ()


_EXPIRE_FEATURE_FILES = """
WITH gone AS (
    DELETE FROM feature_files WHERE model_name = $1 AND partition_date < $2 RETURNING object_key
)
INSERT INTO feature_garbage (object_key, reason) SELECT object_key, 'expired' FROM gone
ON CONFLICT (object_key) DO NOTHING
"""
_EXPIRE_LABEL_FILES = """
WITH gone AS (
    DELETE FROM label_files WHERE model_name = $1 AND day < $2 RETURNING object_key
)
INSERT INTO feature_garbage (object_key, reason) SELECT object_key, 'expired' FROM gone
ON CONFLICT (object_key) DO NOTHING
"""


async def expire_parquet(
    connection: asyncpg.Connection, policy: StoragePolicy, now: datetime
) -> int:
    """Move the files of whole days past each model's Parquet retention to the garbage list.

    Never a day still in the hot store: its label file would only be written again.
    """
    expired = 0
    for model in policy.models:
        if model.parquet is None:
            continue
        horizon = now - max(model.parquet, policy.hot_retention)
        first_kept = partition_day(horizon)  # days before it are wholly past the horizon
        async with connection.transaction():
            for statement in (_EXPIRE_FEATURE_FILES, _EXPIRE_LABEL_FILES):
                status = await connection.execute(statement, model.model_name, first_kept)
                expired += int(status.rsplit(" ", 1)[-1])
    return expired


async def maintain_storage(
    pool: asyncpg.Pool,
    parquet: ParquetTarget | None,
    policy: StoragePolicy,
    *,
    now: datetime | None = None,
) -> StorageReport:
    """Export the label files that fell behind, maintain the partitions, expire what is past
    its retention, compact closed hours."""
    moment = now if now is not None else datetime.now(UTC)
    expired = 0
    reports: list[ReportExpiry] = []
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
            now=moment,
            may_drop=day_exported if parquet is not None else None,
        )
        if parquet is not None:
            expired = await expire_parquet(connection, policy, moment)
    compaction = None
    if parquet is not None:
        compaction = await compact(
            pool, parquet.s3, parquet.bucket, settle=policy.compaction_settle, now=moment
        )
        for model in policy.models:
            reports.append(
                await expire_reports(
                    parquet.s3,
                    parquet.bucket,
                    model.model_name,
                    retention=model.reports,
                    html_budget_bytes=model.report_html_bytes,
                    now=moment,
                    prefix=policy.report_prefix,
                )
            )
    return StorageReport(partitions, tuple(written), compaction, expired, tuple(reports))
