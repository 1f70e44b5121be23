"""Training a model from its feature declaration: read, encode, fit, score, log, register, promote.

Ordinary functions: the first model (``driftloop.training.bootstrap``) and the retrain DAG
(``driftloop.training.retrain``) use them, the tests and the benchmarks call them directly. The
model is a native LightGBM ``Booster`` logged with the MLflow LightGBM flavour; the feature
declaration travels inside the model's artifacts, so whoever loads the model
(``driftloop.serving.champion``) can check it reads the inputs it was trained on.

Every registered version carries its **reference dataset**: the rows it was trained and held
out on, with the declared features, the model's ``prediction``, the target and a ``split``
column, as Parquet in its run's artifacts (``reference/reference.parquet``, named by the
version tag ``reference_artifact``). The drift monitor compares live windows against it and
the retrain DAG trains the next challenger on it; ``load_reference`` reads it back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import lightgbm as lgb
import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from driftloop.drift.baseline import BASELINE_ARTIFACT, DriftBaseline, calibrate
from driftloop.drift.baseline import SPLIT_COLUMN as SPLIT_COLUMN
from driftloop.drift.policy import DriftPolicy
from driftloop.seed_data import seed_data_path
from driftloop.training.metrics import HoldoutScores, holdout_scores
from schemas.features import FeatureKind, FeatureSpec, TargetType, Task

CHAMPION_ALIAS: Final = "champion"
# A challenger that passed the holdout and waits for live evidence (training.live.promotion).
CHALLENGER_ALIAS: Final = "challenger"
# The stand-alone pyfunc, logged as an MLflow model from code (see its docstring). Named by its
# path, not imported: importing it registers its model with MLflow's loader.
PYFUNC_CODE: Final = Path(__file__).resolve().parents[1] / "serving" / "declared_pyfunc.py"
# Its artifact names, and the booster's file (LightGBM's text format).
BOOSTER_ARTIFACT: Final = "booster"
DECLARATION_ARTIFACT: Final = "declaration"
PYFUNC_REFERENCE_ARTIFACT: Final = "reference"
BOOSTER_FILE: Final = "model.lgb"
# Name of the declaration file inside the model's artifacts (read by driftloop.serving.champion).
FEATURE_SPEC_FILE: Final = "feature_spec.yaml"
DEFAULT_EXPERIMENT: Final = "driftloop"
REFERENCE_ARTIFACT_DIR: Final = "reference"
REFERENCE_FILE: Final = "reference.parquet"
REFERENCE_ARTIFACT: Final = f"{REFERENCE_ARTIFACT_DIR}/{REFERENCE_FILE}"
# Model-version tag naming the reference artifact, so readers need not know the convention.
REFERENCE_TAG: Final = "reference_artifact"
# The drift monitor's prediction column (driftloop.drift.assessment.PREDICTION_COLUMN, checked
# equal by the unit tests); not imported from there because Evidently takes seconds to import.
PREDICTION_COLUMN: Final = "prediction"

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


Instant = datetime | str
"""A moment: a datetime (naive ones are UTC) or its ISO 8601 text (``"2011-01-01"``)."""


def read_dataset(
    spec: FeatureSpec,
    *,
    since: Instant | None = None,
    until: Instant | None = None,
    root: Path | None = None,
) -> pd.DataFrame:
    """The declaration's seed data in time order, optionally only the rows from ``since``
    (inclusive) to ``until`` (exclusive) by the dataset's time (``dataset.time``)."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    path = root / spec.dataset.path if root is not None else seed_data_path(spec.dataset.path)
    frame = pd.read_csv(path)
    if spec.dataset.time is not None:
        times = dataset_times(spec, frame)
        chosen = pd.Series(True, index=frame.index)
        if since is not None:
            chosen &= times >= _timestamp(since)
        if until is not None:
            chosen &= times < _timestamp(until)
        # In time order; rows of the same moment keep their order in the file.
        frame = frame[chosen].iloc[np.argsort(times[chosen].to_numpy(), kind="stable")]
    elif since is not None or until is not None:
        raise ValueError(f"{spec.name} declares no time column: rows cannot be chosen by time")
    elif spec.dataset.order_by:
        frame = frame.sort_values(list(spec.dataset.order_by), kind="stable")
    return frame.reset_index(drop=True)


def dataset_times(spec: FeatureSpec, frame: pd.DataFrame) -> pd.Series:
    """When each row of seed data happened (UTC), from the declaration's ``dataset.time``."""
    time = spec.dataset.time if spec.dataset is not None else None
    if time is None:
        raise ValueError(f"{spec.name} declares no time column")
    missing = [column for column in time.columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{spec.name}: the data lacks the time columns {missing}")
    if time.column is not None:
        return pd.to_datetime(frame[time.column], utc=True)
    assert time.origin is not None  # noqa: S101 - TimeSpec's validator guarantees it
    offset = pd.Series(pd.Timedelta(0), index=frame.index)
    for column, step in time.offsets.items():
        offset += pd.to_numeric(frame[column], errors="raise") * pd.Timedelta(step)
    return pd.Timestamp(time.origin) + offset


def _timestamp(moment: Instant) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


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
    """The true values of the declared target as the model learns them: the numbers, or 1.0 for
    the positive class and 0.0 for the other (``Target.encode``)."""
    column = frame[spec.target.name]
    if spec.target.type is TargetType.NUMERIC:
        target: npt.NDArray[np.float64] = pd.to_numeric(column, errors="raise").to_numpy(
            dtype=np.float64
        )
    else:
        target = np.array([spec.target.encode(value) for value in column.tolist()])
    if spec.task is Task.CLASSIFICATION and not np.isin(target, (0.0, 1.0)).all():
        found = sorted({float(value) for value in target[~np.isin(target, (0.0, 1.0))]})[:5]
        raise ValueError(f"a classification target is 0 or 1; {spec.target.name} has {found}")
    return target


def train_booster(
    spec: FeatureSpec,
    frame: pd.DataFrame,
    *,
    num_boost_round: int = 200,
    params: Mapping[str, Any] | None = None,
    weights: npt.NDArray[np.float64] | None = None,
) -> lgb.Booster:
    """Fit a LightGBM model on the declared features and target of ``frame``, each row
    weighted by ``weights`` when given (``driftloop.training.history``)."""
    objective = "regression" if spec.task is Task.REGRESSION else "binary"
    if weights is not None and len(weights) != len(frame):
        raise ValueError(f"{len(weights)} weights for {len(frame)} rows")
    dataset = lgb.Dataset(
        feature_matrix(spec, frame),
        label=target_vector(spec, frame),
        weight=weights,
        feature_name=list(spec.feature_names),
        categorical_feature=list(spec.categorical_positions),
        free_raw_data=True,
    )
    options = {"objective": objective, **DEFAULT_PARAMS, **(params or {})}
    return lgb.train(options, dataset, num_boost_round=num_boost_round)


def feature_spec_document(spec: FeatureSpec) -> str:
    """The declaration as YAML, as stored beside the model."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)


def model_artifacts(
    booster: lgb.Booster, spec: FeatureSpec, staging: Path, reference: Path | None = None
) -> dict[str, str]:
    """Write the pyfunc's artifacts into ``staging``: the booster as LightGBM text, the
    declaration, and the reference dataset when given (``driftloop.serving.declared_pyfunc``)."""
    staging.mkdir(parents=True, exist_ok=True)
    booster_path = staging / BOOSTER_FILE
    booster.save_model(str(booster_path))
    spec_path = staging / FEATURE_SPEC_FILE
    spec_path.write_text(feature_spec_document(spec), encoding="utf-8")
    artifacts = {BOOSTER_ARTIFACT: str(booster_path), DECLARATION_ARTIFACT: str(spec_path)}
    if reference is not None:
        artifacts[PYFUNC_REFERENCE_ARTIFACT] = str(reference)
    return artifacts


def save_model(booster: lgb.Booster, spec: FeatureSpec, directory: Path) -> Path:
    """Write the model as ``log_and_register`` stores it (the declared pyfunc, its artifacts)."""
    with tempfile.TemporaryDirectory(prefix="driftloop-model-") as staging:
        mlflow.pyfunc.save_model(
            str(directory),
            python_model=str(PYFUNC_CODE),
            artifacts=model_artifacts(booster, spec, Path(staging)),
            signature=model_signature(spec),
            pip_requirements=pyfunc_requirements(),
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
    reference: pd.DataFrame | None = None,
    run_name: str | None = None,
    run_tags: Mapping[str, str] | None = None,
    version_tags: Mapping[str, str] | None = None,
    drift_policy: DriftPolicy | None = None,
    work_dir: Path,
) -> RegisteredModel:
    """Log the booster (LightGBM flavour, declaration inside) in a new run and register it.

    The run gets ``params``, ``metrics``, ``run_tags``, the declaration and, when given, the
    ``reference`` dataset with its drift baseline (thresholds calibrated on it under
    ``drift_policy``, ``driftloop.drift.baseline``). The version is created last, with
    ``version_tags`` (and the reference's tag) in the same call: a registered version is
    always complete, so a caller that finds one by its tags can rely on it.
    """
    name = model_name or spec.registered_model_name
    spec_path = work_dir / FEATURE_SPEC_FILE
    spec_path.write_text(feature_spec_document(spec), encoding="utf-8")
    tags = dict(version_tags or {})
    reference_path: Path | None = None
    baseline_path: Path | None = None
    if reference is not None:
        reference_dir = work_dir / REFERENCE_ARTIFACT_DIR
        reference_dir.mkdir(exist_ok=True)
        reference_path = reference_dir / REFERENCE_FILE
        reference.to_parquet(reference_path, index=False)
        tags[REFERENCE_TAG] = REFERENCE_ARTIFACT
        # Thresholds are the version's own: calibrated on its reference before it can serve.
        baseline_path = work_dir / Path(BASELINE_ARTIFACT).name
        baseline_path.write_bytes(
            calibrate(spec, reference, drift_policy or DriftPolicy()).to_json()
        )
    # The fluent API is the only way to log a model; its tracking URI is process-global and
    # mirrored into MLFLOW_TRACKING_URI (inherited by subprocesses), so both are restored
    # afterwards; None unsets the variable again when it was not set.
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name, tags=dict(run_tags or {})) as run:
            if params:
                mlflow.log_params(dict(params))
            if metrics:
                mlflow.log_metrics(dict(metrics))
            mlflow.log_artifact(str(spec_path))
            if reference_path is not None:
                mlflow.log_artifact(str(reference_path), REFERENCE_ARTIFACT_DIR)
            if baseline_path is not None:
                mlflow.log_artifact(str(baseline_path), str(Path(BASELINE_ARTIFACT).parent))
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts=model_artifacts(
                    booster, spec, work_dir / "model-artifacts", reference_path
                ),
                signature=model_signature(spec),
                # Explicit requirements: inferring them imports the model in a subprocess.
                pip_requirements=pyfunc_requirements(),
            )
            version = mlflow.register_model(info.model_uri, name, tags=tags or None)
    finally:
        mlflow.set_tracking_uri(previous_uri)  # type: ignore[arg-type]  # None: unset
    return RegisteredModel(name=name, version=int(version.version), run_id=run.info.run_id)


def model_signature(spec: FeatureSpec) -> ModelSignature:
    """The declared raw row as MLflow records it, and one double out (a classifier's: the
    positive class's probability). String categories are strings; ints are longs, except
    where a value may be missing (pandas holds those as floats, NaN for null)."""
    columns: list[ColSpec | TensorSpec] = []
    for feature in spec.features:
        if feature.dtype == "str":
            kind = DataType.string
        elif feature.dtype == "int" and not feature.nullable:
            kind = DataType.long
        else:
            kind = DataType.double
        columns.append(ColSpec(kind, feature.name, required=not feature.nullable))
    return ModelSignature(inputs=Schema(columns), outputs=Schema([ColSpec(DataType.double)]))


def pyfunc_requirements() -> list[str]:
    """What the stand-alone model imports, pinned to the versions it was trained with."""
    return [
        f"lightgbm=={lgb.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pyyaml=={yaml.__version__}",
    ]


def train_champion(
    spec: FeatureSpec,
    frame: pd.DataFrame,
    *,
    tracking_uri: str,
    model_name: str,
    work_dir: Path,
    num_boost_round: int = 200,
    params: Mapping[str, Any] | None = None,
) -> RegisteredModel:
    """Train on ``frame``, register the model and point its ``champion`` alias at it.

    A serving model in one call, for the benchmarks and the tests; the bootstrap logs its
    scores and reference with ``log_and_register`` itself.
    """
    booster = train_booster(spec, frame, num_boost_round=num_boost_round, params=params)
    model = log_and_register(
        booster, spec, tracking_uri=tracking_uri, model_name=model_name, work_dir=work_dir
    )
    set_champion(model, tracking_uri=tracking_uri)
    return model


def set_champion(model: RegisteredModel, *, tracking_uri: str) -> None:
    """Point the registered model's ``champion`` alias at this version."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(model.name, CHAMPION_ALIAS, str(model.version))


def current_champion(tracking_uri: str, model_name: str) -> int | None:
    """The version the ``champion`` alias points at, or None when there is none."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise
    return int(version.version)


def score_holdout(
    spec: FeatureSpec, truth: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
) -> HoldoutScores:
    """Every metric of the model's task on the holdout (``driftloop.training.metrics``)."""
    return holdout_scores(spec.task, truth, predicted)


def reference_frame(
    spec: FeatureSpec,
    parts: Sequence[tuple[str, pd.DataFrame]],
    booster: lgb.Booster,
    *,
    leading_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """``leading_columns`` (e.g. time columns), the features, the model's ``prediction``, the
    target and each row's split, for each ``(split, rows)`` part in turn."""
    columns = [*leading_columns, *spec.feature_names]
    frames = []
    for split, part in parts:
        predictions = np.asarray(booster.predict(feature_matrix(spec, part)))
        reference = part[columns].copy()
        reference[PREDICTION_COLUMN] = predictions.astype(np.float64)
        reference[spec.target.name] = target_vector(spec, part)
        reference[SPLIT_COLUMN] = split
        frames.append(reference)
    return pd.concat(frames, ignore_index=True)


def load_reference(tracking_uri: str, model_name: str, version: int) -> pd.DataFrame:
    """The reference dataset logged with a model version (features, prediction, target)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    model_version = client.get_model_version(model_name, str(version))
    if model_version.run_id is None:
        raise LookupError(f"{model_name} version {version} has no run")
    artifact = model_version.tags.get(REFERENCE_TAG, REFERENCE_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="driftloop-reference-") as work:
        local = mlflow.artifacts.download_artifacts(
            run_id=model_version.run_id,
            artifact_path=artifact,
            dst_path=work,
            tracking_uri=tracking_uri,
        )
        return pd.read_parquet(local)


def load_baseline(tracking_uri: str, model_name: str, version: int) -> DriftBaseline | None:
    """The drift baseline logged with a model version; None for a version registered without
    one (before baselines existed, or without a reference)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = client.get_model_version(model_name, str(version)).run_id
    if run_id is None:
        raise LookupError(f"{model_name} version {version} has no run")
    listed = {
        item.path for item in client.list_artifacts(run_id, str(Path(BASELINE_ARTIFACT).parent))
    }
    if BASELINE_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="driftloop-baseline-") as work:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=BASELINE_ARTIFACT, dst_path=work, tracking_uri=tracking_uri
        )
        return DriftBaseline.model_validate_json(Path(local).read_bytes())
