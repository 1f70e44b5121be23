"""Generated rows: FeatureSpec.encode_rows agrees with validate_row + encode_row on each.

Rows mix values each declared feature accepts with values of every other kind (bools, huge
ints, NaN, infinities, strings, containers), drop features and add unknown ones, so both the
fast check and the pydantic path it falls back to are exercised.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.features import Feature, FeatureKind, FeatureSpec, load_feature_spec
from tests.unit.test_features_encode_rows import EDGES, assert_same_as_reference

pytestmark = pytest.mark.unit

BIKESHARE = load_feature_spec("bikeshare")
EDGE_SPEC = FeatureSpec.model_validate(EDGES)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
)


def admissible(feature: Feature) -> Any:
    """Values the feature accepts."""
    if feature.kind is FeatureKind.CATEGORICAL:
        values = st.sampled_from(feature.categories or ())
    elif feature.dtype == "int":
        values = st.integers(feature.minimum, feature.maximum)  # type: ignore[arg-type]
    else:
        low, high = inner_float(feature.minimum, math.inf), inner_float(feature.maximum, -math.inf)
        values = st.one_of(
            st.floats(low, high, allow_nan=False, allow_infinity=False),
            st.integers(
                None if feature.minimum is None else math.ceil(feature.minimum),
                None if feature.maximum is None else math.floor(feature.maximum),
            ),
        )
    return st.one_of(values, st.none()) if feature.nullable else values


def inner_float(bound: float | None, inwards: float) -> float | None:
    """The bound as a float, moved inwards when no float holds it exactly (EDGES has one)."""
    if bound is None:
        return None
    return float(bound) if float(bound) == bound else math.nextafter(float(bound), inwards)


def around_bounds(feature: Feature) -> Any:
    """Values at and just beyond the feature's bounds, as ints and floats."""
    bounds = [bound for bound in (feature.minimum, feature.maximum) if bound is not None]
    near: list[float] = []
    for bound in bounds or [0]:
        below, above = (
            math.nextafter(float(bound), -math.inf),
            math.nextafter(float(bound), math.inf),
        )
        near += [bound, float(bound), below, above, int(bound) - 1, int(bound) + 1]
    return st.sampled_from(near)


def rows(spec: FeatureSpec) -> Any:
    """A valid row spoiled in zero to three places: a value changed, a feature dropped or added."""
    valid = st.fixed_dictionaries({feature.name: admissible(feature) for feature in spec.features})
    spoilt_value = st.one_of(ANY_VALUE, *(around_bounds(feature) for feature in spec.features))
    names = st.sampled_from([*spec.feature_names, "unknown", "Hr"])
    changes = st.dictionaries(names, spoilt_value, max_size=2)
    dropped = st.sets(st.sampled_from(spec.feature_names), max_size=1)
    return st.builds(
        lambda row, more, gone: {
            name: value for name, value in {**row, **more}.items() if name not in gone
        },
        valid,
        st.one_of(st.just({}), changes),
        st.one_of(st.just(set()), dropped),
    )


# hypothesis comes with schemathesis (a dev dependency).
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(batch=st.lists(rows(BIKESHARE), max_size=20))
def test_bikeshare_batches_match_validate_row(batch: list[dict[str, Any]]) -> None:
    assert_same_as_reference(BIKESHARE, batch)


@SETTINGS
@given(batch=st.lists(rows(EDGE_SPEC), max_size=20))
def test_edge_batches_match_validate_row(batch: list[dict[str, Any]]) -> None:
    assert_same_as_reference(EDGE_SPEC, batch)
