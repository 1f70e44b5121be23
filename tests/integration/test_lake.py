"""DuckDB over the Parquet layout on the real S3 server: a long window read through DuckDB is the
pandas path's window, row for row, labels joined from the Parquet label files."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driftloop.drift.parquet_windows import (
    load_duckdb_window,
    load_parquet_window,
    sketch_duckdb_window,
    sketch_frame,
)
from driftloop.drift.sketch import SketchLayout
from driftloop.settings import ObjectStoreSettings
from driftloop.storage import lake
from driftloop.storage.hot_store import ensure_partitions
from driftloop.storage.label_files import LABEL_SCHEMA, label_file_key
from schemas.features import FeatureKind, FeatureSpec
from tests.integration.test_compaction import (
    FILES_PER_HOUR,
    HOURS,
    ROWS_PER_FILE,
    Layout,
    layout,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.integration

SPEC = FeatureSpec.model_validate(
    {
        "name": "bikeshare",
        "description": "One numeric feature, as the test files hold.",
        "task": "regression",
        "registered_model_name": "bikeshare",
        "target": {"name": "bikers", "description": "The label."},
        "features": [
            {"name": "temp", "kind": "numeric", "dtype": "float", "description": "Temperature."}
        ],
    }
)


async def label_every_other_row(built: Layout) -> dict[str, float]:
    """Labels of half the rows, in Postgres and in the day's label file, as maintenance leaves
    them."""
    rows = await built.pool.fetch("SELECT object_key FROM feature_files")
    ids, moments = [], []
    for row in rows:
        response = await built.s3.get_object(Bucket=built.bucket, Key=row["object_key"])
        table = pq.read_table(io.BytesIO(await response["Body"].read()))
        ids += table.column("request_id").to_pylist()
        moments += table.column("predicted_at").to_pylist()
    labelled = {rid: float(index) for index, rid in enumerate(sorted(ids)) if index % 2 == 0}
    at = dict(zip(ids, moments, strict=True))
    async with built.pool.acquire() as connection:
        await ensure_partitions(connection, {moment.date() for moment in moments})
        await connection.executemany(
            "INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id) "
            "VALUES ($1, $2, $3, $2, $4)",
            [(rid, at[rid], label, uuid.uuid4()) for rid, label in labelled.items()],
        )
    day: date = HOURS[0].date()
    table = pa.table(
        {
            "request_id": list(labelled),
            "predicted_at": [at[rid] for rid in labelled],
            "model_version": [1] * len(labelled),
            "label": list(labelled.values()),
            "observed_at": [at[rid] for rid in labelled],
        },
        schema=LABEL_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    key = label_file_key(f"{built.prefix}labels/", "bikeshare", day)
    await built.s3.put_object(Bucket=built.bucket, Key=key, Body=sink.getvalue())
    await built.pool.execute(
        "INSERT INTO label_files (model_name, day, object_key, row_count, watermark) "
        "VALUES ('bikeshare', $1, $2, $3, now())",
        day,
        key,
        len(labelled),
    )
    return labelled


async def test_a_long_window_through_duckdb_is_the_pandas_window(
    layout: Layout,  # noqa: F811 - the fixture
    object_store_settings: ObjectStoreSettings,
) -> None:
    labelled = await label_every_other_row(layout)
    filesystem = lake.s3_filesystem(object_store_settings)
    # The two closed hours whole, and part of the hour in progress.
    start, end = HOURS[0] - timedelta(minutes=30), HOURS[-1] + timedelta(seconds=30)
    arguments = (layout.pool, SPEC, "bikeshare", 1)

    through_duckdb = await load_duckdb_window(
        arguments[0], filesystem, layout.bucket, *arguments[1:], start=start, end=end
    )
    through_pandas = await load_parquet_window(
        arguments[0], layout.s3, layout.bucket, *arguments[1:], start=start, end=end
    )

    per_hour = FILES_PER_HOUR * ROWS_PER_FILE
    assert 2 * per_hour < len(through_duckdb) == len(through_pandas) < 3 * per_hour
    assert through_duckdb["bikers"].notna().sum() == through_pandas["bikers"].notna().sum() > 0
    pd.testing.assert_frame_equal(
        through_duckdb.sort_values(["predicted_at", "prediction"]).reset_index(drop=True),
        through_pandas.sort_values(["predicted_at", "prediction"]).reset_index(drop=True),
        check_dtype=False,
    )
    assert set(through_duckdb["bikers"].dropna()) <= set(labelled.values())


async def test_sql_over_every_committed_file(
    layout: Layout,  # noqa: F811 - the fixture
    object_store_settings: ObjectStoreSettings,
) -> None:
    await label_every_other_row(layout)
    files = await lake.all_files(layout.pool)
    connection = lake.open_lake(lake.s3_filesystem(object_store_settings), layout.bucket, files)
    try:
        result = lake.query(
            connection,
            "SELECT date_trunc('hour', f.predicted_at) AS hour, count(*) AS rows, "
            "count(l.label) AS labelled FROM features f LEFT JOIN labels l USING (request_id) "
            "GROUP BY 1 ORDER BY 1",
        )
    finally:
        connection.close()
    per_hour = FILES_PER_HOUR * ROWS_PER_FILE
    assert result.column("rows").to_pylist() == [per_hour] * len(HOURS)
    assert sum(result.column("labelled").to_pylist()) == len(HOURS) * per_hour // 2
    assert [moment.astimezone(UTC) for moment in result.column("hour").to_pylist()] == [
        moment.replace(minute=0, second=0, microsecond=0) for moment in HOURS
    ]


async def test_a_long_window_sketched_in_duckdb_is_the_pandas_windows_sketch(
    layout: Layout,  # noqa: F811 - the fixture
    object_store_settings: ObjectStoreSettings,
) -> None:
    await label_every_other_row(layout)
    start, end = HOURS[0] - timedelta(minutes=30), HOURS[-1] + timedelta(seconds=30)
    loaded = await load_parquet_window(
        layout.pool, layout.s3, layout.bucket, SPEC, "bikeshare", 1, start=start, end=end
    )
    # Bins cut on the window's own values: every value sits near an edge.
    kinds = {"temp": FeatureKind.NUMERIC, "prediction": FeatureKind.NUMERIC}
    bins = SketchLayout.from_reference(
        {name: loaded[name].to_numpy(np.float64) for name in kinds}, kinds, bins=10
    )

    in_duckdb = await sketch_duckdb_window(
        layout.pool,
        lake.s3_filesystem(object_store_settings),
        layout.bucket,
        SPEC,
        bins,
        "bikeshare",
        1,
        start=start,
        end=end,
        sample_rows=50,
    )
    in_python = sketch_frame(bins, loaded, sample_rows=50)

    assert in_duckdb.sketch.rows == in_python.sketch.rows == len(loaded) > 50
    for name in kinds:
        mine, theirs = in_duckdb.sketch.columns[name], in_python.sketch.columns[name]
        np.testing.assert_array_equal(mine.counts, theirs.counts)
        np.testing.assert_array_equal(mine.lows, theirs.lows)
        np.testing.assert_array_equal(mine.highs, theirs.highs)
        np.testing.assert_allclose(mine.sums, theirs.sums, rtol=1e-12)
    assert len(in_duckdb.sample) == len(in_python.sample) == 50
    assert list(in_duckdb.sample.columns) == list(loaded.columns)
    assert in_duckdb.sample["bikers"].notna().any()
