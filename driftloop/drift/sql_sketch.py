"""A window's sketch built inside DuckDB: the feature-logger's sketch, as one SQL scan.

A long window (weeks of traffic, millions of rows) is judged like the monitor's own windows: its
verdict comes from the window's ``WindowSketch`` (``driftloop.drift.sketch``), and Evidently
sees only a bounded uniform sample. Here both are computed where the rows are, in DuckDB over
the Parquet layout (``driftloop.storage.lake``), so no more than the sample ever reaches pandas
and the memory needed does not grow with the window.

The SQL reproduces ``WindowSketch.of`` exactly:

- a numeric value's bin is the number of the layout's edges at or below it (numpy's
  ``searchsorted(edges, v, side="right")``), found by a 12-way tree of comparisons on DOUBLE
  values (two levels for 100 bins); NULL and NaN are missing;
- a categorical value's slot is its category's position, matched as Python matches a dict key
  (a number column matches the integer categories, a text column the text ones), any other
  value the last slot, NULL (and NaN) missing;
- each column's rows are unnested as (column, slot, value) and aggregated in one hash
  aggregate: counts per slot exactly; sums, minima and maxima per bin (sums may differ from
  numpy's in the last bits, as the summation order differs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final

import duckdb
import numpy as np
import pandas as pd

from driftloop.drift.sketch import ColumnLayout, SketchLayout, WindowSketch

_NUMBER_TYPES: Final = frozenset(
    {
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
        "FLOAT",
        "DOUBLE",
        "BOOLEAN",
    }
)
_INTEGER_TYPES: Final = _NUMBER_TYPES - {"FLOAT", "DOUBLE"}


def quote_identifier(name: str) -> str:
    """A column name as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal_double(value: float) -> str:
    # repr is the shortest text that reads back to the same double; DuckDB's parser rounds
    # correctly, so the edge compared in SQL is the very float numpy compares with.
    if math.isnan(value):
        return "CAST('nan' AS DOUBLE)"
    if math.isinf(value):
        return f"CAST('{'inf' if value > 0 else '-inf'}' AS DOUBLE)"
    return f"CAST('{float(value)!r}' AS DOUBLE)"


def _literal_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_FANOUT: Final = 12
"""Branches of each node of the bin search: two levels for 100 bins. DuckDB evaluates a CASE
by splitting each vector among its branches, and per-branch overhead dominates on small
pieces: 12-way nodes ran twice as fast as a binary tree here (2M rows x 6 columns, 100 bins)."""


def _bin_tree(value: str, edges: Sequence[float], low: int, high: int) -> str:
    """The count of ``edges`` at or below ``value``, knowing those before ``low`` are and
    those from ``high`` on are not."""
    count = high - low
    if count == 0:
        return str(low)
    if count < _FANOUT:
        # A few edges left: one CASE tries them in order.
        tried = " ".join(
            f"WHEN {value} < {_literal_double(edges[i])} THEN {i}" for i in range(low, high)
        )
        return f"CASE {tried} ELSE {high} END"
    # _FANOUT - 1 pivots cut [low, high) into _FANOUT runs; a value below pivot p has exactly
    # the edges before p (and those before the run) at or below it.
    branches, start = [], low
    for step in range(1, _FANOUT):
        pivot = low + count * step // _FANOUT
        below = _bin_tree(value, edges, start, pivot)
        branches.append(f"WHEN {value} < {_literal_double(edges[pivot])} THEN {below}")
        start = pivot + 1
    return f"CASE {' '.join(branches)} ELSE {_bin_tree(value, edges, start, high)} END"


def _numeric_slot(value: str, column: ColumnLayout) -> tuple[str, str]:
    """(slot, value) expressions of a numeric column whose DOUBLE value is ``value``."""
    missing = f"{value} IS NULL OR isnan({value})"
    tree = _bin_tree(value, column.edges, 0, len(column.edges))
    return (
        f"CASE WHEN {missing} THEN -1 ELSE {tree} END",
        f"CASE WHEN {missing} THEN NULL ELSE {value} END",
    )


def _categorical_slot(value: str, column: ColumnLayout, source_type: str | None) -> str:
    """The slot of a categorical column's raw ``value`` of DuckDB type ``source_type``."""
    other = len(column.categories)
    if source_type is None:
        return "-1"  # the column is not in the files: every value missing
    cases: list[str] = []
    if source_type in _NUMBER_TYPES:
        # A number matches an integer category (3.0 is 3, as ``categorical_values`` reads it);
        # NaN is missing, as pandas reads it.
        missing = f"{value} IS NULL" + (
            "" if source_type in _INTEGER_TYPES else f" OR isnan({value})"
        )
        for slot, category in enumerate(column.categories):
            if isinstance(category, int):
                cases.append(f"WHEN {value} = {category} THEN {slot}")
    else:
        missing = f"{value} IS NULL"
        for slot, category in enumerate(column.categories):
            if isinstance(category, str):
                cases.append(
                    f"WHEN CAST({value} AS VARCHAR) = {_literal_text(category)} THEN {slot}"
                )
    return f"CASE WHEN {missing} THEN -1 {' '.join(cases)} ELSE {other} END"


def sketch_query(
    layout: SketchLayout, sources: Mapping[str, str], types: Mapping[str, str], relation: str
) -> str:
    """SQL giving ``(c, b, n, s, lo, hi)``: per column position and slot (-1: missing), the
    rows, sum, minimum and maximum of the values of ``relation``.

    ``sources`` names each layout column's column in ``relation``; ``types`` gives the
    DuckDB type of each of those that exists (a missing one is all NULL).
    """
    projections: list[str] = []
    entries: list[str] = []
    for position, column in enumerate(layout.columns):
        source = sources[column.name]
        alias = f"c{position}"
        present = source in types
        if column.kind == "numeric":
            # TRY_CAST: text that is not a number (an undeclared model's inferred column) is
            # missing, as pandas' to_numeric(errors="coerce") reads it on the Python path.
            raw = (
                f"TRY_CAST({quote_identifier(source)} AS DOUBLE)"
                if present
                else "CAST(NULL AS DOUBLE)"
            )
            projections.append(f"{raw} AS {alias}")
            slot, value = _numeric_slot(alias, column)
        else:
            raw = quote_identifier(source) if present else "NULL"
            projections.append(f"{raw} AS {alias}")
            slot = _categorical_slot(alias, column, types.get(source))
            value = "CAST(NULL AS DOUBLE)"
        entries.append(f"{{'c': {position}, 'b': {slot}, 'v': {value}}}")
    if not entries:
        return (
            "SELECT -1 AS c, -1 AS b, count(*) AS n, NULL AS s, NULL AS lo, NULL AS hi "  # noqa: S608 - built from a layout
            f"FROM {relation}"
        )
    return (
        f"WITH w AS (SELECT {', '.join(projections)} FROM {relation}), "  # noqa: S608 - built from a layout
        f"u AS (SELECT unnest([{', '.join(entries)}]) AS e FROM w) "
        "SELECT e.c AS c, e.b AS b, count(*) AS n, sum(e.v) AS s, min(e.v) AS lo, max(e.v) AS hi "
        "FROM u GROUP BY ALL"
    )


def sketch_from_rows(layout: SketchLayout, rows: pd.DataFrame) -> WindowSketch:
    """The ``WindowSketch`` of ``sketch_query``'s result."""
    sketch = WindowSketch.empty(layout)
    if not layout.columns:
        sketch.rows = int(rows["n"].sum())
        return sketch
    first = rows[rows["c"] == 0]
    sketch.rows = int(first["n"].sum())
    for position, column in enumerate(layout.columns):
        target = sketch.columns[column.name]
        mine = rows[rows["c"] == position]
        missing = mine["b"] < 0
        target.nulls = float(mine.loc[missing, "n"].sum())
        found = mine[~missing]
        slots = found["b"].to_numpy(np.int64)
        target.counts[slots] = found["n"].to_numpy(np.float64)
        if column.kind == "numeric":
            target.sums[slots] = found["s"].to_numpy(np.float64)
            target.lows[slots] = found["lo"].to_numpy(np.float64)
            target.highs[slots] = found["hi"].to_numpy(np.float64)
    return sketch


def column_types(connection: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    """The DuckDB type of each column of a table or view (without scanning it)."""
    described = connection.sql(f"SELECT * FROM {relation}")  # noqa: S608 - a view name
    return {name: str(kind) for name, kind in zip(described.columns, described.types, strict=True)}


def window_sketch(
    connection: duckdb.DuckDBPyConnection,
    layout: SketchLayout,
    sources: Mapping[str, str],
    model_version: int,
    start: datetime,
    end: datetime,
) -> WindowSketch:
    """The sketch of a model version's rows predicted in ``[start, end)`` of the ``features``
    view, in one scan."""
    types = column_types(connection, "features")
    query = sketch_query(
        layout,
        sources,
        types,
        "(SELECT * FROM features WHERE model_version = $version "
        "AND predicted_at >= $start AND predicted_at < $end)",
    )
    rows: pd.DataFrame = connection.execute(
        query, {"version": model_version, "start": start, "end": end}
    ).df()
    return sketch_from_rows(layout, rows)


def window_sample(
    connection: duckdb.DuckDBPyConnection,
    columns: Sequence[str],
    model_version: int,
    start: datetime,
    end: datetime,
    *,
    rows: int,
    seed: int,
) -> pd.DataFrame:
    """A uniform sample (reservoir) of at most ``rows`` of the window's rows: ``columns`` of
    ``features`` and the label (null when none), ordered by prediction time."""
    selected = ", ".join(quote_identifier(column) for column in columns)
    # The sample is made once (MATERIALIZED: it is read twice below); the labels are filtered
    # to its request ids by a semi-join, whose hash table holds the sample's ids, not every
    # label of the window.
    frame: pd.DataFrame = connection.execute(
        f"WITH s AS MATERIALIZED (SELECT * FROM (SELECT request_id, {selected} FROM features "  # noqa: S608 - declared names
        "WHERE model_version = $version AND predicted_at >= $start AND predicted_at < $end) w "
        f"USING SAMPLE reservoir({int(rows)} ROWS) REPEATABLE ({int(seed)})), "
        "l AS (SELECT request_id, label FROM labels "
        "WHERE request_id IN (SELECT request_id FROM s)) "
        f"SELECT {', '.join(f's.{quote_identifier(c)}' for c in columns)}, l.label "
        "FROM s LEFT JOIN l USING (request_id) ORDER BY s.predicted_at",
        {"version": model_version, "start": start, "end": end},
    ).df()
    return frame
