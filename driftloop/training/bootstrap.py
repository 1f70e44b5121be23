"""The first model: trained on the opening months of the seed data, registered as champion.

Training window: January to March 2011 (the winter quarter). The rest of 2011 is what the demo
replays, so the model meets the seasonal drift the platform is there to catch (mean ``temp``
0.20 in January, 0.76 in July). The holdout is the last ``holdout_days`` days of the window in
time order, never a random sample: hourly traffic is autocorrelated, so a shuffled holdout
would flatter the model.

The **reference dataset** the drift monitor compares windows against is the whole window (train
and holdout rows) with the declared features, the model's ``prediction``, the target, the time
columns and a ``split`` column; it is stored as Parquet in the run's artifacts
(``reference/reference.parquet``) and read back with ``load_reference``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lightgbm as lgb
import numpy as np
import pandas as pd

from driftloop.training import trainer

# Shared with the retrain DAG, defined in driftloop.training.trainer; re-exported here.
from driftloop.training.trainer import PREDICTION_COLUMN as PREDICTION_COLUMN
from driftloop.training.trainer import REFERENCE_ARTIFACT as REFERENCE_ARTIFACT
from driftloop.training.trainer import REFERENCE_ARTIFACT_DIR as REFERENCE_ARTIFACT_DIR
from driftloop.training.trainer import REFERENCE_FILE as REFERENCE_FILE
from driftloop.training.trainer import REFERENCE_TAG as REFERENCE_TAG
from driftloop.training.trainer import SPLIT_COLUMN as SPLIT_COLUMN
from driftloop.training.trainer import HoldoutScores as HoldoutScores
from driftloop.training.trainer import current_champion as current_champion
from driftloop.training.trainer import load_reference as load_reference
from driftloop.training.trainer import score_holdout as score_holdout
from schemas.events import ModelPromoted
from schemas.features import FeatureSpec

TRAINING_MONTHS: Final = ("Jan", "Feb", "March")
HOLDOUT_DAYS: Final = 14


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """The registered first model, its holdout scores and what it took."""

    model: trainer.RegisteredModel
    scores: HoldoutScores
    training_rows: int
    reference_rows: int
    training_seconds: float


class ChampionExistsError(RuntimeError):
    """A champion is already registered (bootstrap only replaces it when forced)."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__(f"{name} already has a champion: version {version}")
        self.name = name
        self.version = version


def split_holdout(
    spec: FeatureSpec, frame: pd.DataFrame, *, holdout_days: int = HOLDOUT_DAYS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows and the holdout: the last ``holdout_days`` days of the frame, in time order."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    if holdout_days < 1:
        raise ValueError("the holdout needs at least one day")
    day_column = spec.dataset.order_by[0]
    days = frame[day_column]
    first_holdout_day = days.max() - holdout_days + 1
    if first_holdout_day <= days.min():
        raise ValueError(f"{holdout_days} holdout days leave no training rows")
    in_holdout = days >= first_holdout_day
    return frame[~in_holdout].reset_index(drop=True), frame[in_holdout].reset_index(drop=True)


def reference_frame(
    spec: FeatureSpec, parts: Sequence[tuple[str, pd.DataFrame]], booster: lgb.Booster
) -> pd.DataFrame:
    """Time columns, features, the model's ``prediction``, the target and each row's split."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    time_columns = [name for name in spec.dataset.order_by if name not in spec.feature_names]
    return trainer.reference_frame(spec, parts, booster, leading_columns=time_columns)


def bootstrap_model(
    spec: FeatureSpec,
    *,
    tracking_uri: str,
    model_name: str | None = None,
    months: Sequence[str] = TRAINING_MONTHS,
    holdout_days: int = HOLDOUT_DAYS,
    num_boost_round: int = 200,
    force: bool = False,
) -> BootstrapResult:
    """Train on ``months``, score the holdout, log model and reference, make it champion."""
    name = model_name or spec.registered_model_name
    existing = current_champion(tracking_uri, name)
    if existing is not None and not force:
        raise ChampionExistsError(name, existing)
    window = trainer.read_dataset(spec, months=months)
    train, holdout = split_holdout(spec, window, holdout_days=holdout_days)
    started = time.perf_counter()
    booster = trainer.train_booster(spec, train, num_boost_round=num_boost_round)
    training_seconds = time.perf_counter() - started
    predicted = np.asarray(booster.predict(trainer.feature_matrix(spec, holdout)))
    scores = score_holdout(trainer.target_vector(spec, holdout), predicted.astype(np.float64))
    reference = reference_frame(spec, [("train", train), ("holdout", holdout)], booster)
    params = {
        "training_months": ",".join(months),
        "holdout_days": holdout_days,
        "training_rows": len(train),
        "holdout_rows": len(holdout),
        "num_boost_round": num_boost_round,
        "feature_spec": spec.name,
        **trainer.DEFAULT_PARAMS,
    }
    metrics = {
        "holdout_rmse": scores.rmse,
        "holdout_mae": scores.mae,
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
        training_rows=len(train),
        reference_rows=len(reference),
        training_seconds=training_seconds,
    )


def promotion_event(result: BootstrapResult) -> ModelPromoted:
    """The ``ModelPromoted`` that makes the gateway load the first champion at once."""
    return ModelPromoted(
        model_name=result.model.name,
        model_version=result.model.version,
        run_id=result.model.run_id,
        champion_version=None,
        metric_name="rmse",
        greater_is_better=False,
        challenger_score=result.scores.rmse,
        champion_score=None,
    )
