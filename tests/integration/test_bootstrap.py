"""The first model on the real MLflow: registered, champion, reference readable, idempotent."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from driftloop.drift.assessment import DriftAssessment, assess_window
from driftloop.drift.policy import DriftPolicy
from driftloop.settings import MlflowSettings
from driftloop.training import bootstrap, trainer
from schemas.features import load_feature_spec


def test_bootstrap_registers_a_champion_with_its_reference(
    mlflow_settings: MlflowSettings, unique: str
) -> None:
    spec = load_feature_spec("bikeshare")
    uri = mlflow_settings.tracking_uri
    name = f"bootstrap-{unique}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        result = bootstrap.bootstrap_model(spec, tracking_uri=uri, model_name=name)

        assert bootstrap.current_champion(uri, name) == result.model.version
        run = client.get_run(result.model.run_id)
        assert run.data.metrics["holdout_rmse"] == pytest.approx(result.scores["rmse"])
        assert run.data.metrics["holdout_mae"] == pytest.approx(result.scores["mae"])
        assert run.data.params["since"] == "2011-01-01 00:00:00+00:00"
        assert run.data.params["until"] == "2011-04-01 00:00:00+00:00"
        assert run.data.params["promotion_metric"] == "rmse"
        artifacts = {item.path for item in client.list_artifacts(result.model.run_id)}
        # MLflow 3 stores the model itself as a LoggedModel, outside the run's artifacts.
        assert {trainer.FEATURE_SPEC_FILE, "reference"} <= artifacts

        reference = bootstrap.load_reference(uri, name, result.model.version)
        assert len(reference) == result.reference_rows
        assert {*spec.feature_names, "prediction", spec.target.name} <= set(reference.columns)
        # The drift monitor can judge a winter window against it.
        verdict = assess_window(
            reference, reference[reference["split"] == "holdout"], spec, DriftPolicy()
        )
        assert isinstance(verdict, DriftAssessment)
        assert verdict.quality is not None

        with pytest.raises(bootstrap.ChampionExistsError):
            bootstrap.bootstrap_model(spec, tracking_uri=uri, model_name=name)
        forced = bootstrap.bootstrap_model(spec, tracking_uri=uri, model_name=name, force=True)
        assert bootstrap.current_champion(uri, name) == forced.model.version
        assert forced.model.version == result.model.version + 1
    finally:
        client.delete_registered_model(name)


def test_no_champion_is_none(mlflow_settings: MlflowSettings, unique: str) -> None:
    assert bootstrap.current_champion(mlflow_settings.tracking_uri, f"absent-{unique}") is None
