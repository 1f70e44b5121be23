"""A version's quality limits, calibrated on its own holdout, and the windows that pass them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from driftloop.drift.assessment import QualityAssessment
from driftloop.drift.baseline import (
    HOLDOUT_SPLIT,
    SPLIT_COLUMN,
    DriftBaseline,
    QualityCalibration,
    calibrate,
    calibrate_quality,
)
from driftloop.drift.monitor import quality_verdict
from driftloop.drift.policy import DriftPolicy
from driftloop.training.metrics import metric_value
from schemas.features import FeatureSpec, Task

pytestmark = pytest.mark.unit

WEEK = 168
POLICY = DriftPolicy()


@pytest.fixture(scope="module")
def reference(winter: pd.DataFrame) -> pd.DataFrame:
    """The winter months as a version's reference: its last two weeks held out."""
    split = np.where(np.arange(len(winter)) >= len(winter) - 2 * WEEK, HOLDOUT_SPLIT, "train")
    return winter.assign(**{SPLIT_COLUMN: split})


@pytest.fixture(scope="module")
def calibration(spec: FeatureSpec, reference: pd.DataFrame) -> QualityCalibration:
    quality = calibrate_quality(spec, reference, POLICY)
    assert quality is not None
    return quality


def rmse(rows: pd.DataFrame) -> float:
    truth = rows["bikers"].to_numpy(np.float64)
    return metric_value("rmse", truth, rows["prediction"].to_numpy(np.float64))


def test_limits_come_from_the_holdout_alone(
    calibration: QualityCalibration, reference: pd.DataFrame
) -> None:
    holdout = reference[reference[SPLIT_COLUMN] == HOLDOUT_SPLIT]
    assert calibration.metric == "rmse"
    assert not calibration.greater_is_better
    assert calibration.holdout_rows == 2 * WEEK
    assert calibration.holdout_value == pytest.approx(rmse(holdout))
    assert calibration.sample_rows[0] == POLICY.min_labelled_rows
    # An error's limit sits above the holdout's error, and tightens as the window grows.
    assert all(limit > calibration.holdout_value for limit in calibration.thresholds)
    assert calibration.thresholds[0] > calibration.thresholds[-1]
    assert calibration.threshold(10**9) == calibration.thresholds[-1]


def test_the_versions_own_weeks_are_not_degraded(
    calibration: QualityCalibration, winter: pd.DataFrame
) -> None:
    weeks = [winter.iloc[start : start + WEEK] for start in range(0, len(winter) - WEEK, WEEK)]
    degraded = [calibration.degraded(rmse(week), len(week)) for week in weeks]
    # The same oracle all winter: its error stays inside the holdout's spread, weeks of
    # lighter traffic (January) well under it.
    assert sum(degraded) <= 1, degraded


def test_a_stale_model_is_degraded(calibration: QualityCalibration, later: pd.DataFrame) -> None:
    # July served by the winter's average: the error the drift loop must answer.
    july = later[later["mnth"] == "July"].iloc[:WEEK]
    stale = july.assign(prediction=july["bikers"].mean() / 3)
    assert calibration.degraded(rmse(stale), len(stale))
    assert not calibration.degraded(math.nan, len(stale))


def test_a_score_degrades_downwards() -> None:
    auc = QualityCalibration(
        metric="roc_auc",
        greater_is_better=True,
        holdout_rows=300,
        holdout_value=0.9,
        sample_rows=(50, 100),
        thresholds=(0.8, 0.85),
    )
    assert auc.degraded(0.79, 50)
    assert not auc.degraded(0.82, 50)
    assert auc.degraded(0.84, 100)


def test_no_labelled_holdout_no_limits(spec: FeatureSpec, winter: pd.DataFrame) -> None:
    assert calibrate_quality(spec, winter, POLICY) is None  # no split column
    training_only = winter.assign(**{SPLIT_COLUMN: "train"})
    assert calibrate_quality(spec, training_only, POLICY) is None
    unlabelled = winter.assign(**{SPLIT_COLUMN: HOLDOUT_SPLIT})
    unlabelled["bikers"] = np.nan
    assert calibrate_quality(spec, unlabelled, POLICY) is None


def test_the_baseline_stores_whether_quality_was_judged(
    spec: FeatureSpec, reference: pd.DataFrame, calibration: QualityCalibration
) -> None:
    baseline = calibrate(spec, reference, POLICY)
    assert baseline.judges_quality
    assert baseline.quality == calibration
    assert DriftBaseline.model_validate_json(baseline.to_json()) == baseline
    off = DriftPolicy(judge_quality=False)
    assert not baseline.follows(off)
    unjudged = calibrate(spec, reference, off)
    assert unjudged.quality is None
    assert unjudged.follows(off)
    assert not unjudged.follows(POLICY)
    # A baseline stored before quality was judged is calibrated again under the default.
    stored = baseline.model_dump(mode="json", exclude={"judges_quality", "quality"})
    assert not DriftBaseline.model_validate(stored).follows(POLICY)


def test_the_monitor_judges_the_promotion_metric(
    spec: FeatureSpec, reference: pd.DataFrame, later: pd.DataFrame
) -> None:
    baseline = calibrate(spec, reference, POLICY)
    assert baseline.quality is not None
    july = later[later["mnth"] == "July"].iloc[:WEEK]

    def quality(value: float) -> QualityAssessment:
        return QualityAssessment(
            task=Task.REGRESSION, labelled_rows=len(july), metrics={"rmse": value, "mae": 1.0}
        )

    limit = baseline.quality.threshold(len(july))
    assert quality_verdict(baseline, quality(limit * 1.5)) == (limit, True)
    assert quality_verdict(baseline, quality(limit * 0.5)) == (limit, False)
    assert quality_verdict(baseline, None) == (None, False)
    unjudged = baseline.model_copy(update={"quality": None})
    assert quality_verdict(unjudged, quality(limit * 1.5)) == (None, False)
