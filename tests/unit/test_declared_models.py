"""Models by configuration only: the shipped breast-cancer classifier, and a third model declared
at test time with data the test generates, both trained and registered by the unchanged code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from driftloop.training import bootstrap, trainer
from schemas.features import FeatureSpec, Metric, TargetType, Task, load_feature_spec
from tests.unit.churn_declaration import CHURN_FEATURES

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

SUBSCRIPTIONS_YAML = """
name: subscriptions
description: Probability that a subscriber renews, declared by a test.
task: classification
registered_model_name: subscriptions
target:
  name: renewed
  type: categorical
  positive: "Yes"
  categories: ["No", "Yes"]
  description: Whether the subscriber renewed, Yes or No.
training:
  promotion_metric: roc_auc
  since: 2025-01-01T00:00:00Z
  until: 2025-05-01T00:00:00Z
  holdout: P14D
dataset:
  path: {path}
  time:
    column: signed_up_at
"""


def subscriptions_data(rows: int, seed: int) -> pd.DataFrame:
    """Subscribers from January to June 2025, in shuffled order; renewal depends on all three
    features, so a model can learn it."""
    rng = np.random.default_rng(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    signed_up = [start + timedelta(minutes=int(m)) for m in rng.integers(0, 181 * 24 * 60, rows)]
    tenure = rng.integers(0, 48, rows)
    plan = rng.choice(["basic", "plus", "family"], rows)
    spend = rng.gamma(2.0, 15.0, rows)
    logit = -1.0 + 0.08 * tenure + np.where(plan == "family", 1.5, 0.0) - 0.02 * spend
    renewed = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(
        {
            "signed_up_at": [moment.isoformat() for moment in signed_up],
            "tenure_months": tenure,
            "plan": plan,
            "monthly_spend": np.where(rng.random(rows) < 0.05, np.nan, spend.round(2)),
            "renewed": np.where(renewed, "Yes", "No"),
        }
    )
    return frame


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
