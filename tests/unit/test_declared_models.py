"""Models by configuration only: the shipped breast-cancer classifier, and a third model declared
at test time with data the test generates, both trained and registered by the unchanged code."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from driftloop.training import bootstrap, trainer
from schemas.features import FeatureSpec, Metric, TargetType, Task, load_feature_spec
from tests.unit.churn_declaration import CHURN_FEATURES, SUBSCRIPTIONS_YAML, subscriptions_data

pytestmark = pytest.mark.unit


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A throw-away sqlite registry whose artifacts stay in tmp_path (not ./mlruns)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment(
        trainer.DEFAULT_EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri()
    )
    return uri


def test_breast_cancer_is_a_declared_classifier() -> None:
    spec = load_feature_spec("breast_cancer")

    assert spec.task is Task.CLASSIFICATION
    assert spec.target.type is TargetType.CATEGORICAL
    assert spec.target.positive == "malignant"
    assert spec.promotion_metric is Metric.LOG_LOSS
    assert spec.dataset is not None
    assert spec.dataset.time is None
    assert len(spec.features) == 30
    frame = trainer.read_dataset(spec)
    assert len(frame) == 569
    # The positive class is malignant: 212 of the rows.
    assert trainer.target_vector(spec, frame).sum() == 212


def test_breast_cancer_bootstraps_with_classification_metrics(tracking_uri: str) -> None:
    spec = load_feature_spec("breast_cancer")

    result = bootstrap.bootstrap_model(
        spec, tracking_uri=tracking_uri, model_name="breast-cancer-unit", num_boost_round=50
    )

    assert bootstrap.current_champion(tracking_uri, "breast-cancer-unit") == result.model.version
    assert list(result.scores.values) == [Metric.LOG_LOSS, Metric.ROC_AUC, Metric.BRIER]
    # Seeded random holdout: 20 % of 569 rows, rounded up.
    assert result.scores.rows == 114
    assert result.training_rows == 455
    assert result.scores["roc_auc"] > 0.95
    assert result.scores["log_loss"] < 0.3
    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.model.run_id)
    assert run.data.metrics["holdout_brier"] == pytest.approx(result.scores["brier"])
    event = bootstrap.promotion_event(result)
    assert (event.metric_name, event.greater_is_better) == ("log_loss", False)
    assert event.challenger_score == pytest.approx(result.scores["log_loss"])
    reference = bootstrap.load_reference(tracking_uri, "breast-cancer-unit", result.model.version)
    # The reference holds the target as the model learnt it, and probabilities.
    assert set(reference["diagnosis"]) == {0.0, 1.0}
    assert reference["prediction"].between(0, 1).all()


# --- a third model, declared and generated here -------------------------------------------------


@pytest.fixture
def subscriptions(tmp_path: Path) -> FeatureSpec:
    data = tmp_path / "subscriptions.csv"
    subscriptions_data(3000, seed=11).to_csv(data, index=False)
    declaration = tmp_path / "subscriptions.yaml"
    declaration.write_text(SUBSCRIPTIONS_YAML.format(path=data) + CHURN_FEATURES, encoding="utf-8")
    return load_feature_spec(declaration)


def test_a_model_declared_at_test_time_reads_its_rows_by_time(subscriptions: FeatureSpec) -> None:
    window = trainer.read_dataset(
        subscriptions, since=subscriptions.training.since, until=subscriptions.training.until
    )
    times = trainer.dataset_times(subscriptions, window)

    assert times.is_monotonic_increasing
    assert times.min() >= pd.Timestamp("2025-01-01T00:00Z")
    assert times.max() < pd.Timestamp("2025-05-01T00:00Z")
    train, holdout = bootstrap.split_holdout(subscriptions, window)
    holdout_times = trainer.dataset_times(subscriptions, holdout)
    assert holdout_times.min() > times.max() - pd.Timedelta(days=14)
    assert trainer.dataset_times(subscriptions, train).max() <= holdout_times.min()


def test_a_model_declared_at_test_time_bootstraps_with_no_code_change(
    subscriptions: FeatureSpec, tracking_uri: str
) -> None:
    result = bootstrap.bootstrap_model(subscriptions, tracking_uri=tracking_uri, num_boost_round=60)

    assert result.model.name == "subscriptions"
    assert bootstrap.current_champion(tracking_uri, "subscriptions") == result.model.version
    # January to April of the six generated months: about two thirds of the rows.
    assert 1800 < result.training_rows + result.scores.rows < 2200
    assert result.scores["roc_auc"] > 0.75
    event = bootstrap.promotion_event(result)
    assert (event.metric_name, event.greater_is_better) == ("roc_auc", True)
    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.model.run_id)
    assert run.data.params["promotion_metric"] == "roc_auc"
    assert {"holdout_log_loss", "holdout_roc_auc", "holdout_brier"} <= set(run.data.metrics)
    registered = yaml.safe_load(
        Path(
            MlflowClient(tracking_uri=tracking_uri).download_artifacts(
                result.model.run_id, trainer.FEATURE_SPEC_FILE
            )
        ).read_text()
    )
    assert FeatureSpec.model_validate(registered) == subscriptions


def test_an_explicit_selection_overrides_the_declared_one(
    subscriptions: FeatureSpec, tracking_uri: str
) -> None:
    result = bootstrap.bootstrap_model(
        subscriptions,
        tracking_uri=tracking_uri,
        since="2025-03-01",
        until="2025-07-01",
        num_boost_round=20,
    )

    run = MlflowClient(tracking_uri=tracking_uri).get_run(result.model.run_id)
    assert run.data.params["since"] == "2025-03-01"
    # March to June: about two thirds of the rows again, but other ones.
    reference = bootstrap.load_reference(tracking_uri, "subscriptions", result.model.version)
    assert pd.to_datetime(reference["signed_up_at"], utc=True).min() >= pd.Timestamp(
        "2025-03-01T00:00Z"
    )
