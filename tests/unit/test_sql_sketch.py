"""The sketch DuckDB builds in SQL is the sketch Python builds from the same rows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from driftloop.drift.baseline import reference_arrays
from driftloop.drift.sketch import SketchLayout, WindowSketch
from driftloop.drift.sql_sketch import window_sample, window_sketch
from schemas.features import FeatureKind

START = datetime(2026, 11, 1, tzinfo=UTC)
END = START + timedelta(hours=2)
KINDS = {
    "temp": FeatureKind.NUMERIC,
    "hr": FeatureKind.NUMERIC,
    "weathersit": FeatureKind.CATEGORICAL,
    "mnth": FeatureKind.CATEGORICAL,
    "coded": FeatureKind.CATEGORICAL,
    "prediction": FeatureKind.NUMERIC,
}
SOURCES = {"temp": "temp", "hr": "hr", "weathersit": "weathersit", "mnth": "mnth"}
SOURCES |= {"coded": "coded", "prediction": "prediction"}


def layout_of(rng: np.random.Generator, bins: int = 20) -> SketchLayout:
    reference = {
        "temp": rng.normal(0.5, 0.2, 3_000),
        "hr": rng.integers(0, 24, 3_000).astype(np.float64),
        "weathersit": np.array(rng.integers(1, 4, 3_000), dtype=object),
        "mnth": np.array(rng.choice(["Jan", "Feb", "O'Neil"], 3_000), dtype=object),
        "coded": np.array(rng.integers(0, 3, 3_000), dtype=object),
        "prediction": rng.gamma(2.0, 60.0, 3_000),
    }
    return SketchLayout.from_reference(
        reference, KINDS, declared_categories={"weathersit": [1, 2, 3, 4]}, bins=bins
    )


def window_rows(layout: SketchLayout, rng: np.random.Generator, rows: int) -> pd.DataFrame:
    temp = rng.normal(0.6, 0.3, rows)
    # Values on the edges themselves, beyond both ends, missing (None and NaN), infinite.
    edges = np.array(layout.column("temp").edges)
    temp[: len(edges)] = edges
    temp[len(edges) : len(edges) + 4] = [-5.0, 9.0, np.nan, np.inf]
    frame = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows)],
            "predicted_at": START + pd.to_timedelta(rng.integers(-600, 8_000, rows), unit="s"),
            "model_version": rng.choice([1, 1, 1, 2], rows),
            "temp": temp,
            "hr": rng.integers(0, 26, rows),
            "weathersit": pd.array(rng.integers(0, 6, rows), dtype="Int64"),
            "mnth": rng.choice(["Jan", "Feb", "O'Neil", "Dec", "3"], rows).astype(object),
            # A float-coded categorical column: 1.0 is category 1, 1.5 none of them.
            "coded": rng.choice([0.0, 1.0, 2.0, 1.5, np.nan], rows),
            "prediction": rng.gamma(2.0, 60.0, rows),
        }
    )
    special = frame.index[: len(edges) + 4]
    frame.loc[special, "model_version"] = 1
    frame.loc[special, "predicted_at"] = START + timedelta(hours=1)
    frame.loc[frame.index[::17], "weathersit"] = pd.NA
    frame.loc[frame.index[::13], "mnth"] = None
    frame.loc[frame.index[::11], "hr"] = None
    return frame


def python_sketch(layout: SketchLayout, table: pa.Table, version: int) -> WindowSketch:
    """The pandas path's sketch: the rows read as pandas reads Parquet (an integer column with
    nulls becomes float64 with NaN), filtered, sketched in Python."""
    frame = table.to_pandas()
    chosen = frame[
        (frame["model_version"] == version)
        & (frame["predicted_at"] >= START)
        & (frame["predicted_at"] < END)
    ]
    return WindowSketch.of(layout, reference_arrays(chosen, layout))


@pytest.fixture
def lake() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(":memory:")
    yield connection
    connection.close()


@pytest.mark.parametrize(("seed", "bins"), [(1, 20), (2, 100), (3, 7), (4, 300)])
def test_the_sql_sketch_is_the_python_sketch(
    lake: duckdb.DuckDBPyConnection, seed: int, bins: int
) -> None:
    rng = np.random.default_rng(seed)
    layout = layout_of(rng, bins)
    frame = window_rows(layout, rng, 5_000)
    # As the files hold them: no pandas metadata, so reading back gives pandas' plain dtypes.
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    assert pa.types.is_integer(table.schema.field("weathersit").type)
    lake.register("features", table)

    built = window_sketch(lake, layout, SOURCES, 1, START, END)
    expected = python_sketch(layout, table, 1)

    assert built.rows == expected.rows > 0
    for column in layout.columns:
        mine, theirs = built.columns[column.name], expected.columns[column.name]
        assert mine.nulls == theirs.nulls, column.name
        np.testing.assert_array_equal(mine.counts, theirs.counts, err_msg=column.name)
        if column.kind == "numeric":
            np.testing.assert_array_equal(mine.lows, theirs.lows, err_msg=column.name)
            np.testing.assert_array_equal(mine.highs, theirs.highs, err_msg=column.name)
            np.testing.assert_allclose(mine.sums, theirs.sums, rtol=1e-12, err_msg=column.name)
    # Every kind of value was exercised: missing ones, unknown categories, the outer bins.
    assert built.columns["temp"].nulls > 0
    assert built.columns["temp"].counts[-1] > 0
    assert built.columns["weathersit"].counts[-1] > 0
    assert built.columns["mnth"].counts[-1] > 0
    assert built.columns["coded"].counts[-1] > 0
    assert built.columns["coded"].nulls > 0


def test_a_column_absent_from_the_files_is_missing_everywhere(
    lake: duckdb.DuckDBPyConnection,
) -> None:
    rng = np.random.default_rng(7)
    layout = layout_of(rng)
    frame = window_rows(layout, rng, 500).drop(columns=["mnth", "temp"])
    lake.register("features", pa.Table.from_pandas(frame, preserve_index=False))

    built = window_sketch(lake, layout, SOURCES, 1, START, END)

    assert built.columns["mnth"].nulls == built.columns["temp"].nulls == built.rows > 0
    assert built.columns["mnth"].rows == built.columns["temp"].rows == 0


def test_text_in_a_numeric_column_is_read_as_pandas_coerces_it(
    lake: duckdb.DuckDBPyConnection,
) -> None:
    rng = np.random.default_rng(5)
    layout = layout_of(rng)
    frame = window_rows(layout, rng, 2_000)
    frame["hr"] = [
        None if i % 7 == 0 else ("n/a" if i % 5 == 0 else str(i % 24)) for i in frame.index
    ]
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    assert pa.types.is_string(table.schema.field("hr").type)
    lake.register("features", table)

    built = window_sketch(lake, layout, SOURCES, 1, START, END)
    expected = python_sketch(layout, table, 1)

    np.testing.assert_array_equal(built.columns["hr"].counts, expected.columns["hr"].counts)
    assert built.columns["hr"].nulls == expected.columns["hr"].nulls > 0


def test_an_empty_window_is_an_empty_sketch(lake: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(8)
    layout = layout_of(rng)
    lake.register("features", pa.Table.from_pandas(window_rows(layout, rng, 100)))

    built = window_sketch(lake, layout, SOURCES, 9, START, END)

    assert built.rows == 0
    np.testing.assert_array_equal(built.to_vector(), WindowSketch.empty(layout).to_vector())


def test_the_sample_is_bounded_uniform_and_labelled(lake: duckdb.DuckDBPyConnection) -> None:
    rng = np.random.default_rng(9)
    layout = layout_of(rng)
    frame = window_rows(layout, rng, 20_000)
    lake.register("features", pa.Table.from_pandas(frame, preserve_index=False))
    labels = pd.DataFrame({"request_id": frame["request_id"][::2], "label": 1.0})
    lake.register("labels", pa.Table.from_pandas(labels, preserve_index=False))
    inside = frame[
        (frame["model_version"] == 1)
        & (frame["predicted_at"] >= START)
        & (frame["predicted_at"] < END)
    ]

    sample = window_sample(
        lake, ["predicted_at", "temp", "prediction"], 1, START, END, rows=1_000, seed=3
    )
    whole = window_sample(lake, ["predicted_at"], 1, START, END, rows=10**6, seed=3)

    assert len(sample) == 1_000
    assert len(whole) == len(inside)
    assert list(sample.columns) == ["predicted_at", "temp", "prediction", "label"]
    assert sample["predicted_at"].is_monotonic_increasing
    assert set(sample["prediction"]) <= set(inside["prediction"])
    # Half of the rows are labelled: so is about half of a uniform sample.
    assert 0.4 < sample["label"].notna().mean() < 0.6
