"""The first model: trained on the declaration's seed data, registered as champion.

Which rows: those from ``--since`` to ``--until`` by the dataset's time, by default the
declaration's ``training.since``/``until`` (bikeshare: January to March 2011, the winter
quarter; the demo replays the rest, so the model meets the seasonal drift). A dataset without
a time column is used whole.

The holdout: with a time column, the latest ``training.holdout`` span of those rows, in time
order and never a random sample (hourly traffic is autocorrelated, so a shuffled holdout would
flatter the model); without one, a random ``training.holdout_fraction`` of the rows, drawn with
``training.seed`` so a repeated bootstrap holds out the same rows. The holdout is scored with
every metric of the task; the declared promotion metric is the one the ``ModelPromoted`` event
carries.

The **reference dataset** the drift monitor compares windows against is all those rows (train
and holdout) with the declared features, the model's ``prediction``, the target (coded as the
model learns it), the time columns and a ``split`` column; it is stored as Parquet in the run's
artifacts (``reference/reference.parquet``) and read back with ``load_reference``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from driftloop.training import trainer
from driftloop.training.metrics import HoldoutScores as HoldoutScores

# Shared with the retrain DAG, defined in driftloop.training.trainer; re-exported here.
from driftloop.training.trainer import PREDICTION_COLUMN as PREDICTION_COLUMN
from driftloop.training.trainer import REFERENCE_ARTIFACT as REFERENCE_ARTIFACT
from driftloop.training.trainer import REFERENCE_ARTIFACT_DIR as REFERENCE_ARTIFACT_DIR
from driftloop.training.trainer import REFERENCE_FILE as REFERENCE_FILE
from driftloop.training.trainer import REFERENCE_TAG as REFERENCE_TAG
from driftloop.training.trainer import SPLIT_COLUMN as SPLIT_COLUMN
from driftloop.training.trainer import Instant as Instant
from driftloop.training.trainer import current_champion as current_champion
from driftloop.training.trainer import load_reference as load_reference
from driftloop.training.trainer import score_holdout as score_holdout
from schemas.events import ModelPromoted
from schemas.features import FeatureSpec, Metric


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """The registered first model, its holdout scores and what it took."""

    model: trainer.RegisteredModel
    scores: HoldoutScores
    promotion_metric: Metric
    """The declared promotion metric, the one ``ModelPromoted`` reports."""
    training_rows: int
    reference_rows: int
    training_seconds: float


class ChampionExistsError(RuntimeError):
    """A champion is already registered (bootstrap only replaces it when forced)."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__(f"{name} already has a champion: version {version}")
        self.name = name
        self.version = version


def split_holdout(spec: FeatureSpec, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows and the holdout (see the module docstring): the latest ``holdout`` span
    with a time column, else a seeded random ``holdout_fraction`` of the rows."""
    training = spec.training
    if spec.dataset is not None and spec.dataset.time is not None:
        times = trainer.dataset_times(spec, frame)
        in_holdout = (times > times.max() - training.holdout).to_numpy()
        what = f"a holdout of {training.holdout}"
    else:
        size = math.ceil(len(frame) * training.holdout_fraction)
        chosen = np.random.default_rng(training.seed).choice(len(frame), size, replace=False)
        in_holdout = np.zeros(len(frame), dtype=bool)
        in_holdout[chosen] = True
        what = f"a holdout of {training.holdout_fraction:.0%}"
    if in_holdout.all() or not in_holdout.any():
        raise ValueError(f"{what} of {len(frame)} rows leaves no training or no holdout rows")
    return frame[~in_holdout].reset_index(drop=True), frame[in_holdout].reset_index(drop=True)


def reference_frame(
    spec: FeatureSpec, parts: Sequence[tuple[str, pd.DataFrame]], booster: lgb.Booster
) -> pd.DataFrame:
    """Time columns, features, the model's ``prediction``, the target and each row's split."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    timing = (*spec.dataset.order_by, *(spec.dataset.time.columns if spec.dataset.time else ()))
    time_columns = [name for name in dict.fromkeys(timing) if name not in spec.feature_names]
    return trainer.reference_frame(spec, parts, booster, leading_columns=time_columns)


def bootstrap_model(
    spec: FeatureSpec,
    *,
    tracking_uri: str,
    model_name: str | None = None,
    since: Instant | None = None,
    until: Instant | None = None,
    num_boost_round: int = 200,
    force: bool = False,
) -> BootstrapResult:
    """Train on the chosen rows, score the holdout, log model and reference, make it champion.

    ``since``/``until`` default to the declaration's ``training.since``/``until``.
    """
    name = model_name or spec.registered_model_name
    existing = current_champion(tracking_uri, name)
    if existing is not None and not force:
        raise ChampionExistsError(name, existing)
    since = since if since is not None else spec.training.since
    until = until if until is not None else spec.training.until
    window = trainer.read_dataset(spec, since=since, until=until)
    train, holdout = split_holdout(spec, window)
    started = time.perf_counter()
    booster = trainer.train_booster(spec, train, num_boost_round=num_boost_round)
    training_seconds = time.perf_counter() - started
    predicted = np.asarray(booster.predict(trainer.feature_matrix(spec, holdout)))
    scores = score_holdout(spec, trainer.target_vector(spec, holdout), predicted.astype(np.float64))
    reference = reference_frame(spec, [("train", train), ("holdout", holdout)], booster)
    timed = spec.dataset is not None and spec.dataset.time is not None
    params = {
        "since": str(since) if since is not None else "first row",
        "until": str(until) if until is not None else "last row",
        "holdout": str(spec.training.holdout)
        if timed
        else f"random {spec.training.holdout_fraction} (seed {spec.training.seed})",
        "promotion_metric": spec.promotion_metric.value,
        "training_rows": len(train),
        "holdout_rows": len(holdout),
        "num_boost_round": num_boost_round,
        "feature_spec": spec.name,
        **trainer.DEFAULT_PARAMS,
    }
    metrics = {
        **{f"holdout_{metric}": value for metric, value in scores.values.items()},
        "training_seconds": training_seconds,
    }
    with tempfile.TemporaryDirectory(prefix="driftloop-bootstrap-") as work:
        # The reference is logged in the model's run and named by a version tag, so the drift
        # monitor finds it from the registry alone.
        model = trainer.log_and_register(
            booster,
            spec,
            tracking_uri=tracking_uri,
            model_name=name,
            metrics=metrics,
            params=params,
            reference=reference,
            work_dir=Path(work),
        )
    trainer.set_champion(model, tracking_uri=tracking_uri)
    return BootstrapResult(
        model=model,
        scores=scores,
        promotion_metric=spec.promotion_metric,
        training_rows=len(train),
        reference_rows=len(reference),
        training_seconds=training_seconds,
    )


def promotion_event(result: BootstrapResult) -> ModelPromoted:
    """The ``ModelPromoted`` that makes the gateway load the first champion at once."""
    metric = result.promotion_metric
    return ModelPromoted(
        model_name=result.model.name,
        model_version=result.model.version,
        run_id=result.model.run_id,
        champion_version=None,
        metric_name=metric.value,
        greater_is_better=metric.greater_is_better,
        challenger_score=result.scores[metric],
        champion_score=None,
    )
