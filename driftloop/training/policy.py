"""The retraining policy: its settings, the holdout's size, the metric and the promotion rule.

Pure and cheap to import (pydantic only): the ``retrain_model`` DAG builds its Airflow params
from ``RetrainPolicy`` at parse time, and ``driftloop.training.retrain`` applies the same policy in
its tasks. What the policy means for the data is described in ``driftloop.training.retrain``.

Promotion rule: the challenger replaces the champion when its holdout metric (the model's
declared ``training.promotion_metric``) is better by at least ``promotion_margin``, relative to
the champion's. For a lower-is-better metric (RMSE, MAE, log loss, Brier) that is
``challenger <= champion * (1 - margin)``; for a greater-is-better metric (ROC AUC) the
mirrored ``challenger >= champion * (1 + margin)``. A margin of 0 means any strict
improvement; a tie never promotes (a new version must earn the swap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.features import FeatureSpec, Metric

# Relative tolerance of the margin comparison, so a challenger exactly at the margin is not
# rejected by the last bit of a float division.
_MARGIN_TOLERANCE: Final = 1e-9


class RetrainRefusedError(RuntimeError):
    """The retraining cannot succeed by trying again (bad conf, too few labels, no champion).

    The DAG turns it into a failure without retries; the champion is left as it is.
    """


class TooFewLabelsError(RetrainRefusedError):
    """Not enough labelled rows to train and judge a challenger."""


class RetrainPolicy(BaseModel):
    """How a challenger is trained and judged; the DAG's params, overridable per run."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    promotion_margin: float = Field(default=0.02, ge=0, lt=1)
    """Relative improvement of the holdout metric the challenger needs over the champion
    (0.02: 2 % lower RMSE; 0: any improvement)."""
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)
    """Share of the recent labelled rows, the newest, held out to judge both models."""
    min_labelled_rows: int = Field(default=200, ge=2)
    """Fewest recent labelled rows served by the champion a retraining accepts."""
    min_holdout_rows: int = Field(default=50, ge=1)
    """Fewest rows in the holdout, whatever the fraction gives."""
    max_recent_rows: int = Field(default=20_000, ge=2)
    """Most recent labelled rows read from the prediction log (the newest ones)."""
    num_boost_round: int = Field(default=200, ge=1, le=10_000)
    """Boosting rounds of the challenger."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_holdout_rows >= self.min_labelled_rows:
            raise ValueError(
                f"min_holdout_rows ({self.min_holdout_rows}) must be below min_labelled_rows "
                f"({self.min_labelled_rows}), or no row is left to train on"
            )
        if self.max_recent_rows < self.min_labelled_rows:
            raise ValueError(
                f"max_recent_rows ({self.max_recent_rows}) is below min_labelled_rows "
                f"({self.min_labelled_rows}): no run could ever have enough labels"
            )
        return self

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RetrainPolicy:
        """The policy from a DAG run's params (other keys ignored); refused when invalid."""
        chosen = {name: params[name] for name in cls.model_fields if name in params}
        try:
            return cls.model_validate(chosen)
        except ValidationError as error:
            raise RetrainRefusedError(f"invalid retraining policy: {error}") from error

    @classmethod
    def param_schemas(cls) -> dict[str, dict[str, Any]]:
        """Each field as the keyword arguments of an Airflow ``Param``: its default, its
        description and its JSON Schema constraints, so Airflow validates a trigger's conf."""
        properties = cls.model_json_schema()["properties"]
        schemas: dict[str, dict[str, Any]] = {}
        for name, field in cls.model_fields.items():
            schema = {key: value for key, value in properties[name].items() if key not in {"title"}}
            schema["default"] = field.default
            schema["description"] = field.description
            schemas[name] = schema
        return schemas


def holdout_size(labelled_rows: int, policy: RetrainPolicy) -> int:
    """Rows held out from ``labelled_rows`` recent ones: the policy's fraction (rounded up),
    at least ``min_holdout_rows``; ``TooFewLabelsError`` when too few rows are left."""
    if labelled_rows < policy.min_labelled_rows:
        raise TooFewLabelsError(
            f"too few labels: {labelled_rows} labelled rows, the policy needs at least "
            f"{policy.min_labelled_rows} (min_labelled_rows)"
        )
    size = max(policy.min_holdout_rows, math.ceil(labelled_rows * policy.holdout_fraction))
    if size >= labelled_rows:
        raise TooFewLabelsError(
            f"too few labels: a holdout of {size} rows leaves none of the {labelled_rows} "
            "labelled rows to train on"
        )
    return size


@dataclass(frozen=True, slots=True)
class HoldoutMetric:
    """The metric both models are judged on."""

    name: str
    greater_is_better: bool


RMSE: Final = HoldoutMetric(Metric.RMSE.value, greater_is_better=False)
LOG_LOSS: Final = HoldoutMetric(Metric.LOG_LOSS.value, greater_is_better=False)


def holdout_metric(spec: FeatureSpec) -> HoldoutMetric:
    """The metric a model is judged on: its declared promotion metric, else its task's default
    (RMSE for regression, log loss for classification; ``FeatureSpec.promotion_metric``)."""
    metric = spec.promotion_metric
    return HoldoutMetric(metric.value, greater_is_better=metric.greater_is_better)


@dataclass(frozen=True, slots=True)
class PromotionVerdict:
    """Whether the challenger's score earns the promotion, and why."""

    promote: bool
    improvement: float
    """Relative improvement over the champion (0.05: 5 % better; negative: worse)."""
    reason: str


def relative_improvement(
    metric: HoldoutMetric, challenger_score: float, champion_score: float
) -> float:
    """How much better the challenger is, relative to the champion's score (negative: worse)."""
    gain = challenger_score - champion_score
    if not metric.greater_is_better:
        gain = -gain
    if champion_score == 0:
        # A perfect (lower-is-better) champion cannot be beaten; any gain is "infinitely" large.
        return 0.0 if gain == 0 else math.copysign(math.inf, gain)
    return gain / abs(champion_score)


def judge_challenger(
    metric: HoldoutMetric, challenger_score: float, champion_score: float, margin: float
) -> PromotionVerdict:
    """Apply the promotion rule (see the module docstring) to two holdout scores."""
    scores = f"{metric.name} {challenger_score:.4g} against the champion's {champion_score:.4g}"
    if not (math.isfinite(challenger_score) and math.isfinite(champion_score)):
        return PromotionVerdict(False, math.nan, f"{scores}: a score is not finite")
    improvement = relative_improvement(metric, challenger_score, champion_score)
    change = f"{improvement:.1%} better" if improvement >= 0 else f"{-improvement:.1%} worse"
    if improvement > 0 and improvement >= margin * (1 - _MARGIN_TOLERANCE):
        return PromotionVerdict(True, improvement, f"{scores}: {change}, margin {margin:.1%}")
    return PromotionVerdict(
        False, improvement, f"{scores}: {change}, short of the {margin:.1%} margin"
    )
