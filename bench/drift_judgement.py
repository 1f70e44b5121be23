"""Cost of judging a window: the sketch path against today's Evidently path, in one run.

Windows of the bundled Bike Sharing data (April onwards, resampled with replacement to the
sizes asked) are judged against a Jan-Mar reference two ways, in interleaved rounds:

1. ``sketch``: what the sketch design costs per window, split into
   - ``build``: the rows as they arrive (feature dicts and predictions) turned into a
     ``WindowSketch``, in batches of 5,000 as a consumer would, and merged: the per-row part;
   - ``judge``: every column's distance from the reference and its calibrated threshold:
     the per-window part, which does not grow with the rows;
2. ``evidently``: ``evaluate_window`` on the same window as a frame, with the same calibrated
   thresholds (the monitor's judgement before: Evidently's drift, prediction-drift and
   quality reports on every row).

Prints, per window size, the best and median seconds of each, the sketch path's cost per row
and the ratio evidently / sketch, and checks that both paths give the same verdict per column
(a disagreement is printed, with both scores). It is a measure of the judgement alone: the
stack-wide benchmark of issue 13 (``bench/drift_throughput.py``) comes with the monitor that
uses it.

    uv run python bench/drift_judgement.py [--sizes 168,10000,100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from driftloop.drift.assessment import WindowEvaluation, evaluate_window
from driftloop.drift.baseline import PreparedBaseline, calibrate, prepare
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.sketch import WindowSketch
from schemas.features import FeatureSpec, load_feature_spec

WINTER = ("Jan", "Feb", "March")
BATCH = 5000


def arrays_of(
    prepared: PreparedBaseline, rows: Sequence[dict[str, Any]], predictions: np.ndarray
) -> dict[str, Any]:
    """Columns of a batch as the feature-logger would hand them over (dicts in, arrays out)."""
    out: dict[str, Any] = {}
    for column in prepared.baseline.layout.columns:
        if column.name == "prediction":
            out[column.name] = predictions
        elif column.kind == "numeric":
            out[column.name] = np.array(
                [np.nan if (v := row.get(column.name)) is None else v for row in rows], float
            )
        else:
            out[column.name] = np.array([row.get(column.name) for row in rows], dtype=object)
    return out


def sketch_of(
    prepared: PreparedBaseline, rows: Sequence[dict[str, Any]], predictions: np.ndarray
) -> WindowSketch:
    sketch = WindowSketch.empty(prepared.baseline.layout)
    for start in range(0, len(rows), BATCH):
        part = arrays_of(prepared, rows[start : start + BATCH], predictions[start : start + BATCH])
        sketch = sketch.merge(WindowSketch.of(prepared.baseline.layout, part))
    return sketch


def judge(prepared: PreparedBaseline, sketch: WindowSketch) -> dict[str, tuple[float, bool]]:
    baseline = prepared.baseline
    return {
        name: (found.score, found.score > baseline.threshold(name, sketch.rows))
        for name, found in prepared.distances(sketch).items()
    }


def timed(action: Callable[..., Any], *arguments: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action(*arguments)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="168,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # Evidently's quality preset scores one-row slices too; the window's R² itself is fine.
    warnings.filterwarnings("ignore", message=r"R\^2 score is not well-defined")
    spec: FeatureSpec = load_feature_spec("bikeshare")
    assert spec.dataset is not None
    data = pd.read_csv(spec.dataset.path)
    data["prediction"] = data["bikers"] * np.random.default_rng(7).normal(1.0, 0.1, len(data))
    winter = data[data["mnth"].isin(WINTER)].reset_index(drop=True)
    later = data[~data["mnth"].isin(WINTER)].reset_index(drop=True)
    policy = DriftPolicy()
    started = time.perf_counter()
    baseline = calibrate(spec, winter, policy)
    print(
        f"calibration: {time.perf_counter() - started:.2f} s for {len(winter)} reference rows, "
        f"sizes {baseline.sample_rows}, {baseline.samples} samples each"
    )
    prepared = prepare(baseline, winter)
    rng = np.random.default_rng(5)
    print(
        f"{'rows':>8} {'build best':>11} {'judge best':>11} {'sketch µs/row':>14} "
        f"{'evidently best':>15} {'median':>8} {'evidently/sketch':>17}"
    )
    for size in (int(part) for part in args.sizes.split(",")):
        window = later.iloc[rng.integers(0, len(later), size)].reset_index(drop=True)
        rows = window[list(spec.feature_names)].to_dict("records")
        predictions = window["prediction"].to_numpy(np.float64)
        builds, judges, exacts = [], [], []
        verdicts: dict[str, tuple[float, bool]] = {}
        evaluation: Any = None
        for _ in range(args.rounds):
            seconds, sketch = timed(sketch_of, prepared, rows, predictions)
            builds.append(seconds)
            seconds, verdicts = timed(judge, prepared, sketch)
            judges.append(seconds)
            seconds, evaluation = timed(
                functools.partial(evaluate_window, thresholds=baseline.thresholds(size)),
                winter,
                window,
                spec,
                policy,
            )
            exacts.append(seconds)
        sketch_best = min(builds) + min(judges)
        print(
            f"{size:>8} {min(builds):>11.4f} {min(judges):>11.4f} "
            f"{sketch_best / size * 1e6:>14.2f} {min(exacts):>15.3f} "
            f"{statistics.median(exacts):>8.3f} {min(exacts) / sketch_best:>16.1f}x"
        )
        if isinstance(evaluation, WindowEvaluation):
            for feature in evaluation.assessment.features:
                score, _ = verdicts[feature.name]
                if not np.isclose(score, feature.score, rtol=0.05, atol=1e-3):
                    print(f"  {feature.name}: sketch {score:.4f}, Evidently {feature.score:.4f}")


if __name__ == "__main__":
    main()
