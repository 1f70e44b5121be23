"""Judging windows of the real Bike Sharing data: seasonal drift, a clean split, refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import TypeAdapter, ValidationError

from driftloop.drift.assessment import (
    DriftAssessment,
    RefusalReason,
    WindowBounds,
    WindowEvaluation,
    WindowRefused,
    WindowVerdict,
    assess_window,
    evaluate_window,
    window_bounds,
)
from driftloop.drift.baseline import calibrate
from driftloop.drift.policy import DriftPolicy
from driftloop.training.metrics import metric_value
from schemas.events import DriftDetected
from schemas.features import FeatureKind, FeatureSpec, Task, load_feature_spec

REPOSITORY = Path(__file__).resolve().parents[2]
WINTER = ("Jan", "Feb", "March")


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def seed(spec: FeatureSpec) -> pd.DataFrame:
    """The bundled data with a noisy oracle's predictions, as logged windows would carry them."""
    assert spec.dataset is not None
    frame = pd.read_csv(REPOSITORY / spec.dataset.path)
    noise = np.random.default_rng(7).normal(1.0, 0.1, len(frame))
    return frame.assign(prediction=frame["bikers"] * noise)


@pytest.fixture(scope="module")
def winter(seed: pd.DataFrame) -> pd.DataFrame:
    return seed[seed["mnth"].isin(WINTER)]


@pytest.fixture(scope="module")
def july(seed: pd.DataFrame) -> pd.DataFrame:
    """July, with labels for every second hour only (feedback not in yet for the rest)."""
    window = seed[seed["mnth"] == "July"].copy()
    window.loc[window.index[1::2], "bikers"] = np.nan
    return window


@pytest.fixture(scope="module")
def summer(winter: pd.DataFrame, july: pd.DataFrame, spec: FeatureSpec) -> WindowEvaluation:
    evaluation = evaluate_window(winter, july, spec, DriftPolicy())
    assert isinstance(evaluation, WindowEvaluation)
    return evaluation


@pytest.fixture(scope="module")
def january_split(seed: pd.DataFrame, spec: FeatureSpec) -> DriftAssessment:
    january = seed[seed["mnth"] == "Jan"].sample(frac=1.0, random_state=11)
    half = len(january) // 2
    verdict = assess_window(january.iloc[:half], january.iloc[half:], spec, DriftPolicy())
    assert isinstance(verdict, DriftAssessment)
    return verdict


def test_summer_drifts_from_the_winter_reference(summer: WindowEvaluation) -> None:
    assessment = summer.assessment

    assert assessment.drifted
    assert {"temp", "atemp"} <= set(assessment.drifted_features)
    assert assessment.drift_share >= assessment.drift_share_threshold
    assert assessment.prediction_drifted
    temp = next(feature for feature in assessment.features if feature.name == "temp")
    assert temp.score > 3  # mean temp 0.20 in January, 0.76 in July: several reference stds


def test_january_against_january_does_not_drift(january_split: DriftAssessment) -> None:
    assert not january_split.drifted
    assert january_split.drifted_features == ()
    assert january_split.drift_share == 0.0


def test_columns_and_tests_come_from_the_declaration(
    summer: WindowEvaluation, spec: FeatureSpec, winter: pd.DataFrame, july: pd.DataFrame
) -> None:
    policy = DriftPolicy()
    features = summer.assessment.features
    # Thresholds are the reference's own, calibrated for the window's row count.
    baseline = calibrate(spec, winter, policy)

    assert tuple(feature.name for feature in features) == spec.monitored_features
    for feature in features:
        kind = spec.feature(feature.name).kind
        assert feature.kind is kind
        assert feature.stat_test == policy.stat_test(kind)
        assert feature.threshold == pytest.approx(baseline.threshold(feature.name, len(july)))
    assert "hr" not in {feature.name for feature in features}  # declared, not monitored
    categorical = next(feature for feature in features if feature.name == "weathersit")
    assert categorical.kind is FeatureKind.CATEGORICAL
    assert categorical.stat_test == "jensenshannon"


def test_drifted_share_agrees_with_evidently(summer: WindowEvaluation) -> None:
    report = summer.drift_snapshot.dict()
    counts = [
        metric["value"]
        for metric in report["metrics"]
        if "count" in metric["config"]["type"].lower()
    ]

    assert counts == [
        {
            "count": float(len(summer.assessment.drifted_features)),
            "share": summer.assessment.drift_share,
        }
    ]


def test_quality_is_measured_on_the_labelled_rows(
    summer: WindowEvaluation, july: pd.DataFrame
) -> None:
    quality = summer.assessment.quality

    assert summer.assessment.labelled_rows == july["bikers"].notna().sum()
    assert quality is not None
    assert quality.task is Task.REGRESSION
    assert quality.labelled_rows == summer.assessment.labelled_rows
    assert set(quality.metrics) == {"mean_error", "mae", "rmse", "r2"}
    labelled = july.dropna(subset=["bikers"])
    expected_mae = (labelled["prediction"] - labelled["bikers"]).abs().mean()
    assert quality.metrics["mae"] == pytest.approx(expected_mae)


def test_quality_waits_for_enough_labels(
    winter: pd.DataFrame, july: pd.DataFrame, spec: FeatureSpec
) -> None:
    policy = DriftPolicy(min_labelled_rows=len(july))

    verdict = assess_window(winter, july, spec, policy)

    assert isinstance(verdict, DriftAssessment)
    assert verdict.quality is None
    assert verdict.labelled_rows == july["bikers"].notna().sum()


def test_a_window_without_predictions_has_no_prediction_drift(
    winter: pd.DataFrame, july: pd.DataFrame, spec: FeatureSpec
) -> None:
    verdict = assess_window(winter.drop(columns="prediction"), july, spec, DriftPolicy())

    assert isinstance(verdict, DriftAssessment)
    assert verdict.prediction is None
    assert not verdict.prediction_drifted
    assert verdict.quality is not None  # the window's own labels and predictions still count


def test_a_feature_threshold_overrides_its_kind(
    winter: pd.DataFrame, july: pd.DataFrame, spec: FeatureSpec
) -> None:
    strict = DriftPolicy(feature_thresholds={"hum": 0.01})

    verdict = assess_window(winter, july, spec, strict)

    assert isinstance(verdict, DriftAssessment)
    hum = next(feature for feature in verdict.features if feature.name == "hum")
    assert hum.threshold == 0.01
    assert hum.drifted


def test_integer_categories_read_alike_from_any_source(seed: pd.DataFrame) -> None:
    spec = load_feature_spec("bikeshare")
    watched = spec.model_copy(
        update={"features": tuple(f.model_copy(update={"monitored": True}) for f in spec.features)}
    )
    reference = seed[seed["mnth"] == "Jan"]
    window = seed[seed["mnth"] == "Feb"]
    # Postgres JSON or a Parquet column with a missing value hands integers over as floats
    # or Python objects.
    mixed = window.assign(
        season=window["season"].astype(float), weekday=window["weekday"].astype(object)
    )

    plain = assess_window(reference, window, watched, DriftPolicy())
    converted = assess_window(reference, mixed, watched, DriftPolicy())

    assert isinstance(plain, DriftAssessment)
    assert plain == converted
    assert len(plain.features) == len(spec.features)


def test_too_few_rows_is_a_refusal(winter: pd.DataFrame, spec: FeatureSpec) -> None:
    verdict = assess_window(winter, winter.head(199), spec, DriftPolicy(min_rows=200))

    assert isinstance(verdict, WindowRefused)
    assert verdict.reason is RefusalReason.TOO_FEW_ROWS
    assert verdict.window_rows == 199
    assert "199" in verdict.detail


def test_a_small_reference_is_a_refusal(winter: pd.DataFrame, spec: FeatureSpec) -> None:
    verdict = assess_window(winter.head(10), winter, spec, DriftPolicy())

    assert isinstance(verdict, WindowRefused)
    assert verdict.reason is RefusalReason.TOO_FEW_REFERENCE_ROWS


def test_an_empty_window_is_a_refusal(winter: pd.DataFrame, spec: FeatureSpec) -> None:
    verdict = assess_window(winter, winter.iloc[0:0], spec, DriftPolicy())

    assert isinstance(verdict, WindowRefused)
    assert verdict.reason is RefusalReason.TOO_FEW_ROWS


def test_missing_columns_are_a_refusal(winter: pd.DataFrame, spec: FeatureSpec) -> None:
    verdict = assess_window(winter, winter.drop(columns=["temp", "hum"]), spec, DriftPolicy())

    assert isinstance(verdict, WindowRefused)
    assert verdict.reason is RefusalReason.MISSING_COLUMNS
    assert "temp, hum" in verdict.detail


def test_a_feature_without_values_is_a_refusal(winter: pd.DataFrame, spec: FeatureSpec) -> None:
    verdict = assess_window(winter, winter.assign(temp=np.nan), spec, DriftPolicy())

    assert isinstance(verdict, WindowRefused)
    assert verdict.reason is RefusalReason.NO_VALUES


def test_policy_refuses_p_value_tests() -> None:
    with pytest.raises(ValidationError, match="ks"):
        DriftPolicy(numeric_stat_test="ks")
    with pytest.raises(ValidationError, match="wasserstein"):
        DriftPolicy(categorical_stat_test="wasserstein")


def test_verdicts_round_trip_through_json(
    summer: WindowEvaluation, winter: pd.DataFrame, spec: FeatureSpec
) -> None:
    refused = assess_window(winter, winter.head(3), spec, DriftPolicy())
    adapter: TypeAdapter[WindowVerdict] = TypeAdapter(WindowVerdict)

    for verdict in (summer.assessment, refused):
        assert adapter.validate_json(adapter.dump_json(verdict)) == verdict


def test_assessment_becomes_a_drift_event(summer: WindowEvaluation) -> None:
    assessment = DriftAssessment.model_validate_json(summer.assessment.model_dump_json())
    start = datetime(2011, 7, 1, tzinfo=UTC)
    window = WindowBounds(start=start, end=start + timedelta(days=31))

    event = assessment.to_event(
        model_name="bikeshare",
        model_version=3,
        window=window,
        episode_id="drift-bikeshare-v3-20110702T000000.000000Z",
        report_uri="s3://driftloop-data/drift-reports/bikeshare/3/20110801T000000.000000Z.json",
    )
    decoded = DriftDetected.from_bytes(event.to_bytes())

    assert decoded == event
    assert decoded.drift_share == summer.assessment.drift_share
    assert decoded.drifted_features == summer.assessment.drifted_features
    assert decoded.prediction_drifted is True
    assert (decoded.window_start, decoded.window_end) == (window.start, window.end)
    assert decoded.window_rows == summer.assessment.window_rows
    assert decoded.episode_id == "drift-bikeshare-v3-20110702T000000.000000Z"


def test_window_bounds_from_timestamps() -> None:
    first = datetime(2011, 7, 1, tzinfo=UTC)
    frame = pd.DataFrame({"predicted_at": [first, first + timedelta(hours=5)]})

    open_end = window_bounds(frame, "predicted_at")
    fixed = window_bounds(frame, "predicted_at", end=first + timedelta(days=1))

    assert open_end.start == first
    assert open_end.end == first + timedelta(hours=5, microseconds=1)
    assert fixed.end == first + timedelta(days=1)
    with pytest.raises(ValidationError):
        WindowBounds(start=first, end=first)


def test_classification_quality_reads_probabilities() -> None:
    spec = FeatureSpec.model_validate(
        {
            "name": "churn",
            "description": "A binary classifier on two features.",
            "task": "classification",
            "registered_model_name": "churn",
            "target": {"name": "churned", "description": "1 when the customer left."},
            "features": [
                {"name": "tenure", "kind": "numeric", "dtype": "float", "description": "Years."},
                {
                    "name": "plan",
                    "kind": "categorical",
                    "dtype": "str",
                    "categories": ["basic", "pro"],
                    "description": "Subscription plan.",
                },
            ],
        }
    )
    rng = np.random.default_rng(5)
    rows = 400
    probability = rng.uniform(0, 1, rows)
    frame = pd.DataFrame(
        {
            "tenure": rng.normal(3, 1, rows),
            "plan": rng.choice(["basic", "pro"], rows),
            "prediction": probability,
            "churned": (rng.uniform(0, 1, rows) < probability).astype(float),
        }
    )

    verdict = assess_window(frame, frame.sample(frac=1.0, random_state=1), spec, DriftPolicy())

    assert isinstance(verdict, DriftAssessment)
    assert not verdict.drifted
    assert verdict.quality is not None
    assert verdict.quality.task is Task.CLASSIFICATION
    assert set(verdict.quality.metrics) == {"roc_auc", "log_loss", "brier", "accuracy", "f1"}
    assert 0.6 < verdict.quality.metrics["roc_auc"] <= 1.0
    # The holdout metrics are the retrain DAG's, computed by the same code on the same rows.
    labelled = frame.sample(frac=1.0, random_state=1)
    truth = labelled["churned"].to_numpy()
    for metric in ("roc_auc", "log_loss", "brier"):
        assert verdict.quality.metrics[metric] == pytest.approx(
            metric_value(metric, truth, labelled["prediction"].to_numpy()), rel=1e-12
        )
