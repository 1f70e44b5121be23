"""Thresholds calibrated from a version's own reference: judged on the real data."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from driftloop.drift import episodes
from driftloop.drift.baseline import (
    DriftBaseline,
    PreparedBaseline,
    calibrate,
    prepare,
    reference_arrays,
    sample_sizes,
)
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.sketch import WindowSketch
from schemas.features import FeatureSpec

pytestmark = pytest.mark.unit

WEEK = 168
POLICY = DriftPolicy()


@pytest.fixture(scope="module")
def baseline(spec: FeatureSpec, winter: pd.DataFrame) -> DriftBaseline:
    return calibrate(spec, winter, POLICY)


@pytest.fixture(scope="module")
def prepared(baseline: DriftBaseline, winter: pd.DataFrame) -> PreparedBaseline:
    return prepare(baseline, winter)


def verdict(prepared: PreparedBaseline, window: pd.DataFrame) -> tuple[bool, list[str]]:
    """Whether the window drifted (share of drifted features), and which features did."""
    baseline = prepared.baseline
    sketch = WindowSketch.of(baseline.layout, reference_arrays(window, baseline.layout))
    distances = prepared.distances(sketch)
    drifted = [
        name
        for name in baseline.features
        if distances[name].score > baseline.threshold(name, len(window))
    ]
    return len(drifted) / len(baseline.features) >= POLICY.drift_share_threshold, drifted


def episodes_opened(
    prepared: PreparedBaseline, windows: Iterator[pd.DataFrame]
) -> list[tuple[int, str]]:
    state = episodes.start("bikeshare", 1)
    start = datetime(2011, 1, 1, tzinfo=UTC)
    opened = []
    for index, window in enumerate(windows):
        drifted, _ = verdict(prepared, window)
        step = episodes.advance(
            state, start + timedelta(weeks=index + 1), drifted=drifted, policy=POLICY
        )
        if step.opened and step.episode_id is not None:
            opened.append((index, step.episode_id))
        state = step.state
    return opened


def weeks(frame: pd.DataFrame) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame) - WEEK + 1, WEEK):
        yield frame.iloc[start : start + WEEK]


def test_thresholds_come_from_the_reference(baseline: DriftBaseline) -> None:
    assert baseline.sampling == "time_blocks"
    assert baseline.quantile == 0.99
    assert baseline.sample_rows == (150, 300, 600)
    assert baseline.features == ("weathersit", "temp", "atemp", "hum", "windspeed")
    for column in baseline.columns:
        assert not column.explicit
        # A larger sample sits closer to the whole: thresholds never loosen as windows grow.
        assert all(b <= a for a, b in zip(column.thresholds, column.thresholds[1:], strict=False))
        assert all(threshold > 0 for threshold in column.thresholds)
    temp = baseline.threshold("temp", WEEK)
    assert baseline.threshold("temp", 150) > temp > baseline.threshold("temp", 300)
    assert baseline.threshold("temp", 10_000_000) == baseline.calibration("temp").thresholds[-1]


def test_calibration_is_repeatable_and_stored_as_json(
    spec: FeatureSpec, winter: pd.DataFrame, baseline: DriftBaseline
) -> None:
    again = calibrate(spec, winter, POLICY)
    assert again == baseline
    assert DriftBaseline.model_validate_json(baseline.to_json()) == baseline
    assert baseline.follows(POLICY)
    assert not baseline.follows(DriftPolicy(threshold_quantile=0.95))
    assert not baseline.follows(DriftPolicy(feature_thresholds={"temp": 0.5}))


def test_an_explicit_threshold_replaces_the_calibrated_one(
    spec: FeatureSpec, winter: pd.DataFrame
) -> None:
    policy = DriftPolicy(feature_thresholds={"temp": 0.5})
    baseline = calibrate(spec, winter, policy)
    assert baseline.calibration("temp").explicit
    assert baseline.threshold("temp", WEEK) == 0.5
    assert not baseline.calibration("hum").explicit


def test_weekly_windows_of_the_training_months_open_no_episode(
    prepared: PreparedBaseline, winter: pd.DataFrame
) -> None:
    """Time-contiguous weeks of Jan-Mar against the Jan-Mar reference: the model's own data."""
    assert len(list(weeks(winter))) == 12
    assert episodes_opened(prepared, weeks(winter)) == []
    # Every day-aligned weekly span, not only the 12 disjoint ones (an episode needs two
    # drifted windows in a row, so each span is judged beside the one a week later).
    spans = [winter.iloc[s : s + WEEK] for s in range(0, len(winter) - 2 * WEEK + 1, 24)]
    pairs = [
        verdict(prepared, a)[0] and verdict(prepared, winter.iloc[s + WEEK : s + 2 * WEEK])[0]
        for s, a in zip(range(0, len(winter) - 2 * WEEK + 1, 24), spans, strict=True)
    ]
    assert not any(pairs)


def test_the_spring_drift_is_caught_within_two_weeks(
    prepared: PreparedBaseline, later: pd.DataFrame
) -> None:
    april_on = later
    first_two = [verdict(prepared, window) for window in list(weeks(april_on))[:2]]
    assert any(drifted for drifted, _ in first_two)
    drifted_features = next(features for drifted, features in first_two if drifted)
    assert {"temp", "atemp"} <= set(drifted_features)
    opened = episodes_opened(prepared, weeks(april_on))
    assert opened, "the seasonal drift opened no episode"
    first_week, _ = opened[0]
    assert first_week <= 2  # the second drifted week in a row confirms the episode


def test_random_windows_of_unordered_data_open_no_episode() -> None:
    """Breast-cancer measurements have no time order: calibrated by resampling, 50 windows."""
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda name: name.replace(" ", "_"))
    features = [name for name in frame.columns if name != "target"]
    spec = FeatureSpec.model_validate(
        {
            "name": "breast_cancer",
            "description": "Wisconsin diagnostic breast cancer (scikit-learn's copy).",
            "task": "classification",
            "registered_model_name": "breast_cancer",
            "target": {"name": "malignant", "description": "1 when the tumour is malignant."},
            "features": [
                {"name": name, "kind": "numeric", "dtype": "float", "description": name}
                for name in features
            ],
        }
    )
    rng = np.random.default_rng(3)
    shuffled = frame.sample(frac=1.0, random_state=11).reset_index(drop=True)
    reference, live = shuffled.iloc[:400], shuffled.iloc[400:]
    policy = DriftPolicy(min_rows=60)
    baseline = calibrate(spec, reference, policy)
    assert baseline.sampling == "resampling"
    prepared_cancer = prepare(baseline, reference)
    pool = pd.concat([reference, live], ignore_index=True)
    state = episodes.start("breast_cancer", 1)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    drifted_windows = 0
    for index in range(50):
        window = pool.iloc[rng.choice(len(pool), size=80, replace=False)]
        sketch = WindowSketch.of(baseline.layout, reference_arrays(window, baseline.layout))
        distances = prepared_cancer.distances(sketch)
        share = np.mean(
            [distances[n].score > baseline.threshold(n, len(window)) for n in baseline.features]
        )
        drifted = bool(share >= policy.drift_share_threshold)
        drifted_windows += drifted
        step = episodes.advance(
            state, start + timedelta(minutes=index + 1), drifted=drifted, policy=policy
        )
        assert not step.opened
        state = step.state
    assert drifted_windows == 0


def test_sample_sizes_double_up_to_half_the_reference_or_a_cap() -> None:
    assert sample_sizes(2000, 150) == [150, 300, 600]
    assert sample_sizes(100, 150) == [100]
    assert sample_sizes(1_000_000, 150)[-1] == 9_600


def test_a_reference_too_small_to_sample_calibrates_nothing(spec: FeatureSpec) -> None:
    empty = pd.DataFrame(columns=[*spec.feature_names, "prediction"])
    baseline = calibrate(spec, empty, POLICY, time_ordered=False)
    assert baseline.reference_rows == 0
    assert all(t == sys.float_info.max for c in baseline.columns for t in c.thresholds)
    assert DriftBaseline.model_validate_json(baseline.to_json()) == baseline


def test_a_reference_with_values_near_the_float_range_stays_json(
    spec: FeatureSpec, winter: pd.DataFrame
) -> None:
    """Retraining can take in valid rows with unbounded features near 1e308."""
    extreme = winter.copy()
    extreme.loc[extreme.index[:30], "atemp"] = 1.7e308
    extreme.loc[extreme.index[30:40], "windspeed"] = -1.7e308
    baseline = calibrate(spec, extreme, POLICY)
    assert 0 < baseline.layout.column("atemp").norm < float("inf")
    assert all(0 < t < float("inf") for column in baseline.columns for t in column.thresholds)
    back = DriftBaseline.model_validate_json(baseline.to_json())
    assert back == baseline
    assert "Infinity" not in baseline.to_json().decode()
