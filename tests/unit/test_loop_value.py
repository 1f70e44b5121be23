"""The loop's value offline: the frozen, scheduled and drift-loop ways of serving a replay."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from driftloop.evaluation import loop_value as lv
from driftloop.training.policy import RetrainPolicy
from driftloop.training.retrain import PREDICTED_AT_COLUMN
from schemas.features import FeatureSpec, TrainingData, load_feature_spec

ROUNDS = 20  # small models: the properties hold, the tests stay fast


@dataclass(frozen=True)
class Replay:
    spec: FeatureSpec
    history: pd.DataFrame
    rows: pd.DataFrame
    first: lgb.Booster


@pytest.fixture(scope="module")
def replay() -> Replay:
    spec = load_feature_spec("bikeshare")
    history = lv.seed_history(spec)
    first = lv.first_champion(spec, history, num_boost_round=ROUNDS)
    return Replay(spec, history, lv.replay_rows(spec, history), first)


def test_the_replay_starts_where_the_first_model_stopped(replay: Replay) -> None:
    times = replay.rows[PREDICTED_AT_COLUMN]
    assert times.iloc[0] == pd.Timestamp("2011-04-01", tz="UTC")
    assert times.is_monotonic_increasing
    assert len(replay.rows) + (replay.history[PREDICTED_AT_COLUMN] < times.iloc[0]).sum() == len(
        replay.history
    )


def test_data_without_time_cannot_be_replayed() -> None:
    with pytest.raises(ValueError, match="no time column"):
        lv.seed_history(load_feature_spec("breast_cancer"))


def test_monthly_moments_are_the_firsts_of_the_months() -> None:
    april, end = datetime(2011, 4, 1, tzinfo=UTC), datetime(2011, 12, 31, 23, tzinfo=UTC)
    moments = lv.monthly_moments(april, end)
    assert len(moments) == 9
    assert moments[0] == april
    assert moments[-1] == datetime(2011, 12, 1, tzinfo=UTC)
    assert lv.monthly_moments(datetime(2011, 11, 15, tzinfo=UTC), end) == [moments[-1]]
    assert lv.monthly_moments(datetime(2011, 12, 2, tzinfo=UTC), datetime(2012, 1, 2, tzinfo=UTC))[
        0
    ] == datetime(2012, 1, 1, tzinfo=UTC)


def test_a_schedule_without_moments_is_the_frozen_champion(replay: Replay) -> None:
    frozen = lv.serve_frozen(replay.spec, replay.rows, replay.first)
    unscheduled = lv.serve_scheduled(
        replay.spec, replay.history, replay.rows, replay.first, [], data=TrainingData()
    )
    np.testing.assert_array_equal(frozen.predictions, unscheduled.predictions)
    assert unscheduled.retrains == 0


def test_monthly_retraining_beats_the_frozen_champion_on_the_seasons(replay: Replay) -> None:
    times = replay.rows[PREDICTED_AT_COLUMN]
    moments = lv.monthly_moments(times.iloc[0].to_pydatetime(), times.iloc[-1].to_pydatetime())
    monthly = lv.serve_scheduled(
        replay.spec,
        replay.history,
        replay.rows,
        replay.first,
        moments,
        data=TrainingData(),
        num_boost_round=ROUNDS,
    )
    frozen = lv.serve_frozen(replay.spec, replay.rows, replay.first)
    assert monthly.retrains == monthly.promotions == 9
    # April is served by the April 1st model: trained on every winter row, the holdout too.
    april = (times < pd.Timestamp("2011-05-01", tz="UTC")).to_numpy()
    assert not np.allclose(monthly.predictions[april], frozen.predictions[april])
    comparison = lv.compare(
        replay.spec, replay.rows, monthly.predictions, frozen=frozen, scheduled=monthly
    )
    assert comparison.realised < comparison.frozen
    assert comparison.lift_over_frozen > 0.2
    assert comparison.lift_over_scheduled == 0


def test_compare_scores_only_the_rows_the_run_served(replay: Replay) -> None:
    frozen = lv.serve_frozen(replay.spec, replay.rows, replay.first)
    truth = replay.rows["bikers"].to_numpy(dtype=np.float64)
    realised = truth.copy()
    realised[::2] = np.nan  # half the hours were never answered
    comparison = lv.compare(replay.spec, replay.rows, realised, frozen=frozen, scheduled=frozen)
    assert comparison.rows == len(truth) // 2
    assert comparison.realised == 0
    assert comparison.lift_over_frozen == 1.0
    expected = lv.score(replay.spec, replay.rows[1::2], frozen.predictions[1::2])
    assert comparison.frozen == pytest.approx(expected)
    with pytest.raises(ValueError, match="one prediction per replayed row"):
        lv.compare(replay.spec, replay.rows, realised[1:], frozen=frozen, scheduled=frozen)
    with pytest.raises(ValueError, match="none of the replayed rows"):
        lv.compare(
            replay.spec, replay.rows, np.full(len(truth), np.nan), frozen=frozen, scheduled=frozen
        )


def test_the_drift_loop_retrains_on_drift_and_a_lag_delays_the_swap(replay: Replay) -> None:
    settings = lv.LoopSettings(
        data=replay.spec.training_data, retrain=RetrainPolicy(num_boost_round=ROUNDS)
    )
    loop = lv.serve_drift_loop(replay.spec, replay.history, replay.rows, replay.first, settings)
    assert np.isfinite(loop.predictions).all()
    assert 1 <= loop.promotions <= loop.retrains
    assert list(loop.swaps) == sorted(loop.swaps)
    # Drift holds after two drifted weekly windows: no swap in the replay's first two weeks.
    assert loop.swaps[0] >= datetime(2011, 4, 14, tzinfo=UTC)
    frozen = lv.serve_frozen(replay.spec, replay.rows, replay.first)
    served_before = (replay.rows[PREDICTED_AT_COLUMN] < loop.swaps[0]).to_numpy()
    np.testing.assert_array_equal(
        loop.predictions[served_before], frozen.predictions[served_before]
    )
    comparison = lv.compare(replay.spec, replay.rows, loop.predictions, frozen, frozen)
    assert comparison.lift_over_frozen > 0

    late = lv.serve_drift_loop(
        replay.spec,
        replay.history,
        replay.rows,
        replay.first,
        lv.LoopSettings(
            data=settings.data, retrain=settings.retrain, lag=timedelta(days=3, hours=5)
        ),
    )
    # The same first retraining, serving 3 days 5 hours later.
    assert late.swaps[0] == loop.swaps[0] + timedelta(days=3, hours=5)
