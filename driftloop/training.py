"""Training a model from its feature declaration: read, encode, fit, log, register, promote.

Ordinary functions: the retrain DAG wires them into tasks, the tests and the benchmarks call
them directly. The model is a native LightGBM ``Booster`` logged with the MLflow LightGBM
flavour; the feature declaration travels inside the model's artifacts, so whoever loads the
model (``driftloop.champion``) can check it reads the inputs it was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lightgbm as lgb
import mlflow
import mlflow.lightgbm
import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema

from schemas.features import FeatureKind, FeatureSpec, Task

REPOSITORY_ROOT: Final = Path(__file__).resolve().parent.parent
CHAMPION_ALIAS: Final = "champion"
# Name of the declaration file inside the model's artifacts (read by driftloop.champion).
FEATURE_SPEC_FILE: Final = "feature_spec.yaml"
DEFAULT_EXPERIMENT: Final = "driftloop"

DEFAULT_PARAMS: Final[Mapping[str, Any]] = {
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "seed": 7,
    "deterministic": True,
    "verbosity": -1,
}


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A model version in the MLflow registry and the run that produced it."""

    name: str
    version: int
    run_id: str


def read_dataset(
    spec: FeatureSpec, *, months: Collection[str] | None = None, root: Path = REPOSITORY_ROOT
) -> pd.DataFrame:
    """The declaration's seed data in time order, optionally only some months (``mnth``)."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    frame = pd.read_csv(root / spec.dataset.path)
    if months is not None:
        frame = frame[frame["mnth"].isin(list(months))]
    ordered = frame.sort_values(list(spec.dataset.order_by), kind="stable")
    return ordered.reset_index(drop=True)


def feature_matrix(spec: FeatureSpec, frame: pd.DataFrame) -> npt.NDArray[np.float64]:
    """The model's input: declared order, category codes, NaN for missing values."""
    columns: list[npt.NDArray[np.float64]] = []
    for feature in spec.features:
        values = frame[feature.name]
        if feature.kind is FeatureKind.CATEGORICAL:
            if feature.dtype == "int":
                values = pd.to_numeric(values, errors="raise")
            codes = values.map(feature.category_codes)
            unknown = codes.isna() & values.notna()
            if unknown.any():
                found = sorted({str(value) for value in values[unknown]})
                raise ValueError(f"{feature.name}: values outside the categories: {found}")
            columns.append(np.asarray(codes.to_numpy(dtype=np.float64, na_value=np.nan)))
        else:
            numbers = pd.to_numeric(values, errors="raise")
            columns.append(numbers.to_numpy(dtype=np.float64, na_value=np.nan))
    matrix: npt.NDArray[np.float64] = np.column_stack(columns)
    return matrix


def target_vector(spec: FeatureSpec, frame: pd.DataFrame) -> npt.NDArray[np.float64]:
    """The true values of the declared target."""
    target: npt.NDArray[np.float64] = pd.to_numeric(
        frame[spec.target.name], errors="raise"
    ).to_numpy(dtype=np.float64)
    return target


def train_booster(
    spec: FeatureSpec,
    frame: pd.DataFrame,
    *,
    num_boost_round: int = 200,
    params: Mapping[str, Any] | None = None,
) -> lgb.Booster:
    """Fit a LightGBM model on the declared features and target of ``frame``."""
    objective = "regression" if spec.task is Task.REGRESSION else "binary"
    dataset = lgb.Dataset(
        feature_matrix(spec, frame),
        label=target_vector(spec, frame),
        feature_name=list(spec.feature_names),
        categorical_feature=list(spec.categorical_positions),
        free_raw_data=True,
    )
    options = {"objective": objective, **DEFAULT_PARAMS, **(params or {})}
    return lgb.train(options, dataset, num_boost_round=num_boost_round)


def feature_spec_document(spec: FeatureSpec) -> str:
    """The declaration as YAML, as stored beside the model."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)


def save_model(booster: lgb.Booster, spec: FeatureSpec, directory: Path) -> Path:
    """Write the model as ``log_and_register`` stores it (LightGBM flavour, declaration inside)."""
    staging = directory.parent / f".{directory.name}-spec"
    staging.mkdir(parents=True, exist_ok=True)
    spec_path = staging / FEATURE_SPEC_FILE
    spec_path.write_text(feature_spec_document(spec), encoding="utf-8")
    mlflow.lightgbm.save_model(
        booster,
        str(directory),
        extra_files=[str(spec_path)],
        pip_requirements=[f"lightgbm=={lgb.__version__}"],
    )
    return directory


def log_and_register(
    booster: lgb.Booster,
    spec: FeatureSpec,
    *,
    tracking_uri: str,
    model_name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    work_dir: Path,
) -> RegisteredModel:
    """Log the booster (LightGBM flavour, declaration inside) in a new run and register it."""
    name = model_name or spec.registered_model_name
    spec_path = work_dir / FEATURE_SPEC_FILE
    spec_path.write_text(feature_spec_document(spec), encoding="utf-8")
    # The fluent API is the only way to log a model; its tracking URI is process-global and
    # mirrored into MLFLOW_TRACKING_URI (inherited by subprocesses), so both are restored
    # afterwards; None unsets the variable again when it was not set.
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment)
        with mlflow.start_run() as run:
            if params:
                mlflow.log_params(dict(params))
            if metrics:
                mlflow.log_metrics(dict(metrics))
            mlflow.log_artifact(str(spec_path))
            info = mlflow.lightgbm.log_model(
                booster,
                name="model",
                registered_model_name=name,
                signature=model_signature(spec),
                extra_files=[str(spec_path)],
                # Explicit requirements: inferring them imports the model in a subprocess.
                pip_requirements=[f"lightgbm=={lgb.__version__}"],
            )
    finally:
        mlflow.set_tracking_uri(previous_uri)  # type: ignore[arg-type]  # None: unset
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow did not register {name}")
    return RegisteredModel(name=name, version=int(version), run_id=run.info.run_id)


def model_signature(spec: FeatureSpec) -> ModelSignature:
    """The booster's input as MLflow records it: one double per feature, in declared order
    (categories as their codes, NaN for missing), and one double out."""
    inputs = Schema([ColSpec(DataType.double, name) for name in spec.feature_names])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.double)]))


def set_champion(model: RegisteredModel, *, tracking_uri: str) -> None:
    """Point the registered model's ``champion`` alias at this version."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(model.name, CHAMPION_ALIAS, str(model.version))
