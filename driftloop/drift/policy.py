"""The drift policy: which statistical tests decide drift, and when a window is judged at all.

No threshold here is a number: each version's thresholds are calibrated on its own reference
(``driftloop.drift.baseline``), at the policy's quantile, unless the policy names one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from driftloop.drift.sketch import CATEGORICAL_TESTS as SKETCH_CATEGORICAL_TESTS
from driftloop.drift.sketch import NUMERIC_TESTS as SKETCH_NUMERIC_TESTS
from schemas.features import FeatureKind

Threshold = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]

# Only tests whose score is a distance, which window sketches compute
# (``driftloop.drift.sketch``) and whose thresholds are calibrated per window size: p-values
# fall with the sample size, so a long window would drift on a negligible shift.
CATEGORICAL_TESTS = SKETCH_CATEGORICAL_TESTS
NUMERIC_TESTS = SKETCH_NUMERIC_TESTS


class DriftPolicy(BaseModel):
    """How windows are judged: stat tests and thresholds, minimum sizes, when drift holds."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    drift_share_threshold: Share = 0.4
    """A window drifts when at least this share of the monitored features drifted."""
    numeric_stat_test: str = "wasserstein"
    """Stat test of numeric features (normed Wasserstein: distance in reference stds)."""
    categorical_stat_test: str = "jensenshannon"
    """Stat test of categorical features."""
    prediction_stat_test: str = "wasserstein"
    """Stat test of the predictions (a numeric column)."""
    feature_thresholds: Mapping[str, Threshold] = Field(default_factory=dict)
    """Explicit thresholds of some columns (features, or ``prediction``), replacing the ones
    calibrated on each version's reference (``driftloop.drift.baseline``)."""
    min_rows: Count = 150
    """Fewest rows a window (and the reference) must have to be judged; smaller ones are refused
    (150: a week of hourly traffic, 168 rows, is judged; a day is not)."""
    min_labelled_rows: Count = 50
    """Fewest labelled rows in a window for the quality metrics to be computed."""
    threshold_quantile: Annotated[float, Field(gt=0.5, lt=1)] = 0.99
    """Quantile of a column's null distribution (its distance from the reference over
    window-sized samples of the reference itself) taken as its threshold
    (``driftloop.drift.baseline``): about 1 window in 100 of undrifted data passes it."""
    sketch_bins: Annotated[int, Field(ge=4, le=10_000)] = 100
    """Bins cut from the reference's quantiles per numeric column of a window sketch."""
    consecutive_windows: Count = 2
    """Drifted windows in a row before drift holds and an episode opens (no flapping)."""
    clean_windows_to_close: Count = 2
    """Clean windows in a row that close an open episode (the cool-down)."""
    judge_quality: bool = True
    """A window also drifts when its error on the labelled rows is past what the version's own
    holdout gives at that many rows (``driftloop.drift.baseline.QualityCalibration``, at the
    ``threshold_quantile``): the world changed in a way the monitored inputs do not show."""
    renew_episode_windows: Count | None = 8
    """An open episode that has drifted this many windows and drifts again is closed and a new
    one opened, so the retrain trigger tries again: the version its retraining was meant to
    replace still serves (the challenger was rejected, or its run failed). 8 is two months of
    weekly windows, four times the retrain trigger's default cooldown: a retraining has time to
    land and be judged before another is asked for. None: an episode lasts until clean windows
    close it, with one retraining (a rejected challenger then leaves the drift unanswered)."""

    @model_validator(mode="after")
    def _known_tests(self) -> Self:
        for name, allowed in (
            (self.numeric_stat_test, NUMERIC_TESTS),
            (self.prediction_stat_test, NUMERIC_TESTS),
            (self.categorical_stat_test, CATEGORICAL_TESTS),
        ):
            if name not in allowed:
                raise ValueError(f"stat test {name!r} is not one of {sorted(allowed)}")
        return self

    def stat_test(self, kind: FeatureKind) -> str:
        """The stat test of a feature of this kind."""
        return self.numeric_stat_test if kind is FeatureKind.NUMERIC else self.categorical_stat_test

    def sketch_test(self, kind: FeatureKind, *, prediction: bool = False) -> str:
        """The stat test a window sketch computes for a column of this kind."""
        if prediction:
            return self.prediction_stat_test
        return self.stat_test(kind)
