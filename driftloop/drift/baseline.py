"""A model version's drift baseline: its sketch layout and thresholds calibrated on its reference.

No threshold is a constant tuned to one dataset. For each monitored column (and the
predictions) the threshold is a quantile (``DriftPolicy.threshold_quantile``, 0.99 by default)
of the column's *null distribution*: its distance over many window-sized samples of the
reference itself, each against the rest of the reference (a live window is independent of
the reference; a sample measured against a whole that contains it would sit too close),
computed with the same sketch estimator the monitor applies to live windows.

- A reference with a time order (its declaration names the columns that order the data) is
  sampled in time-contiguous blocks: weather, seasons and habits make neighbouring rows alike,
  so a week of the training months sits farther from the whole than a random week's worth of
  rows would, and a live window is a contiguous span of time too.
- A reference with no time order is sampled without replacement.

The distance of a sample shrinks as it grows, so thresholds are calibrated on a grid of sample
sizes (doubling from the policy's ``min_rows``) and read for a window's row count by
interpolation in log(rows); a window larger than the largest sample takes that sample's
threshold, the conservative side. An explicit per-feature threshold in the policy replaces the
calibrated one.

The version's quality is calibrated the same way (``QualityCalibration``): its promotion metric
over window-sized resamples of its own holdout rows (the reference's ``split`` holdout, with
their labels and the version's predictions) gives the error a window of that many labelled
rows reaches 1 time in 100 while the world still fits the version. A window past it drifts
whatever its inputs show: the relation between inputs and label moved, or moved where no
monitored feature looks. The baseline is stored with the version as an MLflow artifact
(``drift/baseline.json``) and shown in each report.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from driftloop.drift.policy import DriftPolicy
from driftloop.drift.sketch import (
    DEFAULT_BINS,
    ColumnDistance,
    ReferenceColumn,
    SketchLayout,
    WindowSketch,
    categorical_values,
    distance_of,
    reference_columns,
    score_of,
    slots_of,
)
from driftloop.training.metrics import metric_value
from schemas.features import FeatureKind, FeatureSpec

BASELINE_ARTIFACT: Final = "drift/baseline.json"
"""Where a version's baseline is stored in its MLflow run."""
PREDICTION_COLUMN: Final = "prediction"
"""Column of the model's output in logged windows (and in the reference, when it has one)."""
SPLIT_COLUMN: Final = "split"
"""Column of a reference row's part: ``train`` or ``holdout``."""
HOLDOUT_SPLIT: Final = "holdout"

Sampling = Literal["time_blocks", "resampling"]

_MAX_SAMPLES: Final = 400
"""Samples drawn per size: enough for a 0.99 quantile, bounded for large references."""
_MAX_SAMPLE_FACTOR: Final = 64
_SEED: Final = 20_111  # fixed: calibrating the same reference twice gives the same thresholds


class ColumnCalibration(BaseModel):
    """One column's stat test and its threshold at each calibrated sample size."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    name: str
    stat_test: str
    thresholds: tuple[float, ...]
    """Threshold at each of the baseline's ``sample_rows`` (the declared quantile of the null
    distances), or the one explicit threshold repeated."""
    explicit: bool = False
    """The threshold is the policy's per-feature override, not calibrated."""


class QualityCalibration(BaseModel):
    """How bad the version's promotion metric may get on a window's labelled rows: the policy's
    ``threshold_quantile`` of the metric over samples of that many rows drawn, with replacement,
    from the version's holdout (rows it never learned from), at each calibrated size."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    metric: str
    """The promotion metric (``driftloop.training.metrics`` names)."""
    greater_is_better: bool
    holdout_rows: int = Field(ge=1)
    holdout_value: float
    """The metric on the whole holdout."""
    sample_rows: tuple[int, ...]
    """Labelled rows per sample, increasing."""
    thresholds: tuple[float, ...]
    """The worst value still undrifted at each size (an upper bound of an error, a lower bound
    of a score such as ROC AUC)."""

    def threshold(self, rows: int) -> float:
        """The limit for a window with ``rows`` labelled rows (log-interpolated, like a
        feature's; past the largest size, that size's, the conservative side)."""
        return _interpolated(self.sample_rows, self.thresholds, rows)

    def degraded(self, value: float, rows: int) -> bool:
        """Whether a window's metric on ``rows`` labelled rows is past the limit."""
        if math.isnan(value):
            return False
        limit = self.threshold(rows)
        return value < limit if self.greater_is_better else value > limit


class DriftBaseline(BaseModel):
    """What the monitor needs of a version: how to sketch its windows, when a column drifted."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    reference_rows: int = Field(ge=0)
    layout: SketchLayout
    """Bins of the monitored features and of the predictions."""
    sampling: Sampling
    """How the null distributions were drawn from the reference."""
    quantile: float = Field(gt=0, lt=1)
    """Quantile of the null distribution taken as the threshold."""
    min_rows: int = Field(ge=1)
    """The policy's minimum window, the smallest sample size calibrated."""
    bins: int = Field(ge=1)
    """The policy's numeric bins per column."""
    overrides: dict[str, float] = Field(default_factory=dict)
    """The policy's explicit per-feature thresholds."""
    sample_rows: tuple[int, ...]
    """Sample sizes calibrated, increasing."""
    samples: int = Field(ge=1)
    """Samples drawn per size."""
    columns: tuple[ColumnCalibration, ...]
    judges_quality: bool = False
    """Quality was calibrated (the policy's ``judge_quality``); ``quality`` may still be None
    when the reference has no labelled holdout to calibrate it on."""
    quality: QualityCalibration | None = None

    def calibration(self, name: str) -> ColumnCalibration:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def threshold(self, name: str, rows: int) -> float:
        """The column's threshold for a window of ``rows`` rows."""
        return _interpolated(self.sample_rows, self.calibration(name).thresholds, rows)

    def thresholds(self, rows: int) -> dict[str, float]:
        """Every column's threshold for a window of ``rows`` rows."""
        return {column.name: self.threshold(column.name, rows) for column in self.columns}

    @property
    def features(self) -> tuple[str, ...]:
        """The monitored features (every column but the predictions)."""
        return tuple(c.name for c in self.columns if c.name != PREDICTION_COLUMN)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    def follows(self, policy: DriftPolicy) -> bool:
        """Whether this baseline was calibrated under ``policy`` (else calibrate again)."""
        return (
            self.quantile == policy.threshold_quantile
            and self.min_rows == policy.min_rows
            and self.bins == policy.sketch_bins
            and self.overrides == dict(policy.feature_thresholds)
            and self.judges_quality == policy.judge_quality
            and all(
                column.stat_test
                == policy.sketch_test(
                    FeatureKind.NUMERIC
                    if self.layout.column(column.name).kind == "numeric"
                    else FeatureKind.CATEGORICAL,
                    prediction=column.name == PREDICTION_COLUMN,
                )
                for column in self.columns
            )
        )


@dataclass(frozen=True, slots=True)
class PreparedBaseline:
    """A baseline with its reference columns ready: what the monitor keeps per version."""

    baseline: DriftBaseline
    reference: dict[str, ReferenceColumn]

    def distances(self, sketch: WindowSketch) -> dict[str, ColumnDistance]:
        """Every column's distance of a window from the reference."""
        return {
            column.name: distance_of(
                self.reference[column.name], sketch.columns[column.name], column.stat_test
            )
            for column in self.baseline.columns
        }


def reference_arrays(
    frame: pd.DataFrame, layout: SketchLayout
) -> dict[str, NDArray[np.float64] | NDArray[np.object_]]:
    """The layout's columns of a frame as arrays (numeric as float64 with NaN)."""
    arrays: dict[str, NDArray[np.float64] | NDArray[np.object_]] = {}
    for column in layout.columns:
        values = frame[column.name]
        if column.kind == "numeric":
            arrays[column.name] = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        else:
            arrays[column.name] = categorical_values(values.astype(object).to_numpy())
    return arrays


def prepare(baseline: DriftBaseline, reference: pd.DataFrame) -> PreparedBaseline:
    """The baseline with the reference's columns sorted and counted once."""
    arrays = reference_arrays(reference, baseline.layout)
    return PreparedBaseline(baseline, reference_columns(baseline.layout, arrays))


def sketch_layout(
    spec: FeatureSpec, reference: pd.DataFrame, *, bins: int = DEFAULT_BINS
) -> SketchLayout:
    """Bins of the declaration's monitored features (and the predictions) from the reference."""
    kinds = {name: spec.feature(name).kind for name in spec.monitored_features}
    if PREDICTION_COLUMN in reference.columns:
        kinds[PREDICTION_COLUMN] = FeatureKind.NUMERIC
    declared = {
        name: spec.feature(name).categories or ()
        for name, kind in kinds.items()
        if kind is FeatureKind.CATEGORICAL
    }
    frame = reference.reindex(columns=list(kinds))
    arrays: dict[str, NDArray[np.float64] | NDArray[np.object_]] = {
        name: pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64)
        if kind is FeatureKind.NUMERIC
        else categorical_values(frame[name].astype(object).to_numpy())
        for name, kind in kinds.items()
    }
    return SketchLayout.from_reference(arrays, kinds, declared_categories=declared, bins=bins)


def calibrate(
    spec: FeatureSpec,
    reference: pd.DataFrame,
    policy: DriftPolicy,
    *,
    time_ordered: bool | None = None,
) -> DriftBaseline:
    """Calibrate every column's threshold on the reference (in its row order when time-ordered).

    ``time_ordered`` defaults to whether the declaration names columns that order its data.
    """
    ordered = (
        bool(spec.dataset is not None and spec.dataset.order_by)
        if time_ordered is None
        else time_ordered
    )
    layout = sketch_layout(spec, reference, bins=policy.sketch_bins)
    arrays = reference_arrays(reference, layout)
    prepared = reference_columns(layout, arrays)
    total = len(reference)
    sizes = sample_sizes(total, policy.min_rows)
    tests = {
        column.name: policy.sketch_test(
            FeatureKind.NUMERIC if column.kind == "numeric" else FeatureKind.CATEGORICAL,
            prediction=column.name == PREDICTION_COLUMN,
        )
        for column in layout.columns
    }
    rng = np.random.default_rng(_SEED)
    nulls: dict[str, list[list[float]]] = {name: [] for name in layout.names}
    samples = 0
    # Each row's bin, once: a sample's counts and sums are then two bincounts per column.
    binned = {column.name: slots_of(column, arrays[column.name]) for column in layout.columns}
    for size in sizes:
        draws = _samples(total, size, ordered=ordered, rng=rng)
        samples = len(draws)
        per_column: dict[str, list[float]] = {name: [] for name in layout.names}
        for rows in draws:
            for column in layout.columns:
                slots, values, ranks = binned[column.name]
                chosen = slots[rows]
                present = chosen >= 0
                counts = np.bincount(chosen[present], minlength=column.slots).astype(np.float64)
                sums = (
                    np.bincount(
                        chosen[present], weights=values[rows][present], minlength=column.slots
                    ).astype(np.float64)
                    if column.kind == "numeric"
                    else counts
                )
                # Against the rest of the reference, as a live window is independent of it.
                score = score_of(
                    prepared[column.name],
                    counts,
                    sums,
                    tests[column.name],
                    excluded=ranks[rows][present],
                )
                if not math.isnan(score):
                    per_column[column.name].append(score)
        for name in layout.names:
            nulls[name].append(per_column[name])
    columns = []
    for name in layout.names:
        override = policy.feature_thresholds.get(name)
        if override is not None:
            thresholds = tuple(override for _ in sizes)
        else:
            thresholds = _monotone(
                [_quantile(values, policy.threshold_quantile) for values in nulls[name]]
            )
        columns.append(
            ColumnCalibration(
                name=name,
                stat_test=tests[name],
                thresholds=thresholds,
                explicit=override is not None,
            )
        )
    return DriftBaseline(
        reference_rows=total,
        layout=layout,
        sampling="time_blocks" if ordered else "resampling",
        quantile=policy.threshold_quantile,
        min_rows=policy.min_rows,
        bins=policy.sketch_bins,
        overrides=dict(policy.feature_thresholds),
        sample_rows=tuple(sizes),
        samples=max(samples, 1),
        columns=tuple(columns),
        judges_quality=policy.judge_quality,
        quality=calibrate_quality(spec, reference, policy) if policy.judge_quality else None,
    )


def calibrate_quality(
    spec: FeatureSpec, reference: pd.DataFrame, policy: DriftPolicy
) -> QualityCalibration | None:
    """The version's quality limits from its reference's holdout rows; None without at least
    the policy's ``min_labelled_rows`` of them labelled and predicted.

    Samples are drawn with replacement: a window may hold more labelled rows than the holdout,
    and a holdout (the newest rows before training ended) is too short for time blocks.
    """
    needed = {SPLIT_COLUMN, PREDICTION_COLUMN, spec.target.name}
    if not needed <= set(reference.columns):
        return None
    holdout = reference[reference[SPLIT_COLUMN] == HOLDOUT_SPLIT]
    truth = pd.to_numeric(holdout[spec.target.name], errors="coerce").to_numpy(np.float64)
    predicted = pd.to_numeric(holdout[PREDICTION_COLUMN], errors="coerce").to_numpy(np.float64)
    known = np.isfinite(truth) & np.isfinite(predicted)
    truth, predicted = truth[known], predicted[known]
    if len(truth) < policy.min_labelled_rows:
        return None
    metric = spec.promotion_metric
    rng = np.random.default_rng(_SEED)
    sizes = _quality_sizes(policy.min_labelled_rows)
    # The worst side of the null distribution: its upper quantile for an error.
    q = 1 - policy.threshold_quantile if metric.greater_is_better else policy.threshold_quantile
    limits = []
    for size in sizes:
        values = []
        for _ in range(_MAX_SAMPLES):
            rows = rng.integers(0, len(truth), size=size)
            value = metric_value(metric.value, truth[rows], predicted[rows])
            if math.isfinite(value):
                values.append(value)
        limits.append(float(np.quantile(values, q)) if values else math.nan)
    return QualityCalibration(
        metric=metric.value,
        greater_is_better=metric.greater_is_better,
        holdout_rows=len(truth),
        holdout_value=metric_value(metric.value, truth, predicted),
        sample_rows=tuple(sizes),
        thresholds=tuple(limits),
    )


def _quality_sizes(min_rows: int) -> list[int]:
    # Labelled rows per window: the policy's minimum doubling up to 64 times it.
    return [min_rows * 2**step for step in range(7)]


def _interpolated(sizes: Sequence[int], thresholds: Sequence[float], rows: int) -> float:
    if rows <= sizes[0]:
        return thresholds[0]
    if rows >= sizes[-1]:
        return thresholds[-1]
    return float(np.interp(math.log(rows), np.log(sizes), thresholds))


def sample_sizes(reference_rows: int, min_rows: int) -> list[int]:
    """Sample sizes to calibrate: ``min_rows`` doubling, up to half the reference or 64 times
    ``min_rows``, whichever is smaller.

    Past a few thousand rows a sample's distance is set by the reference's own structure (its
    weeks, its seasons), no longer by sampling noise, and larger windows take the largest
    size's threshold; the cap keeps calibrating a million-row reference to seconds.
    """
    if reference_rows < min_rows:
        return [max(reference_rows, 1)]
    sizes = [min_rows]
    while sizes[-1] * 2 <= min(reference_rows // 2, _MAX_SAMPLE_FACTOR * min_rows):
        sizes.append(sizes[-1] * 2)
    return sizes


def _samples(
    total: int, size: int, *, ordered: bool, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    if total < size or size < 1:
        return []
    if ordered:
        starts = np.unique(np.linspace(0, total - size, num=min(total - size + 1, _MAX_SAMPLES)))
        return [np.arange(int(start), int(start) + size) for start in starts]
    return [rng.choice(total, size=size, replace=False) for _ in range(_MAX_SAMPLES)]


def _quantile(values: Sequence[float], q: float) -> float:
    # Thresholds stay finite, as JSON (and Postgres' jsonb) hold them: a column the reference
    # never fills, or whose distances overflow, gets the largest float, so it never drifts.
    if not values:
        return sys.float_info.max
    return min(float(np.quantile(np.asarray(values), q)), sys.float_info.max)


def _monotone(thresholds: Sequence[float]) -> tuple[float, ...]:
    # Distances shrink as samples grow; sampling noise can break that by a hair, and a larger
    # window must never get a looser threshold than a smaller one.
    out: list[float] = []
    for value in thresholds:
        out.append(value if not out else min(value, out[-1]))
    return tuple(out)
