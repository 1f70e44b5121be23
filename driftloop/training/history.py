"""Which labelled history a version learns from: the declared ``training.data`` policy applied.

Pure (pandas and numpy): the retrain DAG applies it to the rows it extracted, and the offline
accounting of the loop (``driftloop.evaluation.loop_value``) applies the same function to the
seed data, so what is measured there is what the DAG does.

Ages are counted in prediction time back from ``as_of`` (by default the newest dated row),
never from the wall clock: a replay, or a retraining run late, trains on the same rows as one
run at the time. Rows without a time (seed rows of a dataset that has no time column) are
given the oldest dated row's time, so they are the first to leave a ``last_days`` window and
weigh the least under a half-life; when no row has a time, every row is kept at weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from schemas.features import TrainingData


@dataclass(frozen=True, slots=True)
class TrainingHistory:
    """The rows chosen, in their order, and each row's training weight (None: all equal)."""

    rows: pd.DataFrame
    weights: npt.NDArray[np.float64] | None


def row_ages(
    times: pd.Series, as_of: datetime | pd.Timestamp | None = None
) -> npt.NDArray[np.float64] | None:
    """Each row's age in days before ``as_of`` (default: the newest time); undated rows as old
    as the oldest dated one; None when no row has a time."""
    stamps = pd.to_datetime(times, utc=True)
    dated = stamps.dropna()
    if dated.empty:
        return None
    newest = dated.max() if as_of is None else pd.Timestamp(as_of)
    filled = stamps.fillna(dated.min())
    ages = (newest - filled) / pd.Timedelta(days=1)
    return np.asarray(ages.to_numpy(dtype=np.float64))


def select_history(
    rows: pd.DataFrame,
    times: pd.Series,
    policy: TrainingData,
    *,
    as_of: datetime | pd.Timestamp | None = None,
) -> TrainingHistory:
    """The rows ``policy`` trains on and their weights; ``times`` is aligned with ``rows``."""
    if len(times) != len(rows):
        raise ValueError(f"{len(times)} times for {len(rows)} rows")
    ages = row_ages(times.reset_index(drop=True), as_of)
    if ages is None or (policy.last_days is None and policy.half_life_days is None):
        return TrainingHistory(rows.reset_index(drop=True), None)
    if policy.last_days is not None:
        # A row exactly N days old is out: "the last N days" is a half-open span ending now.
        kept = ages < policy.last_days
        return TrainingHistory(rows[kept].reset_index(drop=True), None)
    assert policy.half_life_days is not None  # noqa: S101 - the branches above
    # Rows from after as_of (none in the DAG; possible when as_of is given) weigh as new ones.
    weights = np.power(0.5, np.clip(ages, 0.0, None) / policy.half_life_days)
    return TrainingHistory(rows.reset_index(drop=True), weights.astype(np.float64))
