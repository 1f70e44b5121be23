"""Judging one window of live data against the champion's reference data with Evidently.

Column types and stat tests come from the feature declaration (numeric or categorical, and
whether the feature is monitored), never from Evidently's guessing: a window is compared on
the same columns with the same tests whatever its size. A window too small to judge is a
``WindowRefused`` result, not an exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Self

import numpy as np
import pandas as pd
from evidently import BinaryClassification, DataDefinition, Dataset, Regression, Report
from evidently.metrics import (
    MAE,
    RMSE,
    Accuracy,
    F1Score,
    LogLoss,
    MeanError,
    R2Score,
    RocAuc,
    ValueDrift,
)
from evidently.presets import DataDriftPreset
from pydantic import BaseModel, ConfigDict, Field, model_validator

from driftloop.drift.baseline import PREDICTION_COLUMN as PREDICTION_COLUMN
from driftloop.drift.baseline import calibrate
from driftloop.drift.policy import DriftPolicy
from driftloop.training.metrics import metric_value
from schemas.events import DriftDetected
from schemas.features import TASK_METRICS, FeatureKind, FeatureSpec, Task
from schemas.fields import UtcDatetime


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class FeatureDrift(_Result):
    """Drift of one monitored feature (or of the predictions) between reference and window."""

    name: str
    """Column compared."""
    kind: FeatureKind
    """numeric or categorical, from the declaration."""
    stat_test: str
    """Evidently stat test used (a distance)."""
    threshold: float
    """Score at or above which the column drifted."""
    score: float
    """The test's score (distance) on this window."""
    drifted: bool
    """Whether the column drifted (score above threshold)."""
    bound: float = Field(default=0.0, ge=0)
    """Largest possible difference between this score, computed from the window's sketch, and
    the same test run on the window's raw values (0: exact)."""


class QualityAssessment(_Result):
    """Model quality on the labelled rows of a window."""

    task: Task
    """regression or classification, from the declaration."""
    labelled_rows: int = Field(ge=1)
    """Rows with both a label and a prediction."""
    metrics: dict[str, float]
    """Metric name -> value: mean_error, mae, rmse, r2 (regression) or roc_auc, log_loss,
    brier, accuracy, f1 (classification); the task's holdout metrics (``TASK_METRICS``) as
    ``driftloop.training.metrics`` computes them."""


class WindowBounds(_Result):
    """The time span of a window: start inclusive, end exclusive, UTC."""

    start: UtcDatetime
    end: UtcDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.start >= self.end:
            raise ValueError("a window's start must be before its end")
        return self


class DriftAssessment(_Result):
    """The verdict on one window: per-feature drift, drifted share, prediction drift, quality."""

    outcome: Literal["assessed"] = "assessed"
    window_rows: int = Field(ge=1)
    """Rows in the window."""
    reference_rows: int = Field(ge=1)
    """Rows in the reference data."""
    features: tuple[FeatureDrift, ...]
    """Every monitored feature, in declaration order."""
    drift_share: float = Field(ge=0, le=1)
    """Share of the monitored features that drifted."""
    drift_share_threshold: float
    """Share at or above which the window drifted (from the policy)."""
    drifted: bool
    """Whether the window drifted: drift_share >= drift_share_threshold, or its quality
    degraded."""
    prediction: FeatureDrift | None
    """Drift of the predictions; None when the reference or the window has none."""
    labelled_rows: int = Field(ge=0)
    """Rows of the window with a label (and a prediction)."""
    quality: QualityAssessment | None
    """Quality on the labelled rows; None below the policy's minimum of labelled rows."""
    quality_metric: str | None = None
    """The metric the limit bounds: the version's promotion metric."""
    quality_limit: float | None = None
    """The version's limit of its promotion metric at this many labelled rows (its baseline's
    ``QualityCalibration``); None when quality was not judged."""
    quality_degraded: bool = False
    """The promotion metric on the labelled rows is past ``quality_limit``."""

    @property
    def drifted_features(self) -> tuple[str, ...]:
        """Monitored features that drifted, in declaration order."""
        return tuple(feature.name for feature in self.features if feature.drifted)

    @property
    def prediction_drifted(self) -> bool:
        """Whether the predictions drifted (False when they could not be compared)."""
        return self.prediction is not None and self.prediction.drifted

    def to_event(
        self,
        *,
        model_name: str,
        model_version: int,
        window: WindowBounds,
        episode_id: str,
        report_uri: str,
    ) -> DriftDetected:
        """The ``DriftDetected`` event announcing this window's drift."""
        return DriftDetected(
            model_name=model_name,
            model_version=model_version,
            episode_id=episode_id,
            window_start=window.start,
            window_end=window.end,
            window_rows=self.window_rows,
            drift_share=self.drift_share,
            drifted_features=self.drifted_features,
            prediction_drifted=self.prediction_drifted,
            quality_degraded=self.quality_degraded,
            report_uri=report_uri,
        )


class RefusalReason(StrEnum):
    """Why a window was not judged."""

    TOO_FEW_ROWS = "too_few_rows"
    TOO_FEW_REFERENCE_ROWS = "too_few_reference_rows"
    MISSING_COLUMNS = "missing_columns"
    NO_VALUES = "no_values"


class WindowRefused(_Result):
    """A window that was not judged, and why: neither drifted nor clean."""

    outcome: Literal["refused"] = "refused"
    reason: RefusalReason
    """Class of the refusal (a metrics label)."""
    detail: str
    """What was wrong, for a person."""
    window_rows: int = Field(ge=0)
    """Rows in the window."""
    reference_rows: int = Field(ge=0)
    """Rows in the reference data."""


WindowVerdict = DriftAssessment | WindowRefused


@dataclass(frozen=True, slots=True)
class WindowEvaluation:
    """An assessment with the Evidently snapshots it was read from (for the reports)."""

    assessment: DriftAssessment
    drift_snapshot: Any
    """Evidently ``Snapshot`` of data and prediction drift on the whole window."""
    quality_snapshot: Any | None
    """Evidently ``Snapshot`` of quality on the labelled rows, when computed."""


def evaluate_window(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    policy: DriftPolicy,
    *,
    thresholds: Mapping[str, float] | None = None,
    prediction_column: str = PREDICTION_COLUMN,
) -> WindowEvaluation | WindowRefused:
    """Run Evidently on a window against the reference; keep the snapshots for the reports.

    ``thresholds`` (per monitored feature and the predictions) default to the reference's own,
    calibrated for the window's row count (``driftloop.drift.baseline``): callers that judge
    many windows of one reference calibrate once and pass them.
    """
    refused = _refusal(reference, current, spec, policy)
    if refused is not None:
        return refused
    if thresholds is None:
        thresholds = calibrate(spec, reference, policy).thresholds(len(current))
    monitored = spec.monitored_features
    has_predictions = all(
        prediction_column in frame.columns and bool(frame[prediction_column].notna().any())
        for frame in (reference, current)
    )
    predictions = prediction_column if has_predictions else None
    compared = drift_columns(spec, predictions)
    definition = drift_definition(spec, predictions)
    snapshot = drift_report(spec, policy, predictions, thresholds).run(
        Dataset.from_pandas(_model_columns(current, spec, compared), data_definition=definition),
        Dataset.from_pandas(_model_columns(reference, spec, compared), data_definition=definition),
    )
    features = tuple(
        _column_drift(
            snapshot,
            name,
            spec.feature(name).kind,
            policy.stat_test(spec.feature(name).kind),
            thresholds[name],
        )
        for name in monitored
    )
    prediction = (
        _column_drift(
            snapshot,
            prediction_column,
            FeatureKind.NUMERIC,
            policy.prediction_stat_test,
            thresholds[prediction_column],
        )
        if has_predictions
        else None
    )
    share = sum(feature.drifted for feature in features) / len(features)
    quality, quality_snapshot, labelled = labelled_quality(
        current, spec, policy, prediction_column=prediction_column
    )
    assessment = DriftAssessment(
        window_rows=len(current),
        reference_rows=len(reference),
        features=features,
        drift_share=share,
        drift_share_threshold=policy.drift_share_threshold,
        drifted=share >= policy.drift_share_threshold,
        prediction=prediction,
        labelled_rows=labelled,
        quality=quality,
    )
    return WindowEvaluation(assessment, snapshot, quality_snapshot)


def labelled_quality(
    current: pd.DataFrame,
    spec: FeatureSpec,
    policy: DriftPolicy,
    *,
    prediction_column: str = PREDICTION_COLUMN,
) -> tuple[QualityAssessment | None, Any | None, int]:
    """Quality on the window's labelled rows (None below the policy's minimum), its Evidently
    snapshot, and how many rows were labelled."""
    labelled = _labelled(current, spec, prediction_column)
    if len(labelled) < policy.min_labelled_rows:
        return None, None, len(labelled)
    quality, snapshot = _quality(labelled, spec, prediction_column)
    return quality, snapshot, len(labelled)


def assess_window(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    policy: DriftPolicy,
    *,
    thresholds: Mapping[str, float] | None = None,
    prediction_column: str = PREDICTION_COLUMN,
) -> WindowVerdict:
    """Judge a window against the reference: a ``DriftAssessment`` or a ``WindowRefused``."""
    evaluation = evaluate_window(
        reference,
        current,
        spec,
        policy,
        thresholds=thresholds,
        prediction_column=prediction_column,
    )
    return evaluation if isinstance(evaluation, WindowRefused) else evaluation.assessment


def window_bounds(frame: pd.DataFrame, column: str, end: datetime | None = None) -> WindowBounds:
    """Bounds of a window from its timestamps: first one, and ``end`` (or just after the last)."""
    moments = pd.to_datetime(frame[column], utc=True)
    start = moments.min().to_pydatetime()
    last = moments.max().to_pydatetime()
    return WindowBounds(start=start, end=end or last + pd.Timedelta(microseconds=1))


def _refusal(
    reference: pd.DataFrame, current: pd.DataFrame, spec: FeatureSpec, policy: DriftPolicy
) -> WindowRefused | None:
    def refuse(reason: RefusalReason, detail: str) -> WindowRefused:
        return WindowRefused(
            reason=reason,
            detail=detail,
            window_rows=len(current),
            reference_rows=len(reference),
        )

    if not spec.monitored_features:
        return refuse(RefusalReason.MISSING_COLUMNS, f"{spec.name} declares no monitored feature")
    for label, frame in (("window", current), ("reference", reference)):
        missing = [name for name in spec.monitored_features if name not in frame.columns]
        if missing:
            return refuse(
                RefusalReason.MISSING_COLUMNS,
                f"the {label} lacks monitored feature(s): {', '.join(missing)}",
            )
    if len(current) < policy.min_rows:
        return refuse(
            RefusalReason.TOO_FEW_ROWS,
            f"the window has {len(current)} rows, fewer than the minimum {policy.min_rows}",
        )
    if len(reference) < policy.min_rows:
        return refuse(
            RefusalReason.TOO_FEW_REFERENCE_ROWS,
            f"the reference has {len(reference)} rows, fewer than the minimum {policy.min_rows}",
        )
    for label, frame in (("window", current), ("reference", reference)):
        empty = [name for name in spec.monitored_features if not frame[name].notna().any()]
        if empty:
            return refuse(
                RefusalReason.NO_VALUES, f"the {label} has no value of: {', '.join(empty)}"
            )
    return None


def drift_columns(spec: FeatureSpec, prediction_column: str | None) -> list[str]:
    """Columns the drift report compares: the monitored features, then the predictions."""
    return [*spec.monitored_features, *([prediction_column] if prediction_column else [])]


def drift_definition(spec: FeatureSpec, prediction_column: str | None) -> Any:
    """Evidently column types from the declaration (predictions are numeric)."""
    return DataDefinition(
        numerical_columns=[
            *spec.monitored_numeric_features,
            *([prediction_column] if prediction_column else []),
        ],
        categorical_columns=list(spec.monitored_categorical_features),
    )


def drift_report(
    spec: FeatureSpec,
    policy: DriftPolicy,
    prediction_column: str | None,
    thresholds: Mapping[str, float],
) -> Any:
    """The Evidently report of data drift (and prediction drift) the policy asks for."""
    monitored = spec.monitored_features
    metrics: list[Any] = [
        DataDriftPreset(
            columns=list(monitored),
            drift_share=policy.drift_share_threshold,
            per_column_method={
                name: policy.stat_test(spec.feature(name).kind) for name in monitored
            },
            per_column_threshold={name: thresholds[name] for name in monitored},
        )
    ]
    if prediction_column:
        metrics.append(
            ValueDrift(
                column=prediction_column,
                method=policy.prediction_stat_test,
                threshold=thresholds[prediction_column],
            )
        )
    # Tests carry Evidently's drifted/not-drifted verdict of every column.
    return Report(metrics, include_tests=True)


def _model_columns(frame: pd.DataFrame, spec: FeatureSpec, columns: Sequence[str]) -> pd.DataFrame:
    # Logged windows and the reference come from different readers (Postgres JSON, Parquet,
    # CSV): integer categories may arrive as int, float (after a missing value) or object, and
    # the tests must see one representation on both sides.
    prepared = {}
    for name in columns:
        values = frame[name]
        feature = None if name not in spec.feature_names else spec.feature(name)
        if feature is None or feature.kind is FeatureKind.NUMERIC or feature.dtype == "int":
            prepared[name] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            # pandas-stubs do not accept None as `other`, which pandas documents and supports.
            prepared[name] = values.astype(object).where(values.notna(), None)  # type: ignore[call-overload]
    return pd.DataFrame(prepared, index=frame.index)


def _column_drift(
    snapshot: Any, name: str, kind: FeatureKind, stat_test: str, threshold: float
) -> FeatureDrift:
    # The preset builds one ValueDrift per column with these exact parameters, so the metric
    # id is the same and the result can be looked up rather than recomputed.
    metric_id = ValueDrift(column=name, method=stat_test, threshold=threshold).metric_id
    result = snapshot.metric_results.get(metric_id)
    if result is None:
        raise RuntimeError(f"Evidently reported no drift for column {name!r}")
    drifted = any(test.status.value == "FAIL" for test in result.tests)
    return FeatureDrift(
        name=name,
        kind=kind,
        stat_test=stat_test,
        threshold=threshold,
        score=float(result.value),
        drifted=drifted,
    )


def _labelled(current: pd.DataFrame, spec: FeatureSpec, prediction_column: str) -> pd.DataFrame:
    target = spec.target.name
    if target not in current.columns or prediction_column not in current.columns:
        return current.iloc[0:0]
    pairs = pd.DataFrame(
        {
            target: pd.to_numeric(current[target], errors="coerce"),
            prediction_column: pd.to_numeric(current[prediction_column], errors="coerce"),
        }
    )
    return pairs.dropna()


def quality_metrics(spec: FeatureSpec) -> list[tuple[str, Any]]:
    """Name and Evidently metric of each quality figure of the declaration's task."""
    if spec.task is Task.REGRESSION:
        return [("mean_error", MeanError()), ("mae", MAE()), ("rmse", RMSE()), ("r2", R2Score())]
    return [
        ("roc_auc", RocAuc()),
        ("log_loss", LogLoss()),
        ("accuracy", Accuracy()),
        ("f1", F1Score()),
    ]


def quality_definition(spec: FeatureSpec, prediction_column: str) -> Any:
    """Evidently column roles of the labelled rows: target and prediction."""
    target = spec.target.name
    if spec.task is Task.REGRESSION:
        return DataDefinition(
            numerical_columns=[target, prediction_column],
            regression=[Regression(target=target, prediction=prediction_column)],
        )
    # Labels are 0/1 (GroundTruth.label), the prediction the positive-class probability.
    return DataDefinition(
        numerical_columns=[prediction_column],
        categorical_columns=[target],
        classification=[
            BinaryClassification(target=target, prediction_probas=prediction_column, pos_label=1)
        ],
    )


def _quality(
    labelled: pd.DataFrame, spec: FeatureSpec, prediction_column: str
) -> tuple[QualityAssessment | None, Any | None]:
    target = spec.target.name
    frame = labelled
    if spec.task is Task.CLASSIFICATION:
        frame = labelled.assign(**{target: labelled[target].round().astype("int64")})
        if frame[target].nunique() < 2:  # ROC AUC and log loss need both classes
            return None, None
    metrics = quality_metrics(spec)
    snapshot = Report([metric for _, metric in metrics]).run(
        Dataset.from_pandas(frame, data_definition=quality_definition(spec, prediction_column)),
        None,
    )
    values = {
        name: _metric_value(snapshot.metric_results[metric.metric_id]) for name, metric in metrics
    }
    # The task's holdout metrics by the platform's own code, under the same names bootstrap, the
    # retrain DAG and the events use, so a window's RMSE or Brier is the DAG's (Evidently has no
    # Brier score, and clips log loss otherwise).
    truth = frame[target].to_numpy(dtype=np.float64)
    predicted = frame[prediction_column].to_numpy(dtype=np.float64)
    values.update(
        {metric.value: metric_value(metric, truth, predicted) for metric in TASK_METRICS[spec.task]}
    )
    quality = QualityAssessment(task=spec.task, labelled_rows=len(labelled), metrics=values)
    return quality, snapshot


def _metric_value(result: Any) -> float:
    # Mean/std metrics (MAE, mean error) report the mean as the value.
    mean = getattr(result, "mean", None)
    return float(mean.value if mean is not None else result.value)
