"""Retraining a drifted model: extract, train a challenger, judge it against the champion, decide.

The ``retrain_model`` DAG (``dags/retrain_model.py``) runs one step per task; each step is an
ordinary function here, with a typed result small enough for XCom.

**The data** (``extract_step``):

- *recent rows*: the labelled rows of the prediction log (``prediction_log`` joined with
  ``labels`` in the run's Postgres schema; the days the hot store has dropped from the Parquet
  lake, ``driftloop.storage.lake.training_rows``) served by the champion version named in the run's
  conf (``model_version``; for a manual run, the current champion), predicted up to the run's
  time (Airflow's ``run_after``, so a retried task reads the same rows), the newest
  ``max_recent_rows`` of them, in ``predicted_at`` order. Rows whose features no longer pass
  the model's declaration are left out and counted. Fewer than ``min_labelled_rows`` fails the
  run at once ("too few labels"): the champion stays.
- *holdout*: the newest ``holdout_fraction`` of the recent rows (rounded up, at least
  ``min_holdout_rows``), cut in time order and never shuffled: hourly traffic is
  autocorrelated, so a random holdout would flatter both models.
- *training set*: the champion's reference dataset (its own training and holdout rows: the
  features and the target) plus the recent rows older than the holdout, of which the model's
  training-data policy keeps its share (``FeatureSpec.training_data``,
  ``driftloop.training.history``): all of them, those of the last N days, or all of them
  weighted by a half-life. Ages count back from the holdout's newest row in prediction time;
  seed rows are dated by the dataset's time columns the reference carries. By default a model
  learns as much history as its first version did (bikeshare: 90 days), measured against all
  history and half-lives on the demo replay (``bench/loop_value.py``): all history dilutes
  each season into the ones before it, and the reference built from it stops seeing drift.

The champion (alias ``champion``) and the challenger are both loaded from the registry and
scored on that same holdout with every metric of the task (all logged to the challenger's
run); the one that decides is the model's declared promotion metric (``policy.holdout_metric``:
``training.promotion_metric``, by default RMSE for regression and log loss for
classification). The promotion rule and its margin are in ``driftloop.training.policy``.

The holdout of recent rows is cut by prediction time even for a model whose seed data has no
time column: logged traffic always has one, and the challenger must do well on the newest.

**Safety** (``decide_step``): the ``champion`` alias moves only when the challenger meets the
margin *and* the alias still points at the champion that was evaluated (MLflow has no
compare-and-set; the DAG allows one active run, so only a person or another tool could move it
in between, and that is rejected with its reason). The version is tagged with the decision
(``driftloop.decision``, ``driftloop.decision_reason``, the scores) after the alias moved, and
``ModelPromoted``/``ModelRejected`` is published last, waiting for the broker's
acknowledgement. Every step can be retried: ``train_step`` reuses the version already
registered for the DAG run (version tag ``driftloop.dag_run_id``); ``decide_step`` finding the
alias already on its challenger only re-tags and publishes again (at least once: the event id
is derived from model, version and outcome, so a repeat is recognisable). MLflow down at any
point leaves the alias where it was, or already moved with a retry still to publish.

**Live evidence**: a model declared ``training.live.promotion: shadow`` gets the alias
``challenger`` moved instead of ``champion`` (``ChallengerShadowed``): the shadow-scorer scores
it on live traffic and ``driftloop.training.live_judge`` promotes or rejects it there, under
the same rules; the judge also rolls back any promotion that loses on its first live labelled
rows.

**Work objects**: the training set, the holdout and the feature declaration are written as
``retraining/<model>/<dag run id>/`` in the data bucket (``driftloop.training.workspace``), read by
the later tasks, and deleted by the DAG's last task once the decision is published. A failed
run keeps them for inspection (a few MB; clearing its tasks re-runs it on the same data).

The challenger's reference dataset (logged like the first model's, so the drift monitor and the
next retraining find it) is its own training data: the rows the policy chose and the holdout,
with its own predictions, the ``split`` of each row, the ``origin`` of each row (``seed`` data
or ``logged`` traffic) and the time of every row (``predicted_at``; seed rows by the
dataset's time columns, when it has some).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import asyncpg
import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driftloop.events.producer import EventProducer
from driftloop.serving.champion import Champion, ChampionRef, ModelRegistry, load_champion
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
    load_settings,
)
from driftloop.storage import lake
from driftloop.storage.database import create_pool
from driftloop.storage.hot_store import day_start, existing_days
from driftloop.storage.migrations import SCHEMA_NAME
from driftloop.training import trainer
from driftloop.training.history import select_history
from driftloop.training.metrics import metric_value
from driftloop.training.policy import (
    HoldoutMetric,
    RetrainPolicy,
    RetrainRefusedError,
    TooFewLabelsError,
    holdout_metric,
    holdout_size,
    judge_challenger,
)
from driftloop.training.workspace import get_objects, put_objects, work_prefix
from schemas.events import ChallengerShadowed, ModelDecision, ModelPromoted, ModelRejected
from schemas.features import (
    TASK_METRICS,
    FeatureKind,
    FeatureSpec,
    Metric,
    PromotionEvidence,
    TrainingData,
)
from schemas.fields import (
    EpisodeId,
    FeatureName,
    Fraction,
    ModelName,
    ModelVersion,
    Uri,
    UtcDatetime,
)
from schemas.topics import Topic

log = logging.getLogger(__name__)

PREDICTED_AT_COLUMN: Final = "predicted_at"
REQUEST_ID_COLUMN: Final = "request_id"
ORIGIN_COLUMN: Final = "origin"
# Each training row's weight, when the data policy weighs rows (a half-life).
WEIGHT_COLUMN: Final = "training_weight"
SEED_ORIGIN: Final = "seed"
LOGGED_ORIGIN: Final = "logged"

# Model-version (and run) tags written by the DAG.
DAG_RUN_TAG: Final = "driftloop.dag_run_id"
EPISODE_TAG: Final = "driftloop.episode_id"
DECISION_TAG: Final = "driftloop.decision"
DECISION_REASON_TAG: Final = "driftloop.decision_reason"
METRIC_TAG: Final = "driftloop.metric"
CHALLENGER_SCORE_TAG: Final = "driftloop.challenger_score"
CHAMPION_SCORE_TAG: Final = "driftloop.champion_score"
CHAMPION_VERSION_TAG: Final = "driftloop.champion_version"

# Namespace of the decision events' ids: uuid5(namespace, "<model>:<version>:<outcome>").
_DECISION_NAMESPACE: Final = uuid.UUID("5b0f7f0e-3c1e-4d4e-9a51-7c2f1d3e8a90")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_LABELLED_ROWS = """
SELECT p.request_id, p.predicted_at, p.features::text AS features, p.prediction, l.label
FROM prediction_log p JOIN labels l USING (request_id)
WHERE p.model_name = $1 AND p.model_version = $2 AND p.predicted_at <= $3
ORDER BY p.predicted_at DESC, p.request_id DESC
LIMIT $4
"""


class InvalidRetrainRequestError(RetrainRefusedError):
    """The DAG run's conf is not a retraining request."""


class NoChampionError(RetrainRefusedError):
    """The model has no champion to retrain (bootstrap one first)."""


class Outcome(StrEnum):
    """What happened to the challenger."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    SHADOWED = "shadowed"
    """Passed the holdout; waits under the alias ``challenger`` for live evidence."""


class RetrainRequest(BaseModel):
    """The conf of a ``retrain_model`` run: the retrain-trigger's (``dag_run_conf``) or a
    person's (``{"model_name": ...}``). Other keys (policy overrides) are ignored here."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_attribute_docstrings=True)

    model_name: ModelName
    """Registered model to retrain."""
    model_version: ModelVersion | None = None
    """Champion version whose traffic drifted; its logged rows are the recent data. None: the
    current champion."""
    episode_id: EpisodeId | None = None
    """Drift episode that caused the run; None for a manual run."""
    event_id: uuid.UUID | None = None
    """The ``DriftDetected`` event that triggered the run."""
    window_start: UtcDatetime | None = None
    """Start of the window that drifted."""
    window_end: UtcDatetime | None = None
    """End of the window that drifted."""
    window_rows: int | None = Field(default=None, ge=1)
    """Rows of the window that drifted."""
    drift_share: Fraction | None = None
    """Share of the monitored features that drifted."""
    drifted_features: tuple[FeatureName, ...] = ()
    """Features that drifted."""
    prediction_drifted: bool | None = None
    """Whether the predictions drifted too."""
    report_uri: Uri | None = None
    """Drift report of the window."""
    postgres_schema: str = Field(default="public", pattern=SCHEMA_NAME.pattern)
    """Postgres schema of the prediction log (default public; tests use their own)."""
    topic_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{0,200}$")
    """Kafka topic prefix of ``model.events``; None: the KAFKA_TOPIC_PREFIX setting."""

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None) -> RetrainRequest:
        """The request in a DAG run's conf; ``InvalidRetrainRequestError`` saying what is wrong.

        Keys that are neither request fields nor policy params are accepted (a newer trigger
        may send more) but logged: a misspelt ``postgres_schema`` would read ``public``.
        """
        unknown = sorted(set(conf or {}) - set(cls.model_fields) - set(RetrainPolicy.model_fields))
        if unknown:
            log.warning("conf keys ignored (not a request field or a param): %s", unknown)
        try:
            return cls.model_validate(dict(conf or {}))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc']) or 'conf'}: {item['msg']}"
                for item in error.errors(include_url=False)
            )
            raise InvalidRetrainRequestError(
                f"invalid conf of the retrain run: {problems}"
            ) from error


@dataclass(frozen=True, slots=True)
class RetrainConnections:
    """Where the steps read and write: the platform's settings, from the environment."""

    postgres: PostgresSettings
    object_store: ObjectStoreSettings
    mlflow: MlflowSettings
    kafka: KafkaSettings

    @classmethod
    def from_environment(cls) -> RetrainConnections:
        """POSTGRES_*, S3_*, MLFLOW_* and KAFKA_* (an Airflow worker has them all)."""
        return cls(
            postgres=load_settings(PostgresSettings),
            object_store=load_settings(ObjectStoreSettings),
            mlflow=load_settings(MlflowSettings),
            kafka=load_settings(KafkaSettings),
        )


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Extracted(_Result):
    """What ``extract_step`` found and where it put the data."""

    request: RetrainRequest
    policy: RetrainPolicy
    dag_run_id: str
    cutoff: UtcDatetime
    champion_version: int
    champion_run_id: str
    served_version: int
    metric_name: str
    greater_is_better: bool
    bucket: str
    prefix: str
    reference_rows: int
    recent_rows: int
    skipped_rows: int
    recent_training_rows: int
    history_rows: int
    """Rows the challenger is trained on: the data policy's share of the reference and the
    older recent rows."""
    data_policy: str
    """The training-data policy applied, as declared (``TrainingData.describe``)."""
    weighted: bool = False
    """Whether the training rows carry weights (``WEIGHT_COLUMN``)."""
    holdout_rows: int
    holdout_start: UtcDatetime
    holdout_end: UtcDatetime

    @property
    def model_name(self) -> str:
        return self.request.model_name

    @property
    def training_rows(self) -> int:
        """Rows the challenger is trained on."""
        return self.history_rows

    @property
    def metric(self) -> HoldoutMetric:
        return HoldoutMetric(self.metric_name, self.greater_is_better)

    @property
    def train_key(self) -> str:
        return f"{self.prefix}train.parquet"

    @property
    def holdout_key(self) -> str:
        return f"{self.prefix}holdout.parquet"

    @property
    def spec_key(self) -> str:
        return f"{self.prefix}{trainer.FEATURE_SPEC_FILE}"


class Challenger(_Result):
    """The registered challenger."""

    model_name: str
    version: int
    run_id: str
    reused: bool
    """Registered by an earlier attempt of the same DAG run, not trained again."""


class Evaluation(_Result):
    """Both models' scores on the same holdout."""

    metric_name: str
    greater_is_better: bool
    challenger_version: int
    challenger_score: float
    champion_version: int
    champion_score: float
    holdout_rows: int
    promotion_evidence: PromotionEvidence = PromotionEvidence.HOLDOUT
    """What the model's declaration (``training.live.promotion``) asks for before a challenger
    that passed the holdout becomes champion."""

    @property
    def metric(self) -> HoldoutMetric:
        return HoldoutMetric(self.metric_name, self.greater_is_better)


class Decision(_Result):
    """What ``decide_step`` did and announced."""

    outcome: Outcome
    reason: str
    model_name: str
    challenger_version: int
    champion_version: int
    """The champion evaluated against."""
    alias_version: int | None
    """Where the ``champion`` alias points afterwards."""
    event_id: uuid.UUID
    topic: str


# --- pure pieces -------------------------------------------------------------------------------


def labelled_frame(
    spec: FeatureSpec, rows: Sequence[Mapping[str, Any]]
) -> tuple[pd.DataFrame, int]:
    """Logged rows (request_id, predicted_at, features as JSON or a dict, prediction, label) as
    a frame in time order: ``predicted_at``, ``request_id``, the features, ``prediction``, the
    target. Rows whose features fail the declaration are left out; returns them counted."""
    records: list[dict[str, Any]] = []
    skipped = 0
    first_problem: str | None = None
    for row in rows:
        raw = row["features"]
        try:
            features = orjson.loads(raw) if isinstance(raw, str | bytes) else dict(raw)
            valid = spec.validate_row(features)
        except (orjson.JSONDecodeError, TypeError, ValueError) as error:
            skipped += 1
            first_problem = first_problem or f"{row[REQUEST_ID_COLUMN]}: {error}"
            continue
        records.append(
            {
                PREDICTED_AT_COLUMN: row[PREDICTED_AT_COLUMN],
                REQUEST_ID_COLUMN: row[REQUEST_ID_COLUMN],
                **valid,
                trainer.PREDICTION_COLUMN: float(row["prediction"]),
                spec.target.name: float(row["label"]),
            }
        )
    if skipped:
        log.warning(
            "%d logged rows left out: their features fail the declaration %s (first: %s)",
            skipped,
            spec.name,
            first_problem,
        )
    columns = [
        PREDICTED_AT_COLUMN,
        REQUEST_ID_COLUMN,
        *spec.feature_names,
        trainer.PREDICTION_COLUMN,
        spec.target.name,
    ]
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame[PREDICTED_AT_COLUMN] = pd.to_datetime(frame[PREDICTED_AT_COLUMN], utc=True)
    frame = _typed_features(spec, frame)
    frame[trainer.PREDICTION_COLUMN] = frame[trainer.PREDICTION_COLUMN].astype(np.float64)
    frame[spec.target.name] = frame[spec.target.name].astype(np.float64)
    ordered = frame.sort_values([PREDICTED_AT_COLUMN, REQUEST_ID_COLUMN], kind="stable")
    return ordered.reset_index(drop=True), skipped


def split_recent(recent: pd.DataFrame, policy: RetrainPolicy) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recent rows older than the holdout, and the holdout: the newest rows (time order)."""
    ordered = recent.sort_values([PREDICTED_AT_COLUMN, REQUEST_ID_COLUMN], kind="stable")
    size = holdout_size(len(ordered), policy)
    cut = len(ordered) - size
    return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)


def assemble_training_set(
    spec: FeatureSpec, reference: pd.DataFrame, recent: pd.DataFrame
) -> pd.DataFrame:
    """The champion's reference rows then the recent ones: ``origin``, ``predicted_at``, the
    features and the target. A reference row keeps the origin and time it already had (rows an
    earlier retraining took from the log), else it is ``seed`` data, dated by the dataset's
    time columns when the reference carries them (bootstrap logs them), else without a time."""
    wanted = [*spec.feature_names, spec.target.name]
    missing = [name for name in wanted if name not in reference.columns]
    if missing:
        raise RetrainRefusedError(f"the champion's reference lacks the columns {missing}")
    old = reference[wanted].copy()
    old.insert(0, PREDICTED_AT_COLUMN, reference_times(spec, reference))
    old.insert(
        0,
        ORIGIN_COLUMN,
        reference[ORIGIN_COLUMN] if ORIGIN_COLUMN in reference.columns else SEED_ORIGIN,
    )
    new = recent[[PREDICTED_AT_COLUMN, *wanted]].copy()
    new.insert(0, ORIGIN_COLUMN, LOGGED_ORIGIN)
    combined = pd.concat([_typed_features(spec, old), _typed_features(spec, new)])
    combined[spec.target.name] = pd.to_numeric(combined[spec.target.name]).astype(np.float64)
    return combined.reset_index(drop=True)


def reference_times(spec: FeatureSpec, reference: pd.DataFrame) -> pd.Series:
    """When each reference row happened: its ``predicted_at`` (logged rows), else the time the
    dataset's columns give (seed rows), else NaT (seed data without a time column)."""
    times = (
        pd.to_datetime(reference[PREDICTED_AT_COLUMN], utc=True)
        if PREDICTED_AT_COLUMN in reference.columns
        else pd.Series(pd.NaT, index=reference.index, dtype="datetime64[ns, UTC]")
    )
    timing = spec.dataset.time if spec.dataset is not None else None
    if timing is None or not set(timing.columns) <= set(reference.columns):
        return times
    undated = times.isna()
    if undated.any():
        seed = reference[undated]
        columns = list(timing.columns)
        # Rows an earlier retraining took from the log have no dataset time (NaN columns).
        known = seed[columns].notna().all(axis=1)
        if known.any():
            dated = trainer.dataset_times(spec, seed[known])
            times = times.copy()
            times[dated.index] = dated.to_numpy()
    return times


def choose_history(
    training_set: pd.DataFrame, data: TrainingData, as_of: datetime, *, min_rows: int
) -> tuple[pd.DataFrame, bool]:
    """A training-data policy applied to the assembled training set: the rows kept, with
    ``WEIGHT_COLUMN`` when the policy weighs them; and whether it does. ``TooFewLabelsError``
    when fewer than ``min_rows`` are kept (a span shorter than the holdout keeps none)."""
    chosen = select_history(training_set, training_set[PREDICTED_AT_COLUMN], data, as_of=as_of)
    if len(chosen.rows) < min_rows:
        raise TooFewLabelsError(
            f"too few rows to train on: the training-data policy ({data.describe()}) keeps "
            f"{len(chosen.rows)} of the {len(training_set)} rows before the holdout"
        )
    rows = chosen.rows
    if chosen.weights is not None:
        rows = rows.assign(**{WEIGHT_COLUMN: chosen.weights})
    return rows, chosen.weights is not None


def holdout_frame(spec: FeatureSpec, holdout: pd.DataFrame) -> pd.DataFrame:
    """The holdout as the training set's columns (``origin`` logged) plus the request ids and
    the champion's served predictions."""
    frame = holdout[
        [
            PREDICTED_AT_COLUMN,
            REQUEST_ID_COLUMN,
            *spec.feature_names,
            trainer.PREDICTION_COLUMN,
            spec.target.name,
        ]
    ].copy()
    frame.insert(0, ORIGIN_COLUMN, LOGGED_ORIGIN)
    return frame.reset_index(drop=True)


def challenger_reference(
    spec: FeatureSpec, training_set: pd.DataFrame, holdout: pd.DataFrame, booster: lgb.Booster
) -> pd.DataFrame:
    """The challenger's reference dataset: its training rows (split ``train``) and the holdout
    (split ``holdout``), with its own predictions, each row's origin and time."""
    return trainer.reference_frame(
        spec,
        [("train", training_set), ("holdout", holdout)],
        booster,
        leading_columns=(ORIGIN_COLUMN, PREDICTED_AT_COLUMN),
    )


def holdout_score(
    metric: HoldoutMetric, truth: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
) -> float:
    """The metric of predictions against the truth (``driftloop.training.metrics``)."""
    try:
        chosen = Metric(metric.name)
    except ValueError:
        raise ValueError(f"unknown holdout metric {metric.name!r}") from None
    return metric_value(chosen, truth, predicted)


def decision_event(
    outcome: Outcome,
    *,
    challenger: Challenger,
    evaluation: Evaluation,
    episode_id: str | None,
    reason: str,
) -> ModelPromoted | ModelRejected | ChallengerShadowed:
    """The ``model.events`` message of a decision; its id is the same for every retry."""
    fields: dict[str, Any] = {
        "event_id": uuid.uuid5(
            _DECISION_NAMESPACE, f"{challenger.model_name}:{challenger.version}:{outcome.value}"
        ),
        "model_name": challenger.model_name,
        "model_version": challenger.version,
        "run_id": challenger.run_id,
        "champion_version": evaluation.champion_version,
        "metric_name": evaluation.metric_name,
        "greater_is_better": evaluation.greater_is_better,
        "challenger_score": evaluation.challenger_score,
        "champion_score": evaluation.champion_score,
        "episode_id": episode_id,
    }
    if outcome is Outcome.PROMOTED:
        return ModelPromoted(**fields)
    if outcome is Outcome.SHADOWED:
        return ChallengerShadowed(**fields)
    return ModelRejected(**fields, reason=reason)


def _typed_features(spec: FeatureSpec, frame: pd.DataFrame) -> pd.DataFrame:
    # One dtype per column whatever the source (CSV, JSON, Parquet): numbers numeric (NaN when
    # missing), string categories as objects (None when missing), so frames concatenate and
    # round-trip through Parquet unchanged.
    typed = frame.copy()
    for feature in spec.features:
        column = typed[feature.name]
        if feature.dtype == "str":
            values = [None if pd.isna(value) else value for value in column]
            typed[feature.name] = pd.Series(values, index=typed.index, dtype=object)
        elif feature.kind is FeatureKind.NUMERIC or feature.dtype == "int":
            typed[feature.name] = pd.to_numeric(column, errors="raise")
    return typed


# --- input and output --------------------------------------------------------------------------


async def read_labelled_rows(
    settings: PostgresSettings,
    schema: str,
    model_name: str,
    model_version: int,
    *,
    cutoff: datetime,
    limit: int,
    object_store: ObjectStoreSettings | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` labelled rows a model version served up to ``cutoff`` (newest
    first); ``RetrainRefusedError`` when ``schema`` holds no prediction log.

    Postgres holds the hot days whole (from its oldest partition on, flushed to Parquet or
    not); with ``object_store``, rows still wanted past those come from the Parquet lake, only
    from before the oldest partition: the days Postgres has dropped, which are in Parquet
    (features at the flush, labels exported before the drop), so no row is read twice or lost.
    """
    pool = await create_pool(settings, schema=schema, max_size=1, give_up_after_seconds=60)
    try:
        rows = [
            dict(row)
            for row in await pool.fetch(_LABELLED_ROWS, model_name, model_version, cutoff, limit)
        ]
        if object_store is not None and len(rows) < limit:
            async with pool.acquire() as connection:
                days = (await existing_days(connection))["prediction_log"]
            # Postgres reads up to cutoff inclusive; the lake takes what lies before its days.
            before = cutoff + timedelta(microseconds=1)
            if days:
                before = min(before, day_start(min(days)))
            older = await _lake_rows(
                pool, object_store, model_name, model_version, before, limit - len(rows)
            )
            log.info(
                "%s v%d: %d labelled rows from Postgres, %d older ones (before %s) from Parquet",
                model_name,
                model_version,
                len(rows),
                len(older),
                before.isoformat(),
            )
            rows += older
    except asyncpg.UndefinedTableError as error:
        raise RetrainRefusedError(
            f"schema {schema} has no prediction log ({error}); check postgres_schema"
        ) from error
    finally:
        await pool.close()
    return rows


async def _lake_rows(
    pool: asyncpg.Pool,
    object_store: ObjectStoreSettings,
    model_name: str,
    model_version: int,
    before: datetime,
    limit: int,
) -> list[dict[str, Any]]:
    files = await lake.window_files(pool, model_name, _EPOCH, before)
    if not files.features or not files.labels:
        return []

    def read() -> list[dict[str, Any]]:
        connection = lake.open_lake(
            lake.s3_filesystem(object_store), object_store.data_bucket, files
        )
        try:
            return lake.training_rows(connection, model_version, before=before, limit=limit)
        finally:
            connection.close()

    return await asyncio.to_thread(read)


def _parquet(frame: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    frame.to_parquet(sink, index=False)
    return sink.getvalue()


def _read_work(
    settings: ObjectStoreSettings, extracted: Extracted, *, with_training_set: bool
) -> tuple[FeatureSpec, pd.DataFrame | None, pd.DataFrame]:
    keys = [extracted.spec_key, extracted.holdout_key]
    if with_training_set:
        keys.append(extracted.train_key)
    bodies = asyncio.run(get_objects(settings, extracted.bucket, keys))
    spec = FeatureSpec.model_validate(yaml.safe_load(bodies[0]))
    holdout = pd.read_parquet(io.BytesIO(bodies[1]))
    training_set = pd.read_parquet(io.BytesIO(bodies[2])) if with_training_set else None
    return spec, training_set, holdout


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def load_version(tracking_uri: str, model_name: str, version: int, directory: Path) -> Champion:
    """A registered version loaded as the gateway loads it (booster and declaration)."""
    run_id = _client(tracking_uri).get_model_version(model_name, str(version)).run_id
    if not run_id:
        raise RetrainRefusedError(f"{model_name} version {version} has no run")
    ref = ChampionRef(model_name, version, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    ModelRegistry(tracking_uri).download(ref, directory)
    return load_champion(directory, ref)


def version_for_dag_run(client: MlflowClient, model_name: str, dag_run_id: str) -> int | None:
    """The version an attempt of this DAG run registered already, if any."""
    # Airflow run ids match [A-Za-z0-9_.~:+-]+ and model names ModelName: no quote to escape.
    if "'" in dag_run_id or "'" in model_name:
        raise ValueError(f"cannot search for {model_name!r} / {dag_run_id!r}: quote in a name")
    found = client.search_model_versions(
        f"name = '{model_name}' and tags.`{DAG_RUN_TAG}` = '{dag_run_id}'"
    )
    versions = sorted(int(version.version) for version in found)
    return versions[0] if versions else None


def publish_decision(settings: KafkaSettings, event: ModelDecision) -> str:
    """Send the event to ``<prefix>model.events`` keyed by model; returns once acknowledged."""
    topic = settings.topic(Topic.MODEL_EVENTS)

    async def send() -> None:
        producer = EventProducer(settings, "retrain-model")
        await producer.start(give_up_after_seconds=30)
        try:
            await producer.send_event(topic, event)
        finally:
            await producer.close()

    asyncio.run(send())
    return topic


# --- the DAG's steps ---------------------------------------------------------------------------


def extract_step(
    conf: Mapping[str, Any] | None,
    params: Mapping[str, Any],
    *,
    dag_run_id: str,
    cutoff: datetime,
    connections: RetrainConnections | None = None,
) -> Extracted:
    """Validate the run, find the champion, cut the data, write the work objects."""
    request = RetrainRequest.from_conf(conf)
    policy = RetrainPolicy.from_params(params)
    connections = connections or RetrainConnections.from_environment()
    uri = connections.mlflow.tracking_uri
    name = request.model_name
    champion_version = trainer.current_champion(uri, name)
    if champion_version is None:
        raise NoChampionError(f"{name} has no champion to retrain; bootstrap a first model")
    served = request.model_version or champion_version
    if served != champion_version:
        log.warning(
            "%s: the run names version %d, the champion is now version %d; training on the "
            "rows version %d served, judging against version %d",
            name,
            served,
            champion_version,
            served,
            champion_version,
        )
    with tempfile.TemporaryDirectory(prefix="driftloop-retrain-") as work:
        champion = load_version(uri, name, champion_version, Path(work))
    spec = champion.spec
    rows = asyncio.run(
        read_labelled_rows(
            connections.postgres,
            request.postgres_schema,
            name,
            served,
            cutoff=cutoff,
            limit=policy.max_recent_rows,
            object_store=connections.object_store,
        )
    )
    recent, skipped = labelled_frame(spec, rows)
    where = (
        f"{name} v{served} in {request.postgres_schema}.prediction_log up to {cutoff.isoformat()}"
    )
    log.info(
        "%s: %d labelled rows read (newest %d at most), %d left out",
        where,
        len(recent),
        policy.max_recent_rows,
        skipped,
    )
    if len(recent) < policy.min_labelled_rows:
        raise TooFewLabelsError(
            f"too few labels to retrain: {len(recent)} labelled rows served by {where}, the "
            f"policy needs at least {policy.min_labelled_rows} (min_labelled_rows); "
            f"champion v{champion_version} stays"
        )
    try:
        older, holdout = split_recent(recent, policy)
    except TooFewLabelsError as error:
        raise TooFewLabelsError(f"{error} ({where}); champion v{champion_version} stays") from error
    reference = trainer.load_reference(uri, name, champion_version)
    holdout_end = holdout[PREDICTED_AT_COLUMN].iloc[-1].to_pydatetime()
    try:
        training_set, weighted = choose_history(
            assemble_training_set(spec, reference, older),
            spec.training_data,
            holdout_end,
            min_rows=policy.min_holdout_rows,
        )
    except TooFewLabelsError as error:
        raise TooFewLabelsError(f"{error} ({where}); champion v{champion_version} stays") from error
    metric = holdout_metric(spec)
    prefix = work_prefix(name, dag_run_id)
    bucket = connections.object_store.data_bucket
    asyncio.run(
        put_objects(
            connections.object_store,
            bucket,
            {
                f"{prefix}train.parquet": _parquet(training_set),
                f"{prefix}holdout.parquet": _parquet(holdout_frame(spec, holdout)),
                f"{prefix}{trainer.FEATURE_SPEC_FILE}": trainer.feature_spec_document(
                    spec
                ).encode(),
            },
        )
    )
    extracted = Extracted(
        request=request,
        policy=policy,
        dag_run_id=dag_run_id,
        cutoff=cutoff,
        champion_version=champion_version,
        champion_run_id=champion.run_id,
        served_version=served,
        metric_name=metric.name,
        greater_is_better=metric.greater_is_better,
        bucket=bucket,
        prefix=prefix,
        reference_rows=len(reference),
        recent_rows=len(recent),
        skipped_rows=skipped,
        recent_training_rows=len(older),
        history_rows=len(training_set),
        data_policy=spec.training_data.describe(),
        weighted=weighted,
        holdout_rows=len(holdout),
        holdout_start=holdout[PREDICTED_AT_COLUMN].iloc[0].to_pydatetime(),
        holdout_end=holdout_end,
    )
    log.info(
        "%s (DAG run %s, episode %s): champion v%d; holdout %d newest rows (%s to %s); "
        "training set %d rows (%s%s) of %d reference rows of v%d + %d older recent rows; "
        "work objects in s3://%s/%s",
        name,
        dag_run_id,
        request.episode_id or "none (manual run)",
        champion_version,
        len(holdout),
        extracted.holdout_start.isoformat(),
        extracted.holdout_end.isoformat(),
        extracted.training_rows,
        extracted.data_policy,
        ", weighted" if weighted else "",
        len(reference),
        champion_version,
        len(older),
        bucket,
        prefix,
    )
    return extracted


def train_step(
    extracted: Extracted, *, connections: RetrainConnections | None = None
) -> Challenger:
    """Train the challenger, log it with its reference dataset and register it (once per run)."""
    connections = connections or RetrainConnections.from_environment()
    uri = connections.mlflow.tracking_uri
    name = extracted.model_name
    client = _client(uri)
    existing = version_for_dag_run(client, name, extracted.dag_run_id)
    if existing is not None:
        run_id = client.get_model_version(name, str(existing)).run_id
        log.info(
            "%s v%d was registered for DAG run %s by an earlier attempt; reusing it",
            name,
            existing,
            extracted.dag_run_id,
        )
        return Challenger(model_name=name, version=existing, run_id=str(run_id), reused=True)
    spec, training_set, holdout = _read_work(
        connections.object_store, extracted, with_training_set=True
    )
    assert training_set is not None  # noqa: S101 - asked for above
    policy = extracted.policy
    weights: npt.NDArray[np.float64] | None = None
    if WEIGHT_COLUMN in training_set.columns:
        weights = training_set.pop(WEIGHT_COLUMN).to_numpy(dtype=np.float64)
    started = time.perf_counter()
    booster = trainer.train_booster(
        spec, training_set, num_boost_round=policy.num_boost_round, weights=weights
    )
    training_seconds = time.perf_counter() - started
    reference = challenger_reference(spec, training_set, holdout, booster)
    episode = extracted.request.episode_id
    params: dict[str, Any] = {
        **policy.model_dump(),
        "dag_run_id": extracted.dag_run_id,
        "episode_id": episode or "manual",
        "champion_version": extracted.champion_version,
        "served_version": extracted.served_version,
        "cutoff": extracted.cutoff.isoformat(),
        "training_rows": len(training_set),
        "reference_rows": extracted.reference_rows,
        "recent_training_rows": extracted.recent_training_rows,
        "data_policy": extracted.data_policy,
        "holdout_rows": len(holdout),
        "feature_spec": spec.name,
        **trainer.DEFAULT_PARAMS,
    }
    tags = {
        DAG_RUN_TAG: extracted.dag_run_id,
        CHAMPION_VERSION_TAG: str(extracted.champion_version),
        **({EPISODE_TAG: episode} if episode else {}),
    }
    with tempfile.TemporaryDirectory(prefix="driftloop-challenger-") as work:
        model = trainer.log_and_register(
            booster,
            spec,
            tracking_uri=uri,
            model_name=name,
            params=params,
            metrics={"training_seconds": training_seconds},
            reference=reference,
            run_name=f"retrain {name} {extracted.dag_run_id}"[:250],
            run_tags=tags,
            version_tags=tags,
            work_dir=Path(work),
        )
    log.info(
        "challenger %s v%d (run %s) trained on %d rows in %.1f s (%d rounds)",
        name,
        model.version,
        model.run_id,
        len(training_set),
        training_seconds,
        policy.num_boost_round,
    )
    return Challenger(model_name=name, version=model.version, run_id=model.run_id, reused=False)


def evaluate_step(
    extracted: Extracted,
    challenger: Challenger,
    *,
    connections: RetrainConnections | None = None,
) -> Evaluation:
    """Score the challenger and the evaluated champion on the same holdout."""
    connections = connections or RetrainConnections.from_environment()
    uri = connections.mlflow.tracking_uri
    spec, _, holdout = _read_work(connections.object_store, extracted, with_training_set=False)
    metric = extracted.metric
    truth = trainer.target_vector(spec, holdout)
    matrix = trainer.feature_matrix(spec, holdout)
    scores: dict[int, float] = {}
    # Every metric of the task is logged for people; the promotion metric decides.
    task_scores: dict[int, dict[Metric, float]] = {}
    with tempfile.TemporaryDirectory(prefix="driftloop-evaluate-") as work:
        for version in (extracted.champion_version, challenger.version):
            model = load_version(uri, extracted.model_name, version, Path(work) / str(version))
            if model.spec.features != spec.features:
                raise RetrainRefusedError(
                    f"{extracted.model_name} v{version} declares other features than the "
                    "champion the holdout was cut for"
                )
            predicted = model.predict(matrix)
            scores[version] = holdout_score(metric, truth, predicted)
            task_scores[version] = {
                other: metric_value(other, truth, predicted) for other in TASK_METRICS[spec.task]
            }
    challenger_score = scores[challenger.version]
    champion_score = scores[extracted.champion_version]
    if not (math.isfinite(challenger_score) and math.isfinite(champion_score)):
        raise RetrainRefusedError(
            f"holdout scores are not finite: challenger {challenger_score}, "
            f"champion {champion_score}"
        )
    client = _client(uri)
    runs = (("", challenger.version), ("champion_", extracted.champion_version))
    for other in TASK_METRICS[spec.task]:
        for prefix, version in runs:
            value = task_scores[version][other]
            if math.isfinite(value):  # ROC AUC is undefined on a one-class holdout
                client.log_metric(challenger.run_id, f"{prefix}holdout_{other}", value)
    log.info(
        "holdout of %d rows: challenger %s v%d %s %.4f, champion v%d %s %.4f",
        len(holdout),
        extracted.model_name,
        challenger.version,
        metric.name,
        challenger_score,
        extracted.champion_version,
        metric.name,
        champion_score,
    )
    return Evaluation(
        metric_name=metric.name,
        greater_is_better=metric.greater_is_better,
        challenger_version=challenger.version,
        challenger_score=challenger_score,
        champion_version=extracted.champion_version,
        champion_score=champion_score,
        holdout_rows=len(holdout),
        promotion_evidence=spec.training.live.promotion,
    )


def decide_step(
    extracted: Extracted,
    challenger: Challenger,
    evaluation: Evaluation,
    *,
    connections: RetrainConnections | None = None,
    publish: Callable[[ModelDecision], str] | None = None,
) -> Decision:
    """Promote, reject or (a model declared ``training.live.promotion: shadow``) put the
    challenger in shadow under the alias ``challenger``; tag the challenger, publish the
    decision (see the module docstring).

    ``publish`` sends the event and returns the topic once acknowledged (default: Kafka, on
    the run's topic prefix).
    """
    connections = connections or RetrainConnections.from_environment()
    if publish is None:
        prefix = extracted.request.topic_prefix
        settings = (
            connections.kafka
            if prefix is None
            else connections.kafka.model_copy(update={"topic_prefix": prefix})
        )

        def publish(event: ModelDecision) -> str:
            return publish_decision(settings, event)

    uri = connections.mlflow.tracking_uri
    name = challenger.model_name
    client = _client(uri)
    verdict = judge_challenger(
        evaluation.metric,
        evaluation.challenger_score,
        evaluation.champion_score,
        extracted.policy.promotion_margin,
    )
    current = trainer.current_champion(uri, name)
    if current == challenger.version:
        # An earlier attempt moved the alias and failed before publishing: finish its work.
        previous = client.get_model_version(name, str(challenger.version)).tags
        outcome, reason = Outcome.PROMOTED, previous.get(DECISION_REASON_TAG, verdict.reason)
        log.info("%s v%d is already champion (an earlier attempt promoted it)", name, current)
    elif verdict.promote and current != evaluation.champion_version:
        outcome = Outcome.REJECTED
        moved = f"to v{current}" if current is not None else "away (alias removed)"
        reason = (
            f"champion moved {moved} during the run (evaluated against "
            f"v{evaluation.champion_version}); {verdict.reason}"
        )
    elif verdict.promote and evaluation.promotion_evidence is PromotionEvidence.SHADOW:
        # The model's declaration asks for live evidence: the champion stays, the challenger
        # is scored in shadow and judged by the shadow-scorer (driftloop.training.live_judge).
        outcome = Outcome.SHADOWED
        reason = f"{verdict.reason}; waits in shadow for live evidence"
        client.set_registered_model_alias(name, trainer.CHALLENGER_ALIAS, str(challenger.version))
    elif verdict.promote:
        outcome, reason = Outcome.PROMOTED, verdict.reason
        trainer.set_champion(
            trainer.RegisteredModel(name, challenger.version, challenger.run_id),
            tracking_uri=uri,
        )
        current = challenger.version
    else:
        outcome, reason = Outcome.REJECTED, verdict.reason
    episode = extracted.request.episode_id
    tags = {
        DECISION_TAG: outcome.value,
        DECISION_REASON_TAG: reason,
        METRIC_TAG: evaluation.metric_name,
        CHALLENGER_SCORE_TAG: repr(evaluation.challenger_score),
        CHAMPION_SCORE_TAG: repr(evaluation.champion_score),
        CHAMPION_VERSION_TAG: str(evaluation.champion_version),
        **({EPISODE_TAG: episode} if episode else {}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), key, value)
    log.info(
        "%s %s v%d (champion v%d%s): %s",
        outcome.value.upper(),
        name,
        challenger.version,
        evaluation.champion_version,
        f", alias now on v{current}" if current is not None else ", no alias",
        reason,
    )
    event = decision_event(
        outcome, challenger=challenger, evaluation=evaluation, episode_id=episode, reason=reason
    )
    topic = publish(event)
    log.info("%s %s published to %s", type(event).__name__, event.event_id, topic)
    return Decision(
        outcome=outcome,
        reason=reason,
        model_name=name,
        challenger_version=challenger.version,
        champion_version=evaluation.champion_version,
        alias_version=current,
        event_id=event.event_id,
        topic=topic,
    )
