"""The first model: time-ordered holdout, holdout scores, the reference dataset's shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from driftloop.drift.assessment import PREDICTION_COLUMN
from driftloop.training import bootstrap, trainer
from schemas.features import FeatureSpec, load_feature_spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def window(spec: FeatureSpec) -> pd.DataFrame:
    return trainer.read_dataset(spec, months=bootstrap.TRAINING_MONTHS)


def test_the_window_is_the_winter_quarter(window: pd.DataFrame) -> None:
    assert set(window["mnth"]) == {"Jan", "Feb", "March"}
    assert window["day"].min() == 1
    assert window["day"].max() == 90


def test_the_holdout_is_the_last_days_in_time_order(
    spec: FeatureSpec, window: pd.DataFrame
) -> None:
    train, holdout = bootstrap.split_holdout(spec, window, holdout_days=14)

    assert set(holdout["day"]) == set(range(77, 91))
    assert train["day"].max() < holdout["day"].min()
    assert len(train) + len(holdout) == len(window)
    assert list(holdout["day"]) == sorted(holdout["day"])


@pytest.mark.parametrize("days", [0, 90])
def test_a_holdout_must_leave_rows_on_both_sides(
    spec: FeatureSpec, window: pd.DataFrame, days: int
) -> None:
    with pytest.raises(ValueError, match="holdout"):
        bootstrap.split_holdout(spec, window, holdout_days=days)


def test_scores_are_rmse_and_mae() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = np.array([1.0, 2.0, 3.0, 8.0])

    scores = bootstrap.score_holdout(truth, predicted)

    assert scores.rmse == pytest.approx(2.0)
    assert scores.mae == pytest.approx(1.0)
    assert scores.rows == 4


def test_scores_need_matching_lengths() -> None:
    with pytest.raises(ValueError, match="as many"):
        bootstrap.score_holdout(np.array([1.0]), np.array([1.0, 2.0]))


def test_reference_has_features_prediction_target_and_split(
    spec: FeatureSpec, window: pd.DataFrame
) -> None:
    train, holdout = bootstrap.split_holdout(spec, window, holdout_days=14)
    booster = trainer.train_booster(spec, train, num_boost_round=5)

    reference = bootstrap.reference_frame(spec, [("train", train), ("holdout", holdout)], booster)

    assert list(reference.columns) == [
        "day",
        *spec.feature_names,
        PREDICTION_COLUMN,
        spec.target.name,
        bootstrap.SPLIT_COLUMN,
    ]
    assert len(reference) == len(window)
    assert reference[bootstrap.SPLIT_COLUMN].value_counts().to_dict() == {
        "train": len(train),
        "holdout": len(holdout),
    }
    assert reference[PREDICTION_COLUMN].dtype == np.float64
    assert reference[PREDICTION_COLUMN].notna().all()
    np.testing.assert_array_equal(reference[spec.target.name], window[spec.target.name])


def test_the_prediction_column_is_the_drift_monitors() -> None:
    assert bootstrap.PREDICTION_COLUMN == PREDICTION_COLUMN
