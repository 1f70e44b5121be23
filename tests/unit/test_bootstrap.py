"""The first model: rows chosen by time, the holdout (by time or seeded at random), holdout
scores by task, the reference dataset's shape."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from driftloop.drift.assessment import PREDICTION_COLUMN
from driftloop.training import bootstrap, trainer
from schemas.features import FeatureSpec, Metric, Task, Training, load_feature_spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def window(spec: FeatureSpec) -> pd.DataFrame:
    return trainer.read_dataset(spec, since=spec.training.since, until=spec.training.until)


def test_the_window_is_the_winter_quarter(window: pd.DataFrame) -> None:
    assert set(window["mnth"]) == {"Jan", "Feb", "March"}
    assert window["day"].min() == 1
    assert window["day"].max() == 90


def test_the_holdout_is_the_last_days_in_time_order(
    spec: FeatureSpec, window: pd.DataFrame
) -> None:
    train, holdout = bootstrap.split_holdout(spec, window)

    assert set(holdout["day"]) == set(range(77, 91))
    assert train["day"].max() < holdout["day"].min()
    assert len(train) + len(holdout) == len(window)
    assert list(holdout["day"]) == sorted(holdout["day"])


@pytest.mark.parametrize("days", [90, 400])
def test_a_holdout_must_leave_rows_on_both_sides(
    spec: FeatureSpec, window: pd.DataFrame, days: int
) -> None:
    longer = spec.model_copy(update={"training": Training(holdout=timedelta(days=days))})

    with pytest.raises(ValueError, match="holdout"):
        bootstrap.split_holdout(longer, window)


def test_without_a_time_column_the_holdout_is_a_seeded_random_share(
    spec: FeatureSpec, window: pd.DataFrame
) -> None:
    assert spec.dataset is not None
    untimed = spec.model_copy(
        update={
            "dataset": spec.dataset.model_copy(update={"time": None, "order_by": ()}),
            "training": Training(holdout_fraction=0.25, seed=3),
        }
    )

    train, holdout = bootstrap.split_holdout(untimed, window)
    _, again = bootstrap.split_holdout(untimed, window)

    assert len(holdout) == math.ceil(len(window) * 0.25)
    assert len(train) + len(holdout) == len(window)
    pd.testing.assert_frame_equal(holdout, again)
    # Drawn from the whole window, not its end: the holdout spans the quarter.
    assert holdout["day"].min() < 15
    assert holdout["day"].max() > 75


def test_rows_are_chosen_by_the_declared_time(spec: FeatureSpec) -> None:
    march = trainer.read_dataset(spec, since="2011-03-01", until="2011-04-01")
    first_hours = trainer.read_dataset(spec, since="2011-01-01T00:00", until="2011-01-01T03:00")

    assert set(march["mnth"]) == {"March"}
    assert list(first_hours["hr"]) == [0, 1, 2]
    times = trainer.dataset_times(spec, march)
    assert times.is_monotonic_increasing
    assert times.iloc[0] == pd.Timestamp("2011-03-01T00:00Z")


def test_an_untimed_dataset_refuses_a_time_selection(spec: FeatureSpec) -> None:
    assert spec.dataset is not None
    untimed = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"time": None})})

    with pytest.raises(ValueError, match="no time column"):
        trainer.read_dataset(untimed, since="2011-03-01")


def test_regression_scores_are_rmse_and_mae(spec: FeatureSpec) -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = np.array([1.0, 2.0, 3.0, 8.0])

    scores = bootstrap.score_holdout(spec, truth, predicted)

    assert list(scores.values) == [Metric.RMSE, Metric.MAE]
    assert scores["rmse"] == pytest.approx(2.0)
    assert scores["mae"] == pytest.approx(1.0)
    assert scores.rows == 4


def test_classification_scores_are_log_loss_roc_auc_and_brier(spec: FeatureSpec) -> None:
    classifier = spec.model_copy(update={"task": Task.CLASSIFICATION})
    truth = np.array([1.0, 0.0, 1.0, 0.0])
    predicted = np.array([0.9, 0.2, 0.4, 0.6])

    scores = bootstrap.score_holdout(classifier, truth, predicted)

    assert list(scores.values) == [Metric.LOG_LOSS, Metric.ROC_AUC, Metric.BRIER]
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 0.4]))
    assert scores["log_loss"] == pytest.approx(expected_loss)
    # Pairs (positive, negative): 0.9 beats both, 0.4 beats 0.2 only: 3 of 4.
    assert scores["roc_auc"] == pytest.approx(0.75)
    assert scores["brier"] == pytest.approx(np.mean([0.01, 0.04, 0.36, 0.36]))


def test_scores_need_matching_lengths(spec: FeatureSpec) -> None:
    with pytest.raises(ValueError, match="as many"):
        bootstrap.score_holdout(spec, np.array([1.0]), np.array([1.0, 2.0]))


def test_reference_has_features_prediction_target_and_split(
    spec: FeatureSpec, window: pd.DataFrame
) -> None:
    train, holdout = bootstrap.split_holdout(spec, window)
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
