"""Holdout metrics by task: RMSE and MAE for regression; log loss, ROC AUC and Brier score of
the positive class's probability for classification (``schemas.features.Metric``).

Bootstrap and the retrain DAG score every model with these functions, so a metric has the
same name and the same value wherever it is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from schemas.features import TASK_METRICS, Metric, Task

# Probabilities are clipped this far from 0 and 1 before the log loss, so one confident miss
# costs about 34.5 instead of infinity.
LOG_LOSS_EPSILON: Final = 1e-15


@dataclass(frozen=True, slots=True)
class HoldoutScores:
    """A model's quality on the holdout rows: every metric of its task."""

    task: Task
    values: Mapping[Metric, float]
    """Metric -> value, in the task's order (``TASK_METRICS``)."""
    rows: int

    def __getitem__(self, metric: Metric | str) -> float:
        return self.values[Metric(metric)]

    def describe(self) -> str:
        """One line for people: ``rmse 105.8, mae 71.2``."""
        return ", ".join(f"{metric} {value:.4g}" for metric, value in self.values.items())


def metric_value(
    metric: Metric | str, truth: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
) -> float:
    """One metric of predictions against the truth (classification: 0/1 truth, probabilities)."""
    if len(truth) == 0 or len(truth) != len(predicted):
        raise ValueError("scores need as many predictions as true values, at least one")
    chosen = Metric(metric)
    truth = np.asarray(truth, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if chosen is Metric.RMSE:
        return math.sqrt(float(np.mean((predicted - truth) ** 2)))
    if chosen is Metric.MAE:
        return float(np.mean(np.abs(predicted - truth)))
    if chosen is Metric.LOG_LOSS:
        probability = np.clip(predicted, LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
        losses = truth * np.log(probability) + (1 - truth) * np.log(1 - probability)
        return float(-np.mean(losses))
    if chosen is Metric.BRIER:
        return float(np.mean((predicted - truth) ** 2))
    return roc_auc(truth, predicted)


def roc_auc(truth: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]) -> float:
    """Area under the ROC curve: the chance a positive row scores above a negative one, ties
    counting half (Mann-Whitney U over average ranks); NaN when one class is absent."""
    from scipy.stats import rankdata  # scipy is a LightGBM dependency; imported on use

    positives = truth == 1
    count_positive = int(positives.sum())
    count_negative = len(truth) - count_positive
    if count_positive == 0 or count_negative == 0:
        return math.nan
    ranks = rankdata(predicted)
    rank_sum = float(ranks[positives].sum())
    return (rank_sum - count_positive * (count_positive + 1) / 2) / (
        count_positive * count_negative
    )


def holdout_scores(
    task: Task, truth: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
) -> HoldoutScores:
    """Every metric of the task on the holdout."""
    values = {metric: metric_value(metric, truth, predicted) for metric in TASK_METRICS[task]}
    return HoldoutScores(task=task, values=values, rows=len(truth))
