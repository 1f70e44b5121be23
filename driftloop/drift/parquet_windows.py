"""Long windows from the Parquet feature files: days or weeks of a model version, labels joined.

The drift monitor's tumbling windows are short and read from Postgres; a long window (an
operator's ``driftloop drift check`` over a week or a month) reads the feature-logger's Parquet
files instead, found through their manifest (``feature_files``: one row per committed file,
partitioned by model, date and hour), so no listing of the bucket and no file of an unfinished
flush is read. Labels come from Postgres (``labels``), joined by request id, as they stand.

``load_duckdb_window`` reads the same files through DuckDB (``driftloop.storage.lake``): the filter
and the projection are pushed into the scan, rows stream in parallel, and labels come from the
Parquet label files (written by storage maintenance, so at most one interval behind), joined
in SQL.

A drift check over a long window does not load it: ``sketch_duckdb_window`` builds the window's
sketch inside DuckDB (``driftloop.drift.sql_sketch``, every row counted, a few numbers per bin
back) and takes only a bounded uniform sample of rows, labels joined, for Evidently's report and
the quality; the verdict is the sketch's, as for the monitor's own windows. It is the path for
months of traffic. ``load_parquet_window`` then ``sketch_frame`` (every row in pandas, sketched
in Python) is the reference the benchmark compares it with: same sketch, same verdict.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import asyncpg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from driftloop.drift.assessment import PREDICTION_COLUMN
from driftloop.drift.baseline import reference_arrays
from driftloop.drift.sketch import SketchLayout, WindowSketch
from driftloop.drift.sql_sketch import window_sample, window_sketch
from driftloop.drift.store import PREDICTED_AT_COLUMN
from driftloop.storage import lake
from driftloop.storage.featurestore import feature_column
from schemas.features import FeatureSpec

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_FILES = """
SELECT object_key FROM feature_files
WHERE model_name = $1
  AND partition_date + make_interval(hours => partition_hour) >= $2
  AND partition_date + make_interval(hours => partition_hour) < $3
ORDER BY partition_date, partition_hour, object_key
"""
_LABELS = "SELECT request_id, label FROM labels WHERE request_id = ANY($1::text[])"
_DOWNLOADS: Final = 8
"""Files fetched at once."""
_MOMENT: Final = pa.timestamp("us", tz="UTC")
SAMPLE_SEED: Final = 18
"""Seed of the long window's sample: the same files give the same report."""


@dataclass(frozen=True, slots=True)
class SketchedWindow:
    """A window as its judgement needs it: every row in the sketch, a bounded sample of rows
    (``predicted_at``, the declared features, the prediction, the target) for the report."""

    sketch: WindowSketch
    sample: pd.DataFrame


async def window_files(
    connection: asyncpg.Connection | asyncpg.Pool, model_name: str, start: datetime, end: datetime
) -> list[str]:
    """Object keys of the committed files whose hour partition overlaps ``[start, end)``."""
    first_hour = start.replace(minute=0, second=0, microsecond=0)
    # Partitions are UTC hours, stored as a date and an hour (no time zone).
    rows = await connection.fetch(_FILES, model_name, _naive_utc(first_hour), _naive_utc(end))
    return [row["object_key"] for row in rows]


async def load_parquet_window(
    pool: asyncpg.Pool,
    s3: S3Client,
    bucket: str,
    spec: FeatureSpec,
    model_name: str,
    model_version: int,
    *,
    start: datetime,
    end: datetime,
) -> pd.DataFrame:
    """The rows of a model version predicted in ``[start, end)``, as ``DriftStore.window``
    returns them: ``predicted_at``, the declared features, the prediction, the target."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window bounds must be timezone-aware")
    keys = await window_files(pool, model_name, start, end)
    columns = [
        "request_id",
        PREDICTED_AT_COLUMN,
        "model_version",
        PREDICTION_COLUMN,
        *(feature_column(name) for name in spec.feature_names),
    ]
    slots = asyncio.Semaphore(_DOWNLOADS)

    async def read(key: str) -> pa.Table:
        async with slots:
            response = await s3.get_object(Bucket=bucket, Key=key)
            body = await response["Body"].read()
        table = await asyncio.to_thread(pq.read_table, io.BytesIO(body), columns=columns)
        moments = table[PREDICTED_AT_COLUMN]
        chosen = pc.and_(
            pc.equal(table["model_version"], model_version),
            pc.and_(
                pc.greater_equal(moments, pa.scalar(start, _MOMENT)),
                pc.less(moments, pa.scalar(end, _MOMENT)),
            ),
        )
        return table.filter(chosen)

    tables = await asyncio.gather(*(read(key) for key in keys))
    if not tables:
        return _empty(spec)
    table = pa.concat_tables(tables, promote_options="permissive")
    frame: pd.DataFrame = table.to_pandas()
    frame = frame.rename(columns={feature_column(name): name for name in spec.feature_names})
    labels = await pool.fetch(_LABELS, frame["request_id"].tolist())
    truth = {row["request_id"]: row["label"] for row in labels}
    frame[spec.target.name] = frame["request_id"].map(truth).astype("float64")
    frame = frame.sort_values(PREDICTED_AT_COLUMN, kind="stable").reset_index(drop=True)
    return frame[[PREDICTED_AT_COLUMN, *spec.feature_names, PREDICTION_COLUMN, spec.target.name]]


async def load_duckdb_window(
    pool: asyncpg.Pool,
    filesystem: pafs.FileSystem,
    bucket: str,
    spec: FeatureSpec,
    model_name: str,
    model_version: int,
    *,
    start: datetime,
    end: datetime,
) -> pd.DataFrame:
    """``load_parquet_window``'s rows and columns, read through DuckDB."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window bounds must be timezone-aware")
    files = await lake.window_files(pool, model_name, start, end)
    if not files.features:
        return _empty(spec)
    columns = [PREDICTED_AT_COLUMN, PREDICTION_COLUMN, *map(feature_column, spec.feature_names)]

    def read() -> pd.DataFrame:
        connection = lake.open_lake(filesystem, bucket, files)
        try:
            return lake.window_frame(connection, columns, model_version, start, end)
        finally:
            connection.close()

    return _declared(await asyncio.to_thread(read), spec)


async def sketch_duckdb_window(
    pool: asyncpg.Pool,
    filesystem: pafs.FileSystem,
    bucket: str,
    spec: FeatureSpec,
    layout: SketchLayout,
    model_name: str,
    model_version: int,
    *,
    start: datetime,
    end: datetime,
    sample_rows: int,
    seed: int = SAMPLE_SEED,
) -> SketchedWindow:
    """The sketch of a model version's rows predicted in ``[start, end)``, built in DuckDB, and
    a uniform sample of at most ``sample_rows`` of them: memory bounded by the sample, not the
    window."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("window bounds must be timezone-aware")
    files = await lake.window_files(pool, model_name, start, end)
    if not files.features:
        return SketchedWindow(WindowSketch.empty(layout), _empty(spec))
    sources = {
        name: name if name == PREDICTION_COLUMN else feature_column(name) for name in layout.names
    }
    columns = [PREDICTED_AT_COLUMN, PREDICTION_COLUMN, *map(feature_column, spec.feature_names)]

    def read() -> SketchedWindow:
        connection = lake.open_lake(filesystem, bucket, files)
        try:
            sketch = window_sketch(connection, layout, sources, model_version, start, end)
            sample = window_sample(
                connection, columns, model_version, start, end, rows=sample_rows, seed=seed
            )
        finally:
            connection.close()
        return SketchedWindow(sketch, _declared(sample, spec))

    return await asyncio.to_thread(read)


def sketch_frame(
    layout: SketchLayout, frame: pd.DataFrame, *, sample_rows: int, seed: int = SAMPLE_SEED
) -> SketchedWindow:
    """A window loaded whole (``load_parquet_window``) sketched in Python, and its sample."""
    sketch = WindowSketch.of(layout, reference_arrays(frame, layout))
    sample = frame
    if len(frame) > sample_rows:
        sample = frame.sample(n=sample_rows, random_state=seed).sort_values(
            PREDICTED_AT_COLUMN, kind="stable"
        )
    return SketchedWindow(sketch, sample.reset_index(drop=True))


def _declared(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """A frame of ``features`` columns and ``label`` under the declaration's names."""
    frame = frame.rename(
        columns={
            "label": spec.target.name,
            **{feature_column(name): name for name in spec.feature_names},
        }
    )
    frame[spec.target.name] = frame[spec.target.name].astype("float64")
    return frame[[PREDICTED_AT_COLUMN, *spec.feature_names, PREDICTION_COLUMN, spec.target.name]]


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _empty(spec: FeatureSpec) -> pd.DataFrame:
    return pd.DataFrame(
        columns=[PREDICTED_AT_COLUMN, *spec.feature_names, PREDICTION_COLUMN, spec.target.name]
    )
