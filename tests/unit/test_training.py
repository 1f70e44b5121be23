"""Training functions: the bikeshare seed data, its encoding, a fitted model, MLflow logging."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from driftloop.drift.policy import DriftPolicy
from driftloop.training import trainer
from schemas.features import FeatureSpec, load_feature_spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A throw-away sqlite registry whose artifacts stay in tmp_path (not ./mlruns)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment(
        trainer.DEFAULT_EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri()
    )
    return uri


def test_reads_the_seed_data_in_time_order(spec: FeatureSpec) -> None:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01")

    assert set(frame["mnth"]) == {"Jan"}
    assert list(frame["day"]) == sorted(frame["day"])
    assert len(frame) > 600


def test_feature_matrix_follows_the_declaration(spec: FeatureSpec) -> None:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01").head(3)

    matrix = trainer.feature_matrix(spec, frame)

    assert matrix.shape == (3, len(spec.features))
    first = frame.iloc[0]
    row = {name: first[name] for name in spec.feature_names}
    row["hr"] = int(row["hr"])
    expected = spec.encode_row(spec.validate_row({k: _plain(v) for k, v in row.items()}))
    np.testing.assert_allclose(matrix[0], expected)


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


def test_feature_matrix_refuses_unknown_categories(spec: FeatureSpec) -> None:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01").head(2).copy()
    frame.loc[0, "mnth"] = "Smarch"

    with pytest.raises(ValueError, match="mnth"):
        trainer.feature_matrix(spec, frame)


def test_missing_values_become_nan(spec: FeatureSpec) -> None:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01").head(2).copy()
    frame.loc[0, "temp"] = None
    frame.loc[1, "weathersit"] = None

    matrix = trainer.feature_matrix(spec, frame)

    assert np.isnan(matrix[0, spec.feature_names.index("temp")])
    assert np.isnan(matrix[1, spec.feature_names.index("weathersit")])


def test_trained_model_beats_the_mean(spec: FeatureSpec) -> None:
    train = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    holdout = trainer.read_dataset(spec, since="2011-03-01", until="2011-04-01")

    booster = trainer.train_booster(spec, train, num_boost_round=60)

    truth = trainer.target_vector(spec, holdout)
    predicted = booster.predict(trainer.feature_matrix(spec, holdout))
    model_rmse = float(np.sqrt(np.mean((predicted - truth) ** 2)))
    mean_rmse = float(np.sqrt(np.mean((truth.mean() - truth) ** 2)))
    assert model_rmse < 0.8 * mean_rmse
    assert booster.num_feature() == len(spec.features)


def test_logs_registers_and_promotes(spec: FeatureSpec, tmp_path: Path, tracking_uri: str) -> None:
    booster = trainer.train_booster(
        spec, trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01"), num_boost_round=5
    )

    model = trainer.log_and_register(
        booster,
        spec,
        tracking_uri=tracking_uri,
        model_name="bikeshare-unit",
        metrics={"rmse": 1.0},
        work_dir=tmp_path,
    )
    trainer.set_champion(model, tracking_uri=tracking_uri)

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    champion = client.get_model_version_by_alias("bikeshare-unit", trainer.CHAMPION_ALIAS)
    assert (int(champion.version), champion.run_id) == (model.version, model.run_id)
    logged = yaml.safe_load(
        Path(
            client.download_artifacts(model.run_id, trainer.FEATURE_SPEC_FILE, str(tmp_path))
        ).read_text()
    )
    assert FeatureSpec.model_validate(logged) == spec


def test_a_version_with_a_reference_carries_its_drift_baseline(
    spec: FeatureSpec, tmp_path: Path, tracking_uri: str
) -> None:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    (tmp_path / "bare").mkdir()
    booster = trainer.train_booster(spec, frame, num_boost_round=5)
    reference = trainer.reference_frame(spec, [("train", frame)], booster)

    with_reference = trainer.log_and_register(
        booster,
        spec,
        tracking_uri=tracking_uri,
        model_name="bikeshare-unit-baseline",
        reference=reference,
        work_dir=tmp_path,
    )
    without = trainer.log_and_register(
        booster,
        spec,
        tracking_uri=tracking_uri,
        model_name="bikeshare-unit-baseline",
        work_dir=tmp_path / "bare",
    )

    baseline = trainer.load_baseline(
        tracking_uri, "bikeshare-unit-baseline", with_reference.version
    )
    assert baseline is not None
    assert baseline.reference_rows == len(reference)
    assert baseline.features == spec.monitored_features
    assert baseline.follows(DriftPolicy())
    assert trainer.load_baseline(tracking_uri, "bikeshare-unit-baseline", without.version) is None


def test_saved_model_is_the_declared_pyfunc(spec: FeatureSpec, tmp_path: Path) -> None:
    booster = trainer.train_booster(
        spec, trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01"), num_boost_round=3
    )

    directory = trainer.save_model(booster, spec, tmp_path / "model")

    flavor = yaml.safe_load((directory / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (directory / "artifacts" / trainer.BOOSTER_FILE).is_file()
    assert (directory / "artifacts" / trainer.FEATURE_SPEC_FILE).is_file()
    # The model's code is in the model: serving it needs no driftloop.
    assert (directory / trainer.PYFUNC_CODE.name).is_file()


def test_logging_leaves_the_process_tracking_uri_alone(
    spec: FeatureSpec, tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    booster = trainer.train_booster(
        spec, trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01"), num_boost_round=2
    )

    trainer.log_and_register(
        booster,
        spec,
        tracking_uri=tracking_uri,
        model_name="bikeshare-unit-env",
        work_dir=tmp_path,
    )

    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_signature_lists_every_declared_feature_in_order() -> None:
    spec = load_feature_spec("bikeshare")
    signature = trainer.model_signature(spec)
    assert signature.inputs.input_names() == list(spec.feature_names)
    types = {column.name: column.type.name for column in signature.inputs.inputs}
    # The raw row: string categories as strings, ints as longs, nullable numbers as doubles.
    assert types["mnth"] == "string"
    assert types["season"] == "long"
    assert types["hr"] == "long"
    assert types["temp"] == "double"
    required = {column.name: column.required for column in signature.inputs.inputs}
    assert not required["weathersit"]
    assert required["mnth"]
