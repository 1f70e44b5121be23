"""The declared training-data policy: its spelling, its default, and the rows it chooses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from driftloop.training import retrain, trainer
from driftloop.training.history import select_history
from driftloop.training.policy import RetrainPolicy, TooFewLabelsError
from schemas.features import FeatureSpec, TrainingData, load_feature_spec

NOW = datetime(2011, 6, 1, tzinfo=UTC)


def dated(days_ago: list[float | None]) -> tuple[pd.DataFrame, pd.Series]:
    rows = pd.DataFrame({"x": range(len(days_ago))})
    times = pd.Series(
        [None if age is None else NOW - timedelta(days=age) for age in days_ago],
        dtype="datetime64[ns, UTC]",
    )
    return rows, times


# --- the declaration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("all", TrainingData()),
        ({"last_days": 30}, TrainingData(last_days=30)),
        ({"half_life_days": 14}, TrainingData(half_life_days=14)),
    ],
)
def test_the_policy_is_written_all_last_days_or_a_half_life(
    written: object, expected: TrainingData
) -> None:
    assert TrainingData.model_validate(written) == expected


@pytest.mark.parametrize(
    "written", [{"last_days": 30, "half_life_days": 14}, {"last_days": 0}, {"days": 3}, "some"]
)
def test_a_policy_that_says_two_things_or_nothing_known_is_refused(written: object) -> None:
    with pytest.raises(ValidationError):
        TrainingData.model_validate(written)


def test_a_model_learns_as_much_history_as_its_first_version_by_default() -> None:
    # bikeshare's first model learns January to March: 90 days.
    assert load_feature_spec("bikeshare").training_data == TrainingData(last_days=90)
    # breast_cancer's rows have no time: there is no span, every row is kept.
    assert load_feature_spec("breast_cancer").training_data == TrainingData()


def test_a_declared_policy_wins_over_the_default() -> None:
    document = yaml.safe_load(trainer.feature_spec_document(load_feature_spec("bikeshare")))
    document["training"]["data"] = {"half_life_days": 21}
    spec = FeatureSpec.model_validate(document)
    assert spec.training_data == TrainingData(half_life_days=21)
    # It travels with the model: the declaration stored beside it says it again.
    again = FeatureSpec.model_validate(yaml.safe_load(trainer.feature_spec_document(spec)))
    assert again.training_data == TrainingData(half_life_days=21)


# --- the rows chosen ---------------------------------------------------------------------------


def test_all_history_keeps_every_row_unweighted() -> None:
    rows, times = dated([400, 10, None, 0])
    chosen = select_history(rows, times, TrainingData())
    assert chosen.rows["x"].tolist() == [0, 1, 2, 3]
    assert chosen.weights is None


def test_last_days_counts_back_from_the_newest_row_not_the_clock() -> None:
    rows, times = dated([400, 30, 29.5, 10, 0])
    chosen = select_history(rows, times, TrainingData(last_days=30))
    # 30 days old is out: the span is the last 30 days, half-open.
    assert chosen.rows["x"].tolist() == [2, 3, 4]
    # The same rows a year later (a replay): the same choice.
    later = times + pd.Timedelta(days=365)
    assert select_history(rows, later, TrainingData(last_days=30)).rows.equals(chosen.rows)


def test_last_days_from_a_given_moment() -> None:
    rows, times = dated([40, 20, 0])
    assert select_history(rows, times, TrainingData(last_days=30)).rows["x"].tolist() == [1, 2]
    later = NOW + timedelta(days=15)
    chosen = select_history(rows, times, TrainingData(last_days=30), as_of=later)
    assert chosen.rows["x"].tolist() == [2]


def test_a_half_life_weighs_every_row_by_its_age() -> None:
    rows, times = dated([28, 14, 0])
    chosen = select_history(rows, times, TrainingData(half_life_days=14))
    assert chosen.rows["x"].tolist() == [0, 1, 2]
    assert chosen.weights is not None
    np.testing.assert_allclose(chosen.weights, [0.25, 0.5, 1.0])


def test_undated_rows_are_as_old_as_the_oldest_dated_one() -> None:
    rows, times = dated([None, 20, 0])
    assert select_history(rows, times, TrainingData(last_days=30)).rows["x"].tolist() == [0, 1, 2]
    assert select_history(rows, times, TrainingData(last_days=10)).rows["x"].tolist() == [2]
    weights = select_history(rows, times, TrainingData(half_life_days=20)).weights
    assert weights is not None
    np.testing.assert_allclose(weights, [0.5, 0.5, 1.0])


def test_rows_without_any_time_are_all_kept() -> None:
    rows, times = dated([None, None])
    chosen = select_history(rows, times, TrainingData(last_days=1))
    assert len(chosen.rows) == 2
    assert chosen.weights is None


def test_times_must_match_the_rows() -> None:
    rows, times = dated([1, 2])
    with pytest.raises(ValueError, match="times"):
        select_history(rows, times.iloc[:1], TrainingData())


# --- in the DAG's extract ----------------------------------------------------------------------


def test_the_dag_trains_on_the_policys_share_and_weights_reach_the_trainer() -> None:
    spec = load_feature_spec("bikeshare")
    winter = trainer.read_dataset(spec, since="2011-01-01", until="2011-04-01")
    booster = trainer.train_booster(spec, winter, num_boost_round=5)
    reference = trainer.reference_frame(spec, [("train", winter)], booster, leading_columns=["day"])
    spring = trainer.read_dataset(spec, since="2011-04-01", until="2011-05-01")
    spring[retrain.PREDICTED_AT_COLUMN] = trainer.dataset_times(spec, spring).to_numpy()
    spring[retrain.REQUEST_ID_COLUMN] = [f"r{i:05d}" for i in range(len(spring))]
    older, holdout = retrain.split_recent(spring, RetrainPolicy())
    assembled = retrain.assemble_training_set(spec, reference, older)
    as_of = holdout[retrain.PREDICTED_AT_COLUMN].iloc[-1].to_pydatetime()

    # bikeshare's default: the last 90 days before the holdout's newest row.
    chosen, weighted = retrain.choose_history(
        assembled, spec.training_data, as_of, min_rows=RetrainPolicy().min_holdout_rows
    )
    assert not weighted
    oldest = chosen[retrain.PREDICTED_AT_COLUMN].min()
    assert oldest > pd.Timestamp(as_of) - pd.Timedelta(days=90)
    assert len(chosen) < len(assembled)
    assert (chosen[retrain.ORIGIN_COLUMN] == "seed").any()

    document = yaml.safe_load(trainer.feature_spec_document(spec))
    document["training"]["data"] = {"half_life_days": 30}
    weighing = FeatureSpec.model_validate(document)
    rows, weighted = retrain.choose_history(
        assembled, weighing.training_data, as_of, min_rows=RetrainPolicy().min_holdout_rows
    )
    assert weighted
    assert len(rows) == len(assembled)
    weights = rows.pop(retrain.WEIGHT_COLUMN).to_numpy()
    assert weights.min() < 0.2 < weights.max() <= 1.0
    # The trainer takes them: a model weighted towards spring predicts spring's higher counts.
    flat = trainer.train_booster(weighing, rows, num_boost_round=30)
    recent = trainer.train_booster(weighing, rows, num_boost_round=30, weights=weights)
    matrix = trainer.feature_matrix(spec, holdout)
    assert np.mean(np.asarray(recent.predict(matrix))) > np.mean(np.asarray(flat.predict(matrix)))
    with pytest.raises(ValueError, match="weights"):
        trainer.train_booster(weighing, rows, weights=weights[:-1])
    # A span shorter than the holdout keeps no row before it: the run fails, champion stays.
    with pytest.raises(TooFewLabelsError, match="keeps 0 of"):
        retrain.choose_history(assembled, TrainingData(last_days=3), as_of, min_rows=50)
