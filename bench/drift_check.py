"""Drift-check benchmark (issue 5): one window of 100,000 rows x 14 features, load included.

Generates a reference and a window by resampling the bundled Bike Sharing data with noise
(winter months for the reference, summer months for the window, so the check finds real
drift), with the 11 declared features all monitored plus 3 extra numeric columns (14). The
window is written as a Parquet file with pyarrow, as the feature-logger stores long windows,
and half of its rows carry a label.

In interleaved rounds (so the load of the shared machine disturbs every target alike), it
times:

1. ``check``: read the window's Parquet file and ``evaluate_window`` (type mapping from the
   declaration, Evidently drift + prediction drift + quality, reading the verdict back);
2. ``evidently``: the same Evidently reports alone, on the frames already in memory;
3. ``preset``: a plain ``DataDriftPreset()`` on the 14 feature columns, types guessed by
   Evidently (the DESIGN.md anchor, 4.9 s on this kind of machine).

Prints each target's best and median seconds, the ratio check / evidently (target <= 1.5x),
the time to render the JSON and HTML report, and writes bench/results/drift_check-<time>.json.

    uv run python bench/drift_check.py [--rows 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

from driftloop.drift.assessment import (
    PREDICTION_COLUMN,
    WindowBounds,
    WindowEvaluation,
    drift_columns,
    drift_definition,
    drift_report,
    evaluate_window,
    quality_definition,
    quality_metrics,
)
from driftloop.drift.baseline import calibrate
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reports import render_report
from schemas.features import FeatureKind, FeatureSpec, load_feature_spec

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FEATURES = 14
REFERENCE_MONTHS = ("Jan", "Feb", "March")
WINDOW_MONTHS = ("June", "July", "Aug")


def bench_spec(spec: FeatureSpec) -> FeatureSpec:
    """The declaration with every feature monitored, padded to 14 with extra numeric columns."""
    document = spec.model_dump(mode="python")
    document["features"] = list(document["features"])
    for feature in document["features"]:
        feature["monitored"] = True
    for n in range(1, FEATURES - len(spec.features) + 1):
        document["features"].append(
            {
                "name": f"extra_{n}",
                "kind": "numeric",
                "dtype": "float",
                "description": f"Benchmark column {n}: standard normal noise.",
            }
        )
    return FeatureSpec.model_validate(document)


def resample(
    seed: pd.DataFrame, spec: FeatureSpec, rows: int, rng: np.random.Generator, *, shift: float
) -> pd.DataFrame:
    """``rows`` rows drawn with replacement, float features jittered, extras drawn afresh."""
    frame = seed.sample(rows, replace=True, random_state=rng).reset_index(drop=True)
    for feature in spec.features:
        if feature.name.startswith("extra_"):
            frame[feature.name] = rng.normal(shift if feature.name == "extra_1" else 0.0, 1.0, rows)
        elif feature.kind is FeatureKind.NUMERIC and feature.dtype == "float":
            jittered = frame[feature.name] + rng.normal(0.0, 0.02, rows)
            frame[feature.name] = jittered.clip(lower=feature.minimum, upper=feature.maximum)
    frame[PREDICTION_COLUMN] = frame[spec.target.name] * rng.normal(1.0, 0.1, rows)
    return frame


def write_window(window: pd.DataFrame, spec: FeatureSpec, path: Path) -> None:
    """The window as the feature-logger's Parquet: lineage columns, features, prediction, label."""
    start = datetime(2011, 7, 1, tzinfo=UTC)
    table = pa.Table.from_pandas(
        window[[*spec.feature_names, PREDICTION_COLUMN, spec.target.name]].assign(
            request_id=[f"bench-{n}" for n in range(len(window))],
            predicted_at=pd.date_range(start, periods=len(window), freq="s"),
            model_name="bikeshare",
            model_version=1,
        ),
        preserve_index=False,
    )
    pq.write_table(table, path)


def read_window(path: Path, spec: FeatureSpec) -> pd.DataFrame:
    """The long-window read: only the columns the check needs."""
    columns = [*spec.feature_names, PREDICTION_COLUMN, spec.target.name]
    frame: pd.DataFrame = pq.read_table(path, columns=columns).to_pandas()
    return frame


def timed(run: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-preset", action="store_true", help="skip the anchor run")
    arguments = parser.parse_args()

    spec = bench_spec(load_feature_spec("bikeshare"))
    assert spec.dataset is not None
    seed = pd.read_csv(ROOT / spec.dataset.path)
    rng = np.random.default_rng(2011)
    reference = resample(
        seed[seed["mnth"].isin(REFERENCE_MONTHS)], spec, arguments.rows, rng, shift=0.0
    )
    window = resample(seed[seed["mnth"].isin(WINDOW_MONTHS)], spec, arguments.rows, rng, shift=1.5)
    window.loc[window.index[1::2], spec.target.name] = np.nan  # feedback for half the hours
    policy = DriftPolicy()
    # Thresholds calibrated on the reference once, outside the timing, as the monitor does
    # when it takes a version on.
    thresholds = calibrate(spec, reference, policy).thresholds(len(window))

    # The frames "Evidently alone" receives, prepared outside the timing.
    compared = drift_columns(spec, PREDICTION_COLUMN)
    drift_frames = (window[compared].copy(), reference[compared].copy())
    labelled = window[[spec.target.name, PREDICTION_COLUMN]].dropna()
    features = list(spec.feature_names)
    auto_frames = (window[features].copy(), reference[features].copy())

    def check(path: Path) -> WindowEvaluation:
        result = evaluate_window(
            reference, read_window(path, spec), spec, policy, thresholds=thresholds
        )
        assert isinstance(result, WindowEvaluation)
        return result

    def evidently_alone() -> None:
        definition = drift_definition(spec, PREDICTION_COLUMN)
        drift_report(spec, policy, PREDICTION_COLUMN, thresholds).run(
            Dataset.from_pandas(drift_frames[0], data_definition=definition),
            Dataset.from_pandas(drift_frames[1], data_definition=definition),
        )
        Report([metric for _, metric in quality_metrics(spec)]).run(
            Dataset.from_pandas(
                labelled, data_definition=quality_definition(spec, PREDICTION_COLUMN)
            ),
            None,
        )

    def preset() -> None:
        Report([DataDriftPreset()]).run(
            Dataset.from_pandas(auto_frames[0], data_definition=DataDefinition()),
            Dataset.from_pandas(auto_frames[1], data_definition=DataDefinition()),
        )

    times: dict[str, list[float]] = {"check": [], "evidently": []}
    if not arguments.no_preset:
        times["preset"] = []
    with tempfile.TemporaryDirectory(prefix="drift-check-") as directory:
        path = Path(directory) / "window.parquet"
        write_window(window, spec, path)
        parquet_bytes = path.stat().st_size
        load_seconds, _ = timed(lambda: read_window(path, spec))
        # Warm-up outside the timing: Evidently's first report pays for lazy imports.
        evaluate_window(
            reference.head(2_000), window.head(2_000), spec, policy, thresholds=thresholds
        )
        evaluation: WindowEvaluation | None = None
        for _ in range(arguments.rounds):
            seconds, result = timed(lambda: check(path))
            times["check"].append(seconds)
            evaluation = result
            times["evidently"].append(timed(evidently_alone)[0])
            if "preset" in times:
                times["preset"].append(timed(preset)[0])
    assert evaluation is not None
    window_bounds = WindowBounds(
        start=datetime(2011, 7, 1, tzinfo=UTC),
        end=datetime(2011, 7, 1, tzinfo=UTC) + timedelta(days=1),
    )
    render_seconds, documents = timed(
        lambda: render_report(
            evaluation, model_name="bikeshare", model_version=1, window=window_bounds
        )
    )

    load = os.getloadavg()
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = best["check"] / best["evidently"]
    assessment = evaluation.assessment
    print(
        f"drift check: window {arguments.rows:,} rows x {len(spec.features)} features "
        f"(+ prediction, {assessment.labelled_rows:,} labelled), reference {len(reference):,} rows"
    )
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(f"parquet window {parquet_bytes / 1e6:.1f} MB, read alone {load_seconds:.2f} s")
    for name, values in times.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name:>10}: best {best[name]:6.2f} s  median {median[name]:6.2f} s  ({runs})")
    print(f"ratio check / evidently alone (best): {ratio:.2f}x  (target <= 1.5x)")
    print(f"ratio check / evidently alone (median): {median['check'] / median['evidently']:.2f}x")
    if "preset" in best:
        print(f"ratio check / plain DataDriftPreset (best): {best['check'] / best['preset']:.2f}x")
    print(
        f"report render (JSON {len(documents.json) / 1e3:.0f} kB + HTML "
        f"{len(documents.html or b'') / 1e6:.1f} MB): {render_seconds:.2f} s, not in the ratio"
    )
    print(
        f"verdict: drifted={assessment.drifted} share={assessment.drift_share:.2f} "
        f"features={','.join(assessment.drifted_features)} "
        f"prediction_drifted={assessment.prediction_drifted}"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"drift_check-{stamp}.json").write_bytes(
        orjson.dumps(
            {
                "rows": arguments.rows,
                "features": len(spec.features),
                "rounds": arguments.rounds,
                "load_average": load,
                "cores": os.cpu_count(),
                "seconds": times,
                "best": best,
                "median": median,
                "ratio_best": ratio,
                "parquet_read_seconds": load_seconds,
                "render_seconds": render_seconds,
                "assessment": assessment.model_dump(mode="json"),
            },
            option=orjson.OPT_INDENT_2,
        )
    )


if __name__ == "__main__":
    main()
