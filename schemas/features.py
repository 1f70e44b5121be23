"""Feature declarations: a model's features, target and task, declared once in YAML.

The gateway's request row, the log tables, the drift monitor's column mapping and the
training DAG all read the same ``FeatureSpec``; bringing a model with another feature set
means adding a file to ``schemas/models/``, not code.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Self, cast

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from schemas.fields import (
    FeatureName,
    FeatureValue,
    FiniteFloat,
    ModelName,
    NonEmptyText,
    UtcDatetime,
)

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

MODELS_DIR = Path(__file__).with_name("models")
"""Where the declarations named by ``load_feature_spec("<name>")`` live."""

Category = StrictInt | StrictStr

# Integers up to 2**53 in magnitude convert to float exactly, so the fast row check compares
# them as pydantic does; larger ones (and bounds that are not exact floats) take its path.
_EXACT_INTEGER: Final = 2**53
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def _whole_float_as_int(value: object) -> object:
    # JSON Schema's "integer" is any number without a fractional part, 14.0 included: the
    # contract the OpenAPI document publishes accepts it, so the row model reads it as 14.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# A strict int (no bool, no numeric string) that also takes a whole JSON number such as 14.0;
# the constraints sit on the int itself, so the JSON Schema keeps them.
def _whole_int(**constraints: Any) -> Any:
    return Annotated[int, Field(strict=True, **constraints), BeforeValidator(_whole_float_as_int)]


class FeatureKind(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Task(StrEnum):
    REGRESSION = "regression"
    CLASSIFICATION = "classification"


class FeatureSpecError(ValueError):
    """A feature declaration that cannot be read or is inconsistent."""


class _Declaration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Feature(_Declaration):
    """One model input: its type, admissible values and whether drift is watched on it."""

    name: FeatureName
    """Column name, the same in requests, events, tables and training data."""
    kind: FeatureKind
    """numeric (ordered quantity) or categorical (one of a closed set of values)."""
    dtype: Literal["int", "float", "str"]
    """Type of a value: int or float for numeric features, int or str for categorical ones."""
    description: NonEmptyText
    """What the value means, with its unit or coding."""
    nullable: bool = False
    """Whether a value may be missing (null); LightGBM treats a missing value as NaN."""
    monitored: bool = True
    """Whether the drift monitor watches this feature."""
    categories: tuple[Category, ...] | None = None
    """Admissible values of a categorical feature, in code order (a value's code is its index)."""
    minimum: StrictInt | FiniteFloat | None = None
    """Smallest admissible value of a numeric feature (a hard bound, not a typical range)."""
    maximum: StrictInt | FiniteFloat | None = None
    """Largest admissible value of a numeric feature (a hard bound, not a typical range)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind is FeatureKind.NUMERIC:
            if self.dtype == "str":
                raise ValueError(f"numeric feature {self.name} cannot have dtype str")
            if self.categories is not None:
                raise ValueError(f"numeric feature {self.name} cannot declare categories")
            if self.dtype == "int" and any(
                isinstance(bound, float) for bound in (self.minimum, self.maximum)
            ):
                raise ValueError(f"int feature {self.name} needs int bounds")
            if (
                self.minimum is not None
                and self.maximum is not None
                and self.minimum > self.maximum
            ):
                raise ValueError(f"feature {self.name}: minimum is above maximum")
            return self
        if self.dtype == "float":
            raise ValueError(f"categorical feature {self.name} needs dtype int or str")
        if not self.categories:
            raise ValueError(f"categorical feature {self.name} needs categories")
        if self.minimum is not None or self.maximum is not None:
            raise ValueError(f"categorical feature {self.name} cannot declare minimum/maximum")
        python_type = int if self.dtype == "int" else str
        if not all(isinstance(category, python_type) for category in self.categories):
            raise ValueError(f"categories of {self.name} must all be {self.dtype}")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories of {self.name} must not repeat")
        return self

    @cached_property
    def category_codes(self) -> Mapping[int | str, int]:
        """Category -> integer code given to LightGBM (its position in ``categories``)."""
        return {category: code for code, category in enumerate(self.categories or ())}

    def annotation(self) -> Any:
        """The pydantic type of this feature's value in a request row."""
        base: Any
        if self.kind is FeatureKind.CATEGORICAL:
            base = Annotated[
                _whole_int() if self.dtype == "int" else StrictStr,
                AfterValidator(self._check_category),
                Field(json_schema_extra={"enum": list(self.categories or ())}),
            ]
        elif self.dtype == "int":
            # Every accepted row is logged as a JSON event, whose encoder (orjson) and readers
            # hold 64-bit integers: a bigger int (and 10**400 is valid JSON and a valid int)
            # is refused here, with the field, instead of failing after it was scored.
            lowest = _INT64_MIN if self.minimum is None else max(self.minimum, _INT64_MIN)
            highest = _INT64_MAX if self.maximum is None else min(self.maximum, _INT64_MAX)
            base = _whole_int(ge=lowest, le=highest)
        else:
            base = Annotated[
                float,
                Field(strict=True, allow_inf_nan=False, ge=self.minimum, le=self.maximum),
            ]
        return base | None if self.nullable else base

    def _check_category(self, value: Category) -> Category:
        if value not in self.category_codes:
            raise ValueError(
                f"{value!r} is not one of the categories {list(self.categories or ())}"
            )
        return value

    def encode(self, value: FeatureValue) -> float:
        """The value as the model reads it: category code, number, or NaN when missing."""
        if value is None:
            return math.nan
        if self.kind is FeatureKind.CATEGORICAL:
            if isinstance(value, float) or value not in self.category_codes:
                raise ValueError(f"{value!r} is not a category of {self.name}")
            return float(self.category_codes[value])
        if isinstance(value, str):
            raise TypeError(f"numeric feature {self.name} got a string: {value!r}")
        return float(value)

    def fast_encoder(self) -> Callable[[object], float | None]:
        """Value -> its encoding when the value is plainly valid, else None.

        Only the plain cases the wire carries are decided here: a value of exactly the
        declared type (int or str; float, or an int a float holds exactly, for float
        features) inside the bounds, one of the categories, or None for a nullable feature.
        Anything else, valid or not (a bool, a float subclass, NaN, a huge int, a value out of
        bounds), gives None so the caller asks ``row_model``, which alone refuses a value and
        words why.
        """
        missing = math.nan if self.nullable else None
        if self.kind is FeatureKind.CATEGORICAL:
            category_type: type = int if self.dtype == "int" else str
            codes: dict[object, float] = {
                category: float(code) for category, code in self.category_codes.items()
            }

            def encode_category(value: object) -> float | None:
                if value is None:
                    return missing
                # type() is, not isinstance(): strict pydantic refuses a bool for an int.
                return codes.get(value) if type(value) is category_type else None

            return encode_category
        lowest, highest = self._plain_range()
        if self.dtype == "int":

            def encode_int(value: object) -> float | None:
                if value is None:
                    return missing
                if type(value) is int and lowest <= value <= highest:
                    return float(value)
                return None

            return encode_int

        def encode_float(value: object) -> float | None:
            if value is None:
                return missing
            # Comparisons with NaN are false and the range is finite, so NaN and the
            # infinities are left to pydantic, which refuses them.
            if type(value) is float:
                return value if lowest <= value <= highest else None
            if type(value) is int and -_EXACT_INTEGER <= value <= _EXACT_INTEGER:
                number = float(value)  # strict pydantic reads an int as a float here
                return number if lowest <= number <= highest else None
            return None

        return encode_float

    def _plain_range(self) -> tuple[float, float]:
        # The values fast_encoder may accept: the declared bounds, narrowed to finite floats
        # (int features: to +-2**53). A float feature's int bound that a float cannot hold
        # exactly might compare differently in pydantic, so it leaves every value to pydantic.
        limit: float = _EXACT_INTEGER if self.dtype == "int" else sys.float_info.max
        if self.dtype == "float" and not all(
            _exact_as_float(bound)
            for bound in (self.minimum, self.maximum)
            if isinstance(bound, int)
        ):
            return math.inf, -math.inf
        lowest = -limit if self.minimum is None else max(self.minimum, -limit)
        highest = limit if self.maximum is None else min(self.maximum, limit)
        return lowest, highest


def _exact_as_float(number: int) -> bool:
    try:
        return float(number) == number
    except OverflowError:
        return False


class TargetType(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Target(_Declaration):
    """What the model predicts, and how its values are coded."""

    name: FeatureName
    """Column name of the true value (also the label sent back as ground truth)."""
    description: NonEmptyText
    """What the value means."""
    type: TargetType = TargetType.NUMERIC
    """numeric: the value is the number learnt (a quantity, or 0/1 for a classification);
    categorical: the value is a class, ``positive`` the one whose probability is predicted."""
    positive: Category | None = None
    """The class a classifier predicts the probability of (categorical targets only)."""
    categories: tuple[Category, ...] | None = None
    """The two classes of a categorical target, when declared: any other value is refused.
    Without them, every value but ``positive`` is the negative class."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.type is TargetType.NUMERIC:
            if self.positive is not None or self.categories is not None:
                raise ValueError(
                    f"numeric target {self.name} cannot declare positive or categories"
                )
            return self
        if self.positive is None:
            raise ValueError(f"categorical target {self.name} needs its positive class")
        if self.categories is not None:
            if len(self.categories) != 2 or len(set(self.categories)) != 2:
                raise ValueError(f"categorical target {self.name} needs two distinct categories")
            if self.positive not in self.categories:
                raise ValueError(
                    f"positive class {self.positive!r} of {self.name} is not one of "
                    f"{list(self.categories)}"
                )
        return self

    def encode(self, value: object) -> float:
        """The value as the model learns it: the number, or 1.0/0.0 for the positive class or not.

        A categorical target also takes its coded values 0.0 and 1.0 (floats, or ints when the
        classes are strings): ground-truth labels and reference datasets hold those.
        """
        if self.type is TargetType.NUMERIC:
            if isinstance(value, str | bool) or not isinstance(value, int | float):
                raise ValueError(f"target {self.name}: {value!r} is not a number")
            return float(value)
        coded = isinstance(value, float) or (
            isinstance(value, int) and not isinstance(self.positive, int)
        )
        if coded and not isinstance(value, bool) and value in (0, 1):
            return float(value)
        if type(value) is type(self.positive):
            if value == self.positive:
                return 1.0
            if self.categories is None or value in self.categories:
                return 0.0
        raise ValueError(f"target {self.name}: {value!r} is not one of its classes")


class TimeSpec(_Declaration):
    """When each row of the seed data happened: a timestamp column, or offsets from an origin.

    Offsets serve data that counts time instead of stamping it (bikeshare: day of the year and
    hour): the time of a row is ``origin + sum(value * step)`` over the offset columns.
    """

    column: NonEmptyText | None = None
    """Column of timestamps (ISO 8601; without a zone they are read as UTC)."""
    origin: UtcDatetime | None = None
    """Time of a row whose offset columns are all 0 (with ``offsets``)."""
    offsets: dict[NonEmptyText, timedelta] = Field(default_factory=dict)
    """Column -> the time one unit of it stands for (ISO 8601, e.g. P1D, PT1H)."""

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        if (self.column is None) == (self.origin is None or not self.offsets):
            raise ValueError("declare either a time column, or an origin with offset columns")
        if self.column is not None and (self.origin is not None or self.offsets):
            raise ValueError("a time column cannot also have an origin or offsets")
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the time is read from."""
        return (self.column,) if self.column is not None else tuple(self.offsets)


class Dataset(_Declaration):
    """The seed data the first model is trained on (and the demo replays)."""

    path: NonEmptyText
    """CSV file, relative to the repository root."""
    order_by: tuple[NonEmptyText, ...] = ()
    """Columns whose ascending order is the time order of the rows; none: no time order."""
    time: TimeSpec | None = None
    """When each row happened. With it the holdout is the latest rows and the first model's
    rows are chosen by time (``training.since``/``until``, ``--since``/``--until``); without it
    the holdout is a seeded random sample."""
    excluded_columns: dict[NonEmptyText, NonEmptyText] = Field(default_factory=dict)
    """Columns of the file that are neither features nor target, with the reason."""


class Metric(StrEnum):
    """Holdout metrics: RMSE and MAE for regression; log loss, ROC AUC and Brier score (of the
    positive class's probability) for classification."""

    RMSE = "rmse"
    MAE = "mae"
    LOG_LOSS = "log_loss"
    ROC_AUC = "roc_auc"
    BRIER = "brier"

    @property
    def greater_is_better(self) -> bool:
        """Whether a higher value is better (ROC AUC); the others are errors or losses."""
        return self is Metric.ROC_AUC


TASK_METRICS: Final[Mapping[Task, tuple[Metric, ...]]] = {
    Task.REGRESSION: (Metric.RMSE, Metric.MAE),
    # Log loss first, the default: a proper scoring rule, so it rewards the calibrated
    # probabilities the platform serves; ROC AUC judges the ranking only.
    Task.CLASSIFICATION: (Metric.LOG_LOSS, Metric.ROC_AUC, Metric.BRIER),
}
"""The metrics of each task, the default promotion metric first."""

# A regression's scale is its own: 1-2.5-5 steps over six decades on each side of 0, so any
# model's quantiles read within a step without knowing its range (a model declares tighter
# bounds in monitoring.prediction_buckets). A classifier serves probabilities: steps of 0.05.
_DECADES: Final = tuple(step * 10.0**power for power in range(6) for step in (1, 2.5, 5))
TASK_PREDICTION_BUCKETS: Final[Mapping[Task, tuple[float, ...]]] = {
    Task.REGRESSION: (-1e6, *(-bound for bound in reversed(_DECADES)), 0.0, *_DECADES, 1e6),
    Task.CLASSIFICATION: tuple(round(0.05 * step, 2) for step in range(1, 21)),
}
"""Histogram bounds of a task's served predictions when its declaration names none."""


class TrainingData(_Declaration):
    """Which labelled history a retrained version learns from (``training.data``).

    Written ``all`` (every labelled row: the seed rows and the logged traffic), or
    ``{last_days: N}`` (the rows of the last N days of prediction time before the retraining),
    or ``{half_life_days: H}`` (every row, weighted 0.5 ** (age / H) days). Ages count back
    from the newest labelled row, not the wall clock, so a replay trains as live traffic would.
    Seed rows of a dataset without a time column have no age: they count as old as the oldest
    dated row (out of a ``last_days`` window, at the smallest weight under a half-life).
    """

    last_days: float | None = Field(default=None, gt=0)
    """Keep only the rows of the last this many days."""
    half_life_days: float | None = Field(default=None, gt=0)
    """Weight each row by its age: half the weight every this many days."""

    @model_validator(mode="before")
    @classmethod
    def _spelled(cls, value: Any) -> Any:
        if value == "all":
            return {}
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> Self:
        if self.last_days is not None and self.half_life_days is not None:
            raise ValueError("training.data is all, last_days or half_life_days, not several")
        return self

    def describe(self) -> str:
        """The policy as it is written in a declaration."""
        if self.last_days is not None:
            return f"last {self.last_days:g} days"
        if self.half_life_days is not None:
            return f"half-life {self.half_life_days:g} days"
        return "all history"


class PromotionEvidence(StrEnum):
    """What a challenger that passed the holdout gate needs before it becomes champion."""

    HOLDOUT = "holdout"
    """The holdout is enough: the alias moves at once."""
    SHADOW = "shadow"
    """It waits under the ``challenger`` alias, scored in shadow on live traffic, and is
    promoted when its error on the labelled rows that arrive beats the champion's."""


class LiveEvidence(_Declaration):
    """How versions are judged on live labelled rows, against the one they would replace."""

    promotion: PromotionEvidence = PromotionEvidence.HOLDOUT
    """``holdout`` (default): promote on the holdout alone; ``shadow``: live evidence first."""
    rows: int = Field(default=200, ge=10)
    """Labelled rows of the comparison: a challenger in shadow is judged over its first
    ``rows`` labelled rows, a new champion against the one it replaced over its first ``rows``
    (default 200)."""
    margin: float = Field(default=0.02, ge=0, lt=1)
    """Relative improvement of the promotion metric on those rows that decides (default 0.02):
    a challenger in shadow needs it over the champion; a new champion is rolled back when the
    version it replaced beats it by it."""
    rollback: bool = True
    """Whether a promotion that loses on live rows is undone (default true)."""


class Training(_Declaration):
    """How models are trained and judged."""

    promotion_metric: Metric | None = None
    """Holdout metric a challenger must improve to be promoted, and that bootstrap, the retrain
    DAG and the model events report; one of the task's (default: rmse for regression,
    log_loss for classification)."""
    since: UtcDatetime | None = None
    """Start (inclusive) of the seed rows the first model learns, by the dataset's time;
    ``--since`` overrides it. None: from the first row."""
    until: UtcDatetime | None = None
    """End (exclusive) of the seed rows the first model learns; ``--until`` overrides it."""
    holdout: timedelta = Field(default=timedelta(days=14), gt=timedelta(0))
    """With a time column: the latest span of the chosen rows held out (default P14D)."""
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Without a time column: the share of the rows held out, drawn at random."""
    seed: int = 7
    """Seed of the random holdout (the same rows every time)."""
    data: TrainingData | None = None
    """Which labelled history a retrained version learns from; None: as much as the first
    model learned (``FeatureSpec.training_data``)."""
    live: LiveEvidence = Field(default_factory=LiveEvidence)
    """Evidence on live traffic: shadow promotion and rollback."""


class Monitoring(_Declaration):
    """How the drift monitor watches the model's traffic."""

    window: timedelta = Field(default=timedelta(hours=1), gt=timedelta(0))
    """Span of prediction time judged as one window (ISO 8601, e.g. PT1M, PT1H, P7D): windows
    are aligned on multiples of it since the Unix epoch, and judged once closed and settled."""
    prediction_buckets: tuple[FiniteFloat, ...] | None = Field(default=None, min_length=1)
    """Upper bounds of the served predictions' histogram (``gateway_prediction_value``),
    increasing; none: the task's (``FeatureSpec.prediction_buckets``)."""

    @field_validator("prediction_buckets")
    @classmethod
    def _increasing(cls, bounds: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if bounds is not None and any(low >= high for low, high in itertools.pairwise(bounds)):
            raise ValueError(f"prediction_buckets must increase, got {list(bounds)}")
        return bounds


DEFAULT_HOT_RETENTION: Final = timedelta(days=14)
"""How long a model's predictions and labels stay in Postgres when its declaration is silent."""


class Retention(_Declaration):
    """How long the model's data is kept in each store."""

    hot: timedelta = Field(default=DEFAULT_HOT_RETENTION, ge=timedelta(days=1))
    """Predictions and labels in Postgres (ISO 8601, e.g. P14D; at least one day, the
    partition's span): drift windows and recent training rows read them there; older history
    is read from Parquet. Partitions are shared, so the longest declared retention applies."""
    parquet: timedelta | None = Field(default=None, ge=timedelta(days=1))
    """Feature and label files in the object store (e.g. P400D); none: kept for good (Parquet
    is the system of record). Whole days go, once past it."""
    reports: timedelta = Field(default=timedelta(days=90), ge=timedelta(days=1))
    """Drift reports, JSON and HTML (default P90D)."""
    report_html_bytes: int = Field(default=256 * 2**20, ge=0)
    """Budget of the model's gzipped HTML reports in bytes (default 256 MiB): past it, the
    oldest HTML files go (their JSON stays)."""


class FeatureSpec(_Declaration):
    """The declaration of one model's inputs, target and task."""

    name: ModelName
    """Name of the declaration (the file is ``schemas/models/<name>.yaml``)."""
    description: NonEmptyText
    """What the model is for."""
    task: Task
    """regression or (binary) classification."""
    registered_model_name: ModelName
    """Default name of the model in the MLflow registry."""
    target: Target
    """The predicted column."""
    features: tuple[Feature, ...] = Field(min_length=1)
    """The inputs, in the order of the model's input vector."""
    dataset: Dataset | None = None
    """Seed data, when the model ships with some."""
    monitoring: Monitoring = Field(default_factory=Monitoring)
    """How drift is watched (the window's span)."""
    retention: Retention = Field(default_factory=Retention)
    """How long its data is kept (``hot``: Postgres)."""
    training: Training = Field(default_factory=Training)
    """How models are trained and judged (promotion metric, holdout, the first model's rows)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [feature.name for feature in self.features]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"features declared twice: {repeated}")
        if self.target.name in names:
            raise ValueError(f"target {self.target.name} is also declared as a feature")
        # A row model field must not shadow a pydantic BaseModel attribute.
        shadowing = [name for name in names if hasattr(BaseModel, name)]
        if shadowing:
            raise ValueError(f"feature names reserved by pydantic: {shadowing}")
        if self.dataset is not None:
            used = {*names, self.target.name}.intersection(self.dataset.excluded_columns)
            if used:
                raise ValueError(f"excluded columns are used by the model: {sorted(used)}")
        if self.target.type is TargetType.CATEGORICAL and self.task is not Task.CLASSIFICATION:
            raise ValueError(f"a categorical target needs task classification, not {self.task}")
        metric = self.training.promotion_metric
        if metric is not None and metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"promotion metric {metric} is not a {self.task} metric; "
                f"choose one of {[str(choice) for choice in TASK_METRICS[self.task]]}"
            )
        timed = self.dataset is not None and self.dataset.time is not None
        if not timed and (self.training.since is not None or self.training.until is not None):
            raise ValueError("training.since/until need a dataset with a time column")
        if (
            self.training.since is not None
            and self.training.until is not None
            and self.training.since >= self.training.until
        ):
            raise ValueError("training.since must be before training.until")
        return self

    @property
    def training_data(self) -> TrainingData:
        """The declared ``training.data``, else the span the first model learned.

        By default a retrained version learns as much history as the declaration gave the first
        model (``training.until`` minus ``training.since``: bikeshare's winter quarter, 90
        days), so the training set and the reference (the version's own training data, which
        the drift thresholds are calibrated on) keep the size and the sensitivity the author
        chose, instead of diluting each season into all the ones before it. Measured on the
        demo replay (``bench/loop_value.py``). Without both bounds there is no such span (a
        dataset without a time column, like breast_cancer): every labelled row is kept.
        """
        if self.training.data is not None:
            return self.training.data
        since, until = self.training.since, self.training.until
        if since is None or until is None:
            return TrainingData()
        return TrainingData(last_days=(until - since) / timedelta(days=1))

    @property
    def promotion_metric(self) -> Metric:
        """The declared promotion metric, else the task's default."""
        return self.training.promotion_metric or TASK_METRICS[self.task][0]

    @property
    def prediction_buckets(self) -> tuple[float, ...]:
        """Histogram bounds of the served predictions: the declared ones, else the task's."""
        return self.monitoring.prediction_buckets or TASK_PREDICTION_BUCKETS[self.task]

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """Every holdout metric of the task, the default first."""
        return TASK_METRICS[self.task]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every feature, in declaration order (the order of the model's input vector)."""
        return tuple(feature.name for feature in self.features)

    @property
    def numeric_features(self) -> tuple[str, ...]:
        """Numeric features, in declaration order."""
        return self._names(FeatureKind.NUMERIC)

    @property
    def categorical_features(self) -> tuple[str, ...]:
        """Categorical features, in declaration order."""
        return self._names(FeatureKind.CATEGORICAL)

    @property
    def monitored_features(self) -> tuple[str, ...]:
        """Features the drift monitor watches, in declaration order."""
        return tuple(feature.name for feature in self.features if feature.monitored)

    @property
    def monitored_numeric_features(self) -> tuple[str, ...]:
        """Watched numeric features: the drift monitor's numerical columns."""
        return self._names(FeatureKind.NUMERIC, monitored_only=True)

    @property
    def monitored_categorical_features(self) -> tuple[str, ...]:
        """Watched categorical features: the drift monitor's categorical columns."""
        return self._names(FeatureKind.CATEGORICAL, monitored_only=True)

    @property
    def categorical_positions(self) -> tuple[int, ...]:
        """Positions of the categorical features in the input vector (LightGBM's input)."""
        return tuple(
            position
            for position, feature in enumerate(self.features)
            if feature.kind is FeatureKind.CATEGORICAL
        )

    def feature(self, name: str) -> Feature:
        """The declaration of one feature."""
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"{self.name} declares no feature {name!r}")

    @cached_property
    def row_model(self) -> type[BaseModel]:
        """Pydantic model of one feature row; nullable features may be omitted."""
        fields: dict[str, Any] = {
            feature.name: (
                feature.annotation(),
                Field(default=None, description=feature.description)
                if feature.nullable
                else Field(description=feature.description),
            )
            for feature in self.features
        }
        return create_model(
            f"{_camel_case(self.name)}FeatureRow",
            __config__=ConfigDict(
                frozen=True, extra="forbid", strict=True, protected_namespaces=()
            ),
            __doc__=f"One row of {self.name} features.",
            **fields,
        )

    def validate_row(self, row: Mapping[str, object]) -> dict[str, FeatureValue]:
        """The row checked by ``row_model`` (ValidationError otherwise), missing values as None."""
        validated = self.row_model.model_validate(row)
        return {name: getattr(validated, name) for name in self.feature_names}

    def encode_row(self, row: Mapping[str, FeatureValue]) -> list[float]:
        """A checked row as the model's input vector: category codes, NaN for missing values."""
        return [feature.encode(row.get(feature.name)) for feature in self.features]

    def encode_rows(self, rows: Sequence[Mapping[str, object]]) -> EncodedRows:
        """Many rows checked and encoded: ``encode_row(validate_row(row))`` for each, faster.

        A row of plain values (a dict of declared features, each of exactly its type, in
        range or a category, None only where nullable) is encoded straight away; any other
        row goes through ``validate_row`` and ``encode_row``, so what is accepted, how it is
        encoded and each refusal's error are theirs (a unit test compares them row by row).
        Measured on bikeshare rows: ~4 us a row instead of ~17.
        """
        import numpy as np  # here, not at the top: DAG files import schemas without numpy

        encoders = self._fast_encoders
        declared = self._feature_name_set
        values: list[float] = []
        accepted: list[int] = []
        refused: list[tuple[int, ValueError | TypeError]] = []
        checked: dict[int, dict[str, FeatureValue]] = {}
        for index, row in enumerate(rows):
            if type(row) is dict and row.keys() <= declared:
                plain = [encode(row.get(name)) for name, encode in encoders]
                if None not in plain:
                    accepted.append(index)
                    values.extend(cast("list[float]", plain))
                    continue
            try:
                validated = self.validate_row(row)
                vector = self.encode_row(validated)
            except (ValueError, TypeError) as error:  # ValidationError is a ValueError
                refused.append((index, error))
                continue
            accepted.append(index)
            checked[index] = validated
            values.extend(vector)
        matrix = np.array(values, dtype=np.float64).reshape(len(accepted), len(encoders))
        return EncodedRows(matrix=matrix, accepted=accepted, refused=refused, checked=checked)

    @cached_property
    def _fast_encoders(self) -> tuple[tuple[str, Callable[[object], float | None]], ...]:
        return tuple((feature.name, feature.fast_encoder()) for feature in self.features)

    @cached_property
    def _feature_name_set(self) -> frozenset[str]:
        return frozenset(self.feature_names)

    def _names(self, kind: FeatureKind, *, monitored_only: bool = False) -> tuple[str, ...]:
        return tuple(
            feature.name
            for feature in self.features
            if feature.kind is kind and (feature.monitored or not monitored_only)
        )


@dataclass(frozen=True, slots=True)
class EncodedRows:
    """A batch of rows checked and encoded by ``FeatureSpec.encode_rows``."""

    matrix: NDArray[np.float64]
    """The accepted rows' input vectors, one matrix row each, in the order of ``accepted``."""
    accepted: list[int]
    """Positions, in the rows given, of the accepted rows (ascending)."""
    refused: list[tuple[int, ValueError | TypeError]]
    """Position of each refused row with the error ``validate_row``/``encode_row`` raised."""
    checked: dict[int, dict[str, FeatureValue]]
    """The rows accepted by ``validate_row`` (not plain), as it gave them, by position; a plain
    row is accepted as it is."""


MODELS_DIRS_VARIABLE: Final = "DRIFTLOOP_MODELS_DIRS"
"""Environment variable: more folders of declarations, separated like ``PATH``, searched before
the shipped ``schemas/models`` (a deployment's own models, e.g. a mounted ConfigMap)."""


def declaration_dirs() -> list[Path]:
    """The folders of declarations, in the order a name is looked up: configured, then shipped."""
    configured = os.environ.get(MODELS_DIRS_VARIABLE, "")
    return [*(Path(part) for part in configured.split(os.pathsep) if part), MODELS_DIR]


def _declaration_path(name: str) -> Path | None:
    for folder in declaration_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def declared_feature_specs() -> list[str]:
    """Names of the declarations in every declaration folder (read anew on every call, so a
    running service sees a declaration added since it started)."""
    return sorted({path.stem for folder in declaration_dirs() for path in folder.glob("*.yaml")})


def declared_specs() -> list[FeatureSpec]:
    """Every declaration in the declaration folders, loaded (read anew on every call)."""
    return [load_feature_spec(name) for name in declared_feature_specs()]


def load_feature_spec(name_or_path: str | Path) -> FeatureSpec:
    """Read a declaration: a name in the declaration folders (``"bikeshare"``) or a YAML path."""
    # A bare name (no dot, no slash) names a shipped declaration; anything else is a path.
    named = isinstance(name_or_path, str) and bool(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name_or_path)
    )
    found = _declaration_path(str(name_or_path)) if named else Path(name_or_path)
    if found is None:
        raise FeatureSpecError(
            f"no feature declaration named {name_or_path!r}; declared: {declared_feature_specs()}"
        )
    path = found
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = FeatureSpec.model_validate(document)
    except OSError as error:
        raise FeatureSpecError(f"cannot read feature declaration {path}: {error}") from error
    except yaml.YAMLError as error:
        raise FeatureSpecError(f"{path}: not valid YAML: {error}") from error
    except ValidationError as error:
        raise FeatureSpecError(f"{path}: invalid feature declaration: {error}") from error
    if named and spec.name != name_or_path:
        raise FeatureSpecError(f"{path}: declares name {spec.name!r}, expected {name_or_path!r}")
    return spec


def _camel_case(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part)
