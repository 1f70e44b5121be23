"""The LightGBM C API adapter: on a supported version, and equal to ``Booster.predict``."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from driftloop.serving.lightgbm_native import (
    SUPPORTED_VERSIONS,
    NativeLightGBMError,
    SingleRowPredictor,
    version_supported,
)

pytestmark = pytest.mark.unit


def test_installed_lightgbm_is_a_version_the_binding_is_tested_on() -> None:
    # On an upgrade past the range this fails first: re-check the C API calls in
    # driftloop/serving/lightgbm_native.py against the new c_api.h, then widen the range here
    # and in pyproject.toml.
    assert version_supported(), (
        f"lightgbm {lgb.__version__} is outside {SUPPORTED_VERSIONS}, the range the "
        "single-row binding is tested on"
    )


def test_the_range_check_reads_major_and_minor() -> None:
    assert version_supported("4.6.0")
    assert version_supported("4.7.0.dev1")
    assert not version_supported("4.5.0")
    assert not version_supported("5.0.0")


def _booster(objective: str, features: int, seed: int) -> lgb.Booster:
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(2_000, features))
    matrix[rng.random(matrix.shape) < 0.05] = np.nan
    target = matrix[:, 0] * 3 - np.nan_to_num(matrix[:, 1]) + rng.normal(size=2_000)
    if objective == "binary":
        target = (target > 0).astype(np.float64)
    data = lgb.Dataset(matrix, label=target)
    params = {"objective": objective, "num_leaves": 15, "verbose": -1, "seed": seed}
    return lgb.train(params, data, num_boost_round=40)


@pytest.mark.parametrize("objective", ["regression", "binary"])
def test_single_row_predictions_equal_booster_predict(objective: str) -> None:
    features = 7
    booster = _booster(objective, features, seed=3)
    predictor = SingleRowPredictor(booster, features)
    rows = np.random.default_rng(4).normal(size=(200, features))
    rows[::7, 2] = np.nan
    expected = booster.predict(rows, num_threads=1)
    for index, row in enumerate(rows):
        got = predictor(np.ascontiguousarray(row.reshape(1, -1)))
        assert got.shape == (1,)
        assert got[0] == pytest.approx(expected[index], rel=1e-12, abs=1e-12)


def test_a_row_of_the_wrong_width_is_refused_by_lightgbm() -> None:
    booster = _booster("regression", 4, seed=5)
    with pytest.raises(NativeLightGBMError):
        SingleRowPredictor(booster, 3)
