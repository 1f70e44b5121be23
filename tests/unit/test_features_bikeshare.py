"""The shipped demo data against its declaration and the facts DESIGN.md relies on."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from schemas.features import FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def rides(spec: FeatureSpec) -> pd.DataFrame:
    assert spec.dataset is not None
    return pd.read_csv(REPOSITORY / spec.dataset.path)


def test_every_column_is_accounted_for(spec: FeatureSpec, rides: pd.DataFrame) -> None:
    assert spec.dataset is not None
    declared = {*spec.feature_names, spec.target.name, *spec.dataset.excluded_columns}
    assert set(rides.columns) == declared
    assert set(spec.dataset.order_by) <= set(rides.columns)


def test_the_leaking_columns_sum_to_the_target(rides: pd.DataFrame) -> None:
    assert (rides["casual"] + rides["registered"] == rides["bikers"]).all()


def test_only_2011_is_shipped(rides: pd.DataFrame) -> None:
    assert len(rides) == 8645
    assert rides["day"].between(1, 365).all()
    assert not rides.isna().any().any()


def test_every_row_fits_the_declaration(spec: FeatureSpec, rides: pd.DataFrame) -> None:
    rows = rides[list(spec.feature_names)].to_dict(orient="records")
    for row in rows:
        spec.validate_row({str(name): value for name, value in row.items()})


def test_rows_are_in_time_order(spec: FeatureSpec, rides: pd.DataFrame) -> None:
    assert spec.dataset is not None
    assert list(spec.dataset.order_by) == ["day", "hr"]
    hours = rides["day"] * 24 + rides["hr"]
    assert hours.is_monotonic_increasing
    assert hours.is_unique


def test_calendar_columns_agree_with_the_date(rides: pd.DataFrame) -> None:
    dates = [date(2011, 1, 1) + timedelta(days=int(day) - 1) for day in rides["day"]]
    months = [
        "Jan", "Feb", "March", "April", "May", "June",
        "July", "Aug", "Sept", "Oct", "Nov", "Dec",
    ]  # fmt: skip
    assert [months[moment.month - 1] for moment in dates] == rides["mnth"].tolist()
    # The file counts weekdays from Sunday = 0.
    assert [(moment.weekday() + 1) % 7 for moment in dates] == rides["weekday"].tolist()


@pytest.mark.parametrize(
    ("month", "temp", "bikers"),
    [("Jan", 0.20, 56), ("July", 0.76, 190)],
)
def test_seasonal_drift_of_the_design(
    rides: pd.DataFrame, month: str, temp: float, bikers: float
) -> None:
    in_month = rides[rides["mnth"] == month]
    assert in_month["temp"].mean() == pytest.approx(temp, abs=0.005)
    assert in_month["bikers"].mean() == pytest.approx(bikers, abs=0.6)
