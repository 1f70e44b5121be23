"""The Parquet layout as SQL: DuckDB, embedded, over the object store through pyarrow's S3.

Two views, built from the manifests so only committed files are read (a listing may show a
file of an unfinished flush or the replaced files of a compaction in flight):

- ``features``: every prediction (``feature_files``), one row per request;
- ``labels``: every label in Parquet (``label_files``), one row per request.

``training_rows`` is the retrain extract's history older than the hot store (``driftloop.storage
.hot_store``): the labelled rows of days Postgres has dropped.

pyarrow reads the files (its S3 filesystem is in the wheel: no DuckDB extension to pin), and
DuckDB scans them as Arrow datasets with projection and filter pushdown, in parallel, without
loading the whole span into pandas first. Files written with different feature types (an
undeclared model's inferred columns) are read under their unified schema.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from driftloop.settings import ObjectStoreSettings
from driftloop.storage.featurestore import BASE_SCHEMA

VIEWS: Final = ("features", "labels")

_FEATURE_FILES = "SELECT object_key FROM feature_files ORDER BY object_key"
_MODEL_FEATURE_FILES = """
SELECT object_key FROM feature_files
WHERE model_name = $1
  AND partition_date + make_interval(hours => partition_hour) >= $2
  AND partition_date + make_interval(hours => partition_hour) < $3
ORDER BY object_key
"""
_LABEL_FILES = "SELECT object_key FROM label_files ORDER BY object_key"
_MODEL_LABEL_FILES = """
SELECT object_key FROM label_files WHERE model_name = $1 AND day >= $2 AND day <= $3
ORDER BY object_key
"""
_LABEL_SCHEMA: Final = pa.schema(
    [
        ("request_id", pa.string()),
        ("predicted_at", pa.timestamp("us", tz="UTC")),
        ("model_version", pa.int32()),
        ("label", pa.float64()),
        ("observed_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True, slots=True)
class LakeFiles:
    """The committed object keys the views read."""

    features: Sequence[str]
    labels: Sequence[str]


def s3_filesystem(settings: ObjectStoreSettings) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on the configured endpoint (path-style, as the services use)."""
    # The AWS SDK inside pyarrow asks for response checksums on GetObject by default, which
    # S3-compatible servers (S3Proxy on the dev stack) answer 501 NotImplemented; it reads
    # these when its first client is made. A deployment's own values win.
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    endpoint = urlsplit(settings.endpoint_url)
    return pafs.S3FileSystem(
        access_key=settings.access_key_id,
        secret_key=settings.secret_access_key.get_secret_value(),
        region=settings.region,
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme or "https",
        force_virtual_addressing=False,
    )


async def all_files(connection: asyncpg.Connection | asyncpg.Pool) -> LakeFiles:
    """Every committed feature and label file."""
    features = [row["object_key"] for row in await connection.fetch(_FEATURE_FILES)]
    labels = [row["object_key"] for row in await connection.fetch(_LABEL_FILES)]
    return LakeFiles(features, labels)


async def window_files(
    connection: asyncpg.Connection | asyncpg.Pool, model_name: str, start: datetime, end: datetime
) -> LakeFiles:
    """The committed files of a model that may hold rows predicted in ``[start, end)``."""
    first_hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0, tzinfo=None)
    last = end.astimezone(UTC).replace(tzinfo=None)
    features = await connection.fetch(_MODEL_FEATURE_FILES, model_name, first_hour, last)
    labels = await connection.fetch(_MODEL_LABEL_FILES, model_name, first_hour.date(), last.date())
    return LakeFiles([row["object_key"] for row in features], [row["object_key"] for row in labels])


def open_lake(
    filesystem: pafs.FileSystem, bucket: str, files: LakeFiles, *, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the ``features`` and ``labels`` views over ``files``."""
    connection = duckdb.connect(":memory:")
    if threads is not None:
        connection.execute(f"SET threads = {int(threads)}")
    features = _dataset(filesystem, bucket, files.features, None)
    labels = _dataset(filesystem, bucket, files.labels, _LABEL_SCHEMA)
    connection.register("features", features)
    connection.register("labels", labels)
    return connection


def _dataset(
    filesystem: pafs.FileSystem, bucket: str, keys: Sequence[str], schema: pa.Schema | None
) -> ds.Dataset | pa.Table:
    if not keys:
        return (schema or pa.schema([("request_id", pa.string())])).empty_table()
    paths = [f"{bucket}/{key}" for key in keys]
    if schema is None:
        # Flushes of an undeclared model may type a feature differently: read the footers,
        # unify once, and every file is cast to that schema as it is scanned.
        footers = [
            ds.dataset(path, filesystem=filesystem, format="parquet").schema for path in paths
        ]
        schema = pa.unify_schemas(footers, promote_options="permissive")
    return ds.dataset(paths, filesystem=filesystem, format="parquet", schema=schema)


def query(connection: duckdb.DuckDBPyConnection, sql: str, *parameters: Any) -> pa.Table:
    """Run one statement over the views; the result as Arrow."""
    result: pa.Table = connection.sql(sql, params=list(parameters)).to_arrow_table()
    return result


def window_frame(
    connection: duckdb.DuckDBPyConnection,
    columns: Sequence[str],
    model_version: int,
    start: datetime,
    end: datetime,
) -> pd.DataFrame:
    """A model version's rows predicted in ``[start, end)``, ``columns`` of ``features`` and
    the label (null when none), ordered by prediction time."""
    selected = ", ".join(f'f."{column}"' for column in columns)
    frame: pd.DataFrame = connection.execute(
        f"SELECT {selected}, l.label FROM features f "  # noqa: S608 - columns are declared names
        "LEFT JOIN labels l USING (request_id) "
        "WHERE f.model_version = ? AND f.predicted_at >= ? AND f.predicted_at < ? "
        "ORDER BY f.predicted_at",
        [model_version, start, end],
    ).df()
    return frame


def training_rows(
    connection: duckdb.DuckDBPyConnection,
    model_version: int,
    *,
    before: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    """The newest ``limit`` labelled rows of a model version predicted before ``before``, newest
    first, as the retrain extract reads them from Postgres: ``request_id``, ``predicted_at``,
    ``features`` (a dict under the declared names), ``prediction``, ``label``."""
    if limit <= 0:
        return []
    table: pa.Table = connection.sql(
        "SELECT f.*, l.label AS _label FROM features f JOIN labels l USING (request_id) "
        "WHERE f.model_version = ? AND f.predicted_at < ? "
        "ORDER BY f.predicted_at DESC, f.request_id DESC LIMIT ?",
        params=[model_version, before, limit],
    ).to_arrow_table()
    base = set(BASE_SCHEMA.names)
    # A feature named like a base column is stored as feature_<name> (featurestore.feature_column).
    names = {
        column: column.removeprefix("feature_")
        if column.removeprefix("feature_") in base
        else column
        for column in table.column_names
        if column not in base and column != "_label"
    }
    rows = []
    for record in table.to_pylist():
        rows.append(
            {
                "request_id": record["request_id"],
                "predicted_at": record["predicted_at"],
                "features": {name: record[column] for column, name in names.items()},
                "prediction": record["prediction"],
                "label": record["_label"],
            }
        )
    return rows
