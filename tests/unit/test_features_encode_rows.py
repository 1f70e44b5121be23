"""FeatureSpec.encode_rows gives, row by row, exactly what validate_row + encode_row give.

Every row is compared with the per-row reference: the same rows accepted, bit-identical input
vectors (NaN for missing values), and for each refused row an error of the same type with the
same text (what the batch scorer words its refusals from). The rows are a deterministic corpus
of valid rows and of a valid row spoiled one feature at a time; test_features_encode_rows_fuzz.py
adds generated rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import orjson
import pytest

from schemas.features import FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit

# Declarations whose bounds exercise every branch of the fast check: unbounded ints, ints
# bounded beyond 2**53, float features with int, float and float-inexact int bounds, nullable
# and non-nullable categories of both types.
EDGES: dict[str, Any] = {
    "name": "edges",
    "description": "Every kind of feature the declarations allow.",
    "task": "regression",
    "registered_model_name": "edges",
    "target": {"name": "y", "description": "Anything."},
    "features": [
        {"name": "count", "kind": "numeric", "dtype": "int", "description": "Unbounded."},
        {
            "name": "wide",
            "kind": "numeric",
            "dtype": "int",
            "minimum": -(2**60),
            "maximum": 2**60,
            "nullable": True,
            "description": "Bounded beyond 2**53.",
        },
        {
            "name": "share",
            "kind": "numeric",
            "dtype": "float",
            "minimum": -1,
            "maximum": 1,
            "description": "Int bounds on a float.",
        },
        {
            "name": "level",
            "kind": "numeric",
            "dtype": "float",
            "minimum": 0.25,
            "nullable": True,
            "description": "A float lower bound only.",
        },
        {
            "name": "odd",
            "kind": "numeric",
            "dtype": "float",
            "maximum": 2**53 + 1,
            "nullable": True,
            "description": "A bound no float holds exactly.",
        },
        {
            "name": "free",
            "kind": "numeric",
            "dtype": "float",
            "nullable": True,
            "description": "Unbounded float.",
        },
        {
            "name": "grade",
            "kind": "categorical",
            "dtype": "int",
            "categories": [0, 1, 5],
            "nullable": True,
            "description": "Nullable int categories.",
        },
        {
            "name": "colour",
            "kind": "categorical",
            "dtype": "str",
            "categories": ["red", "green"],
            "description": "Required str categories.",
        },
    ],
}
EDGES_ROW: dict[str, Any] = {
    "count": 3,
    "wide": -5,
    "share": 0.5,
    "level": 0.25,
    "odd": 1.5,
    "free": -1e300,
    "grade": 5,
    "colour": "green",
}
BIKESHARE_ROW: dict[str, Any] = {
    "season": 1, "mnth": "Jan", "hr": 0, "holiday": 0, "weekday": 6, "workingday": 0,
    "weathersit": "clear", "temp": 0.24, "atemp": 0.2879, "hum": 0.81, "windspeed": 0.0,
}  # fmt: skip


class Number(float):
    """A float subclass (numpy.float64 is one): strict pydantic decides, not the fast check."""


STRANGE_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 5, 23, 24, 2, -0.0, 0.0, 0.25, 0.2499999, 0.5, 1.0, 1,
    1.0000000000000002, -1.0000000000000002, 1e308, -1e308, 5e-324, 2**53, 2**53 + 1, -(2**53),
    2**60, 2**60 + 1, -(2**60) - 1, 2**63, 2**64, 10**400, -(10**400),
    math.nan, math.inf, -math.inf, Number(0.5), np.float64(0.5), np.int64(1),
    "", "Jan", "January", "red", "clear", "0", "1", "0.5", "NaN", "\u0000", "\ud800", "é" * 50,
    [], [1], {}, {"a": 1}, (1,), b"1", object(),
]  # fmt: skip


def reference(spec: FeatureSpec, row: object) -> tuple[str, object]:
    """What the scorer did per row before encode_rows: validate_row then encode_row."""
    try:
        vector = spec.encode_row(spec.validate_row(row))  # type: ignore[arg-type]
    except (ValueError, TypeError) as error:
        return "refused", (type(error), str(error))
    return "accepted", np.array(vector, dtype=np.float64).tobytes()


def assert_same_as_reference(spec: FeatureSpec, rows: Sequence[object]) -> None:
    expected = [reference(spec, row) for row in rows]
    kept = list(rows)
    encoded = spec.encode_rows(kept)  # type: ignore[arg-type]
    assert encoded.matrix.shape == (len(encoded.accepted), len(spec.features))
    assert encoded.matrix.dtype == np.float64
    batch: dict[int, tuple[str, object]] = {
        position: ("accepted", encoded.matrix[index].tobytes())
        for index, position in enumerate(encoded.accepted)
    }
    for position, error in encoded.refused:
        assert position not in batch
        batch[position] = ("refused", (type(error), str(error)))
    assert encoded.accepted == sorted(encoded.accepted)
    assert [position for position, _ in encoded.refused] == sorted(
        position for position, _ in encoded.refused
    )
    assert sorted(batch) == list(range(len(kept)))
    for position, row in enumerate(kept):
        assert batch[position] == expected[position], (position, row)


def spoiled_rows(valid: Mapping[str, Any]) -> list[object]:
    """The valid row, then each feature set to each strange value, dropped, or joined by more."""
    int_key: dict[object, object] = {**valid}  # type: ignore[dict-item]
    int_key[1] = 1
    rows: list[object] = [dict(valid)]
    for name in valid:
        rows += [{**valid, name: value} for value in STRANGE_VALUES]
        rows.append({key: value for key, value in valid.items() if key != name})
    rows += [
        {**valid, "unknown": 1},
        int_key,
        {},
        dict.fromkeys(valid),
        MappingProxyType(dict(valid)),
        [],
        None,
        "row",
    ]
    return rows


@pytest.fixture(scope="module")
def bikeshare() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def edges() -> FeatureSpec:
    return FeatureSpec.model_validate(EDGES)


def test_plain_valid_rows_are_encoded_like_encode_row(bikeshare: FeatureSpec) -> None:
    rows = [
        BIKESHARE_ROW,
        {**BIKESHARE_ROW, "mnth": "Dec", "season": 4, "weathersit": None, "temp": None},
        {key: value for key, value in BIKESHARE_ROW.items() if key not in {"hum", "atemp"}},
        {**BIKESHARE_ROW, "windspeed": 0, "hum": 1, "temp": -3},
    ]
    encoded = bikeshare.encode_rows(rows)
    assert encoded.accepted == [0, 1, 2, 3]
    assert encoded.refused == []
    expected = np.array([bikeshare.encode_row(bikeshare.validate_row(row)) for row in rows])
    np.testing.assert_array_equal(encoded.matrix, expected)
    assert_same_as_reference(bikeshare, rows)


def test_every_spoiled_bikeshare_row_matches_validate_row(bikeshare: FeatureSpec) -> None:
    rows = spoiled_rows(BIKESHARE_ROW)
    encoded = bikeshare.encode_rows(rows)  # type: ignore[arg-type]
    assert len(encoded.refused) > len(rows) / 2  # the corpus is mostly invalid
    assert_same_as_reference(bikeshare, rows)


def test_every_spoiled_edge_row_matches_validate_row(edges: FeatureSpec) -> None:
    assert_same_as_reference(edges, spoiled_rows(EDGES_ROW))


def test_refusals_keep_validate_rows_wording(bikeshare: FeatureSpec) -> None:
    encoded = bikeshare.encode_rows(
        [BIKESHARE_ROW, {**BIKESHARE_ROW, "hr": 24}, {**BIKESHARE_ROW, "temp": math.nan}]
    )
    assert encoded.accepted == [0]
    assert [position for position, _ in encoded.refused] == [1, 2]
    assert "less than or equal to 23" in str(encoded.refused[0][1])
    assert "finite number" in str(encoded.refused[1][1])


def test_an_int_beyond_64_bits_is_refused_not_raised(edges: FeatureSpec) -> None:
    # An unbounded int feature: 10**400 is a valid int but no float64 (it once stopped the
    # batch scorer with an OverflowError), and 2**63 is a float64 but no JSON number the
    # event encoder writes (orjson holds 64-bit integers): both are refused with the field.
    too_big = [10**400, -(10**309), 2**63, -(2**63) - 1]
    rows = [EDGES_ROW, *({**EDGES_ROW, "count": value} for value in too_big)]
    encoded = edges.encode_rows(rows)
    assert encoded.accepted == [0]
    assert [position for position, _ in encoded.refused] == [1, 2, 3, 4]
    assert "count" in str(encoded.refused[0][1])
    assert "less than or equal to 9223372036854775807" in str(encoded.refused[0][1])
    assert "greater than or equal to -9223372036854775808" in str(encoded.refused[1][1])
    extremes = [{**EDGES_ROW, "count": 2**63 - 1}, {**EDGES_ROW, "count": -(2**63)}]
    assert edges.encode_rows(extremes).accepted == [0, 1]
    assert orjson.loads(orjson.dumps(extremes)) == extremes


def test_an_empty_batch_is_an_empty_matrix(bikeshare: FeatureSpec) -> None:
    encoded = bikeshare.encode_rows([])
    assert encoded.matrix.shape == (0, len(bikeshare.features))
    assert encoded.accepted == []
    assert encoded.refused == []


def test_an_all_refused_batch_is_an_empty_matrix(bikeshare: FeatureSpec) -> None:
    encoded = bikeshare.encode_rows([{"hr": 1}, {**BIKESHARE_ROW, "season": 9}])
    assert encoded.matrix.shape == (0, len(bikeshare.features))
    assert [position for position, _ in encoded.refused] == [0, 1]
