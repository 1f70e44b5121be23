"""Retraining without services: the policy, the holdout, the promotion rule, the conf, the
training set built from a reference and logged rows, and the decision against a sqlite
registry (the Airflow DAG and the real stack are in tests/integration/test_retrain_dag.py)."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from consumers.retrain_trigger import dag_run_conf
from driftloop.settings import KafkaSettings, MlflowSettings, ObjectStoreSettings, PostgresSettings
from driftloop.training import retrain, trainer, workspace
from driftloop.training.policy import (
    LOG_LOSS,
    RMSE,
    HoldoutMetric,
    RetrainPolicy,
    RetrainRefusedError,
    TooFewLabelsError,
    holdout_metric,
    holdout_size,
    judge_challenger,
)
from driftloop.training.retrain import (
    Challenger,
    Evaluation,
    Extracted,
    InvalidRetrainRequestError,
    Outcome,
    RetrainConnections,
    RetrainRequest,
)
from schemas.events import (
    DriftDetected,
    ModelEvent,
    ModelPromoted,
    ModelRejected,
    decode_model_event,
)
from schemas.features import FeatureSpec, Metric, Task, Training, load_feature_spec

START = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def summer(spec: FeatureSpec) -> pd.DataFrame:
    return trainer.read_dataset(spec, since="2011-06-01", until="2011-07-01")


def logged_rows(spec: FeatureSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as the prediction log returns them: one per hour, features as JSON text."""
    rows = []
    for position, record in enumerate(frame.to_dict(orient="records")):
        features = {name: _plain(record[name]) for name in spec.feature_names}
        rows.append(
            {
                "request_id": f"r-{position:05d}",
                "predicted_at": START + timedelta(hours=position),
                "features": orjson.dumps(features).decode(),
                "prediction": 42.0,
                "label": float(record[spec.target.name]),
            }
        )
    return rows


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


# --- policy ------------------------------------------------------------------------------------


def test_policy_defaults_are_the_documented_ones() -> None:
    policy = RetrainPolicy()

    assert policy.model_dump() == {
        "promotion_margin": 0.02,
        "holdout_fraction": 0.25,
        "min_labelled_rows": 200,
        "min_holdout_rows": 50,
        "max_recent_rows": 20_000,
        "num_boost_round": 200,
    }


def test_policy_from_params_ignores_the_other_conf_keys() -> None:
    policy = RetrainPolicy.from_params(
        {"promotion_margin": 0.1, "model_name": "bikeshare", "episode_id": "e1"}
    )

    assert policy.promotion_margin == 0.1
    assert policy.min_labelled_rows == 200


@pytest.mark.parametrize(
    "params",
    [
        {"promotion_margin": -0.1},
        {"promotion_margin": 1.0},
        {"holdout_fraction": 0},
        {"min_labelled_rows": 50, "min_holdout_rows": 50},
        {"max_recent_rows": 100},
        {"num_boost_round": 0},
    ],
)
def test_an_invalid_policy_is_refused(params: dict[str, Any]) -> None:
    with pytest.raises(RetrainRefusedError, match="invalid retraining policy"):
        RetrainPolicy.from_params(params)


def test_param_schemas_carry_defaults_descriptions_and_bounds() -> None:
    schemas = RetrainPolicy.param_schemas()

    assert list(schemas) == list(RetrainPolicy.model_fields)
    margin = schemas["promotion_margin"]
    assert margin["default"] == 0.02
    assert margin["type"] == "number"
    assert margin["minimum"] == 0
    assert margin["exclusiveMaximum"] == 1
    assert "RMSE" in margin["description"]
    assert schemas["min_labelled_rows"]["type"] == "integer"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(200, 50), (201, 51), (1000, 250), (20_000, 5_000)],
)
def test_holdout_is_the_fraction_rounded_up(rows: int, expected: int) -> None:
    assert holdout_size(rows, RetrainPolicy()) == expected


def test_holdout_has_at_least_min_holdout_rows() -> None:
    policy = RetrainPolicy(holdout_fraction=0.01)

    assert holdout_size(300, policy) == 50


def test_too_few_labels_is_a_refusal() -> None:
    with pytest.raises(TooFewLabelsError, match=r"too few labels: 199 .* at least 200"):
        holdout_size(199, RetrainPolicy())


def test_a_holdout_that_leaves_nothing_to_train_on_is_too_few_labels() -> None:
    policy = RetrainPolicy(min_labelled_rows=10, min_holdout_rows=5, holdout_fraction=0.99)

    with pytest.raises(TooFewLabelsError, match="leaves none"):
        holdout_size(10, policy)


def test_split_keeps_time_order_and_holds_out_the_newest(
    spec: FeatureSpec, summer: pd.DataFrame
) -> None:
    rows = logged_rows(spec, summer)
    shuffled = [rows[i] for i in np.random.default_rng(3).permutation(len(rows))]
    recent, skipped = retrain.labelled_frame(spec, shuffled)

    older, holdout = retrain.split_recent(recent, RetrainPolicy())

    assert skipped == 0
    assert len(holdout) == math.ceil(len(rows) * 0.25)
    assert len(older) + len(holdout) == len(rows)
    assert older["predicted_at"].max() < holdout["predicted_at"].min()
    assert holdout["predicted_at"].is_monotonic_increasing
    assert older["predicted_at"].is_monotonic_increasing
    assert list(holdout["request_id"]) == [row["request_id"] for row in rows[-len(holdout) :]]


def test_split_with_too_few_rows_is_too_few_labels(spec: FeatureSpec, summer: pd.DataFrame) -> None:
    recent, _ = retrain.labelled_frame(spec, logged_rows(spec, summer.head(150)))

    with pytest.raises(TooFewLabelsError):
        retrain.split_recent(recent, RetrainPolicy())


# --- promotion rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenger", "margin", "promote"),
    [
        (97.9, 0.02, True),
        (98.0, 0.02, True),  # exactly at the margin
        (98.01, 0.02, False),
        (99.99, 0.0, True),  # margin 0: any improvement
        (100.0, 0.0, False),  # a tie never promotes
        (120.0, 0.0, False),
        (50.0, 0.99, False),
    ],
)
def test_lower_is_better_needs_the_relative_margin(
    challenger: float, margin: float, promote: bool
) -> None:
    verdict = judge_challenger(RMSE, challenger, 100.0, margin)

    assert verdict.promote is promote
    assert verdict.improvement == pytest.approx((100.0 - challenger) / 100.0)
    assert "rmse" in verdict.reason


@pytest.mark.parametrize(
    ("challenger", "promote"),
    [(0.8160, True), (0.8159, False), (0.79, False), (0.9, True)],
)
def test_greater_is_better_is_the_mirrored_rule(challenger: float, promote: bool) -> None:
    auc = HoldoutMetric("roc_auc", greater_is_better=True)

    verdict = judge_challenger(auc, challenger, 0.8, 0.02)

    assert verdict.promote is promote


def test_rejection_reasons_say_why() -> None:
    worse = judge_challenger(RMSE, 110.0, 100.0, 0.02)
    short = judge_challenger(RMSE, 99.0, 100.0, 0.02)

    assert "10.0% worse" in worse.reason
    assert "1.0% better, short of the 2.0% margin" in short.reason


def test_scores_that_are_not_finite_never_promote() -> None:
    assert not judge_challenger(RMSE, math.nan, 100.0, 0.0).promote
    assert not judge_challenger(RMSE, 1.0, math.inf, 0.0).promote


def test_a_perfect_champion_cannot_be_beaten_on_a_lower_is_better_metric() -> None:
    assert not judge_challenger(RMSE, 0.0, 0.0, 0.0).promote
    assert not judge_challenger(RMSE, 1.0, 0.0, 0.0).promote


def test_metric_is_the_declared_one_else_the_tasks_default(spec: FeatureSpec) -> None:
    # bikeshare declares rmse; without a declared metric a classifier takes log loss.
    classifier = spec.model_copy(update={"task": Task.CLASSIFICATION, "training": Training()})
    by_auc = spec.model_copy(
        update={"task": Task.CLASSIFICATION, "training": Training(promotion_metric=Metric.ROC_AUC)}
    )

    assert holdout_metric(spec) == RMSE
    assert holdout_metric(classifier) == LOG_LOSS
    assert holdout_metric(by_auc) == HoldoutMetric("roc_auc", greater_is_better=True)


def test_holdout_scores() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    assert retrain.holdout_score(RMSE, truth, np.array([1.0, 2.0, 3.0, 8.0])) == (
        pytest.approx(2.0)
    )
    labels = np.array([1.0, 0.0])
    assert retrain.holdout_score(LOG_LOSS, labels, np.array([0.8, 0.2])) == pytest.approx(
        -math.log(0.8)
    )
    with pytest.raises(ValueError, match="as many"):
        retrain.holdout_score(RMSE, truth, np.array([1.0]))


# --- the run's conf ----------------------------------------------------------------------------


def drift_event() -> DriftDetected:
    end = datetime(2026, 7, 1, tzinfo=UTC)
    return DriftDetected(
        model_name="bikeshare",
        model_version=3,
        episode_id="bikeshare:3:abc",
        window_start=end - timedelta(hours=168),
        window_end=end,
        window_rows=168,
        drift_share=0.75,
        drifted_features=("temp", "atemp"),
        prediction_drifted=True,
        report_uri="s3://driftloop-data/drift-reports/r.json",
    )


def test_the_trigger_conf_is_a_valid_request() -> None:
    event = drift_event()
    conf = {
        **dag_run_conf(event),
        "postgres_schema": "t_abc",
        "topic_prefix": "t_abc.",
        "promotion_margin": 0.05,
    }

    request = RetrainRequest.from_conf(conf)

    assert request.model_name == "bikeshare"
    assert request.model_version == 3
    assert request.episode_id == event.episode_id
    assert request.event_id == event.event_id
    assert request.window_end == event.window_end
    assert request.drifted_features == ("temp", "atemp")
    assert request.postgres_schema == "t_abc"
    assert request.topic_prefix == "t_abc."
    # And it survives the trip through XCom.
    assert RetrainRequest.model_validate(request.model_dump(mode="json")) == request


def test_unknown_conf_keys_are_ignored_but_logged(caplog: pytest.LogCaptureFixture) -> None:
    request = RetrainRequest.from_conf(
        {"model_name": "bikeshare", "postgres_shema": "t_x", "promotion_margin": 0.1}
    )

    assert request.postgres_schema == "public"
    assert "['postgres_shema']" in caplog.text


def test_a_manual_run_needs_only_the_model_name() -> None:
    request = RetrainRequest.from_conf({"model_name": "bikeshare"})

    assert request.model_version is None
    assert request.episode_id is None
    assert request.postgres_schema == "public"
    assert request.topic_prefix is None


@pytest.mark.parametrize(
    ("conf", "problem"),
    [
        (None, "model_name: Field required"),
        ({}, "model_name: Field required"),
        ({"model_version": 2}, "model_name: Field required"),
        ({"model_name": "bike share!"}, "model_name: String should match pattern"),
        ({"model_name": ""}, "model_name"),
        ({"model_name": "bikeshare", "postgres_schema": "public; DROP TABLE x"}, "postgres_schema"),
        ({"model_name": "bikeshare", "postgres_schema": "Public"}, "postgres_schema"),
        ({"model_name": "bikeshare", "model_version": 0}, "model_version"),
        ({"model_name": "bikeshare", "model_version": "2"}, "model_version"),
        ({"model_name": "bikeshare", "topic_prefix": "a b"}, "topic_prefix"),
        ({"model_name": "bikeshare", "window_end": "yesterday"}, "window_end"),
    ],
)
def test_a_bad_conf_is_refused_with_the_field_named(
    conf: dict[str, Any] | None, problem: str
) -> None:
    with pytest.raises(InvalidRetrainRequestError, match="invalid conf") as raised:
        RetrainRequest.from_conf(conf)

    assert problem in str(raised.value)
    assert isinstance(raised.value, RetrainRefusedError)


def test_extract_refuses_a_bad_conf_before_touching_anything() -> None:
    nowhere = unreachable_connections("sqlite:////nonexistent/never.db")

    with pytest.raises(InvalidRetrainRequestError, match="postgres_schema"):
        retrain.extract_step(
            {"model_name": "bikeshare", "postgres_schema": "no-dashes"},
            {},
            dag_run_id="manual__1",
            cutoff=START,
            connections=nowhere,
        )


def test_work_objects_have_safe_keys() -> None:
    prefix = workspace.work_prefix("bikeshare", "manual__2026-06-01T10:00:00+00:00")

    assert prefix == "retraining/bikeshare/manual__2026-06-01T10_00_00_00_00/"


# --- the training set --------------------------------------------------------------------------


def test_logged_rows_become_typed_features_in_time_order(
    spec: FeatureSpec, summer: pd.DataFrame
) -> None:
    rows = logged_rows(spec, summer.head(30))
    broken = dict(rows[5])
    broken["features"] = orjson.dumps(
        {**orjson.loads(rows[5]["features"]), "mnth": "Smarch"}
    ).decode()
    rows[5] = broken

    frame, skipped = retrain.labelled_frame(spec, list(reversed(rows)))

    assert skipped == 1
    assert len(frame) == 29
    assert frame["predicted_at"].is_monotonic_increasing
    assert list(frame.columns) == [
        "predicted_at",
        "request_id",
        *spec.feature_names,
        trainer.PREDICTION_COLUMN,
        spec.target.name,
    ]
    expected = summer.drop(index=5).head(29).reset_index(drop=True)
    np.testing.assert_allclose(
        trainer.feature_matrix(spec, frame), trainer.feature_matrix(spec, expected)
    )
    np.testing.assert_allclose(trainer.target_vector(spec, frame), expected["bikers"])


def test_training_set_is_the_reference_then_the_older_recent_rows(
    spec: FeatureSpec, summer: pd.DataFrame, tmp_path: Path
) -> None:
    winter = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01")
    booster = trainer.train_booster(spec, winter, num_boost_round=5)
    reference = trainer.reference_frame(
        spec,
        [("train", winter.iloc[:500]), ("holdout", winter.iloc[500:])],
        booster,
        leading_columns=["day"],
    )
    recent, _ = retrain.labelled_frame(spec, logged_rows(spec, summer))
    older, holdout = retrain.split_recent(recent, RetrainPolicy())

    training_set = retrain.assemble_training_set(spec, reference, older)

    assert list(training_set.columns) == [
        retrain.ORIGIN_COLUMN,
        retrain.PREDICTED_AT_COLUMN,
        *spec.feature_names,
        spec.target.name,
    ]
    assert len(training_set) == len(reference) + len(older)
    origins = training_set[retrain.ORIGIN_COLUMN].value_counts().to_dict()
    assert origins == {"seed": len(reference), "logged": len(older)}
    # Seed rows are dated by the dataset's time columns the reference carries (day, hr).
    np.testing.assert_array_equal(
        training_set.loc[: len(reference) - 1, "predicted_at"].to_numpy(),
        trainer.dataset_times(spec, winter).to_numpy(),
    )
    assert training_set.loc[len(reference) :, "predicted_at"].notna().all()
    # Without the time columns a seed row has no time.
    undated = retrain.assemble_training_set(spec, reference.drop(columns=["day"]), older)
    assert undated.loc[: len(reference) - 1, "predicted_at"].isna().all()
    # Through Parquet (the work objects) and into a model, unchanged.
    path = tmp_path / "train.parquet"
    training_set.to_parquet(path, index=False)
    again = pd.read_parquet(path)
    np.testing.assert_allclose(
        trainer.feature_matrix(spec, again), trainer.feature_matrix(spec, training_set)
    )
    challenger = trainer.train_booster(spec, again, num_boost_round=30)

    # The challenger's reference is its training set and the holdout; a second generation
    # keeps the origin and time of the rows the first one took from the log.
    holdout_rows = retrain.holdout_frame(spec, holdout)
    its_reference = retrain.challenger_reference(spec, again, holdout_rows, challenger)
    assert its_reference["split"].value_counts().to_dict() == {
        "train": len(training_set),
        "holdout": len(holdout),
    }
    assert {*spec.feature_names, "prediction", "bikers", "origin"} <= set(its_reference.columns)
    next_set = retrain.assemble_training_set(spec, its_reference, older.head(10))
    assert next_set["origin"].value_counts().to_dict() == {
        "seed": len(reference),
        "logged": len(older) + len(holdout) + 10,
    }


def test_challenger_trained_on_summer_rows_beats_the_winter_model_on_summer(
    spec: FeatureSpec, summer: pd.DataFrame
) -> None:
    winter = trainer.read_dataset(spec, since="2011-01-01", until="2011-04-01")
    champion = trainer.train_booster(spec, winter, num_boost_round=60)
    reference = trainer.reference_frame(spec, [("train", winter)], champion)
    recent, _ = retrain.labelled_frame(spec, logged_rows(spec, summer))
    older, holdout = retrain.split_recent(recent, RetrainPolicy())
    challenger = trainer.train_booster(
        spec, retrain.assemble_training_set(spec, reference, older), num_boost_round=60
    )

    truth = trainer.target_vector(spec, holdout)
    matrix = trainer.feature_matrix(spec, holdout)
    champion_rmse = retrain.holdout_score(
        RMSE, truth, np.asarray(champion.predict(matrix), dtype=np.float64)
    )
    challenger_rmse = retrain.holdout_score(
        RMSE, truth, np.asarray(challenger.predict(matrix), dtype=np.float64)
    )

    assert judge_challenger(RMSE, challenger_rmse, champion_rmse, 0.02).promote


# --- the decision against a registry -----------------------------------------------------------


def unreachable_connections(tracking_uri: str) -> RetrainConnections:
    return RetrainConnections(
        postgres=PostgresSettings(password=SecretStr("unused"), host="127.0.0.1", port=1),
        object_store=ObjectStoreSettings(
            secret_access_key=SecretStr("unused"), endpoint_url="http://127.0.0.1:1"
        ),
        mlflow=MlflowSettings(tracking_uri=tracking_uri),
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
    )


class Registry:
    """A registered model in a sqlite MLflow registry: champion v1, challenger v2, and v3
    (versions without model files: the decision never loads them)."""

    def __init__(self, uri: str, artifacts: Path) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = self.client.get_experiment_by_name("retrain-unit")
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment("retrain-unit", artifacts.as_uri())
        )
        self.name = f"bikeshare-{uuid.uuid4().hex[:8]}"
        self.client.create_registered_model(self.name)
        self.run_ids = []
        for _ in range(3):
            run_id = self.client.create_run(experiment_id).info.run_id
            self.client.create_model_version(self.name, (artifacts / run_id).as_uri(), run_id)
            self.run_ids.append(run_id)
        self.client.set_registered_model_alias(self.name, trainer.CHAMPION_ALIAS, "1")

    def champion(self) -> int:
        return int(
            self.client.get_model_version_by_alias(self.name, trainer.CHAMPION_ALIAS).version
        )

    def tags(self, version: int) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, str(version)).tags)


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite registry for the module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def registry(registry_uri: str, tmp_path: Path) -> Registry:
    return Registry(registry_uri, tmp_path)


def extracted_for(registry: Registry, margin: float = 0.02) -> Extracted:
    return Extracted(
        request=RetrainRequest(model_name=registry.name, model_version=1, episode_id="ep-1"),
        policy=RetrainPolicy(promotion_margin=margin),
        dag_run_id="drift-ep-1",
        cutoff=START,
        champion_version=1,
        champion_run_id=registry.run_ids[0],
        served_version=1,
        metric_name="rmse",
        greater_is_better=False,
        bucket="driftloop-data",
        prefix="retraining/bikeshare-unit/drift-ep-1/",
        reference_rows=2000,
        recent_rows=1000,
        skipped_rows=0,
        recent_training_rows=750,
        history_rows=2750,
        data_policy="all history",
        holdout_rows=250,
        holdout_start=START,
        holdout_end=START + timedelta(hours=249),
    )


def challenger_of(registry: Registry) -> Challenger:
    return Challenger(model_name=registry.name, version=2, run_id=registry.run_ids[1], reused=False)


def evaluation_of(challenger_score: float, champion_score: float = 100.0) -> Evaluation:
    return Evaluation(
        metric_name="rmse",
        greater_is_better=False,
        challenger_version=2,
        challenger_score=challenger_score,
        champion_version=1,
        champion_score=champion_score,
        holdout_rows=250,
    )


class Published:
    def __init__(self) -> None:
        self.events: list[ModelEvent] = []

    def __call__(self, event: object) -> str:
        assert isinstance(event, ModelPromoted | ModelRejected)
        # What consumers read back from the wire.
        self.events.append(decode_model_event(event.to_bytes()))
        return "t.model.events"


def test_a_better_challenger_is_promoted_tagged_and_announced(registry: Registry) -> None:
    published = Published()

    decision = retrain.decide_step(
        extracted_for(registry),
        challenger_of(registry),
        evaluation_of(80.0),
        connections=unreachable_connections(registry.uri),
        publish=published,
    )

    assert decision.outcome is Outcome.PROMOTED
    assert decision.alias_version == 2
    assert registry.champion() == 2
    tags = registry.tags(2)
    assert tags[retrain.DECISION_TAG] == "promoted"
    assert tags[retrain.EPISODE_TAG] == "ep-1"
    assert float(tags[retrain.CHALLENGER_SCORE_TAG]) == 80.0
    [event] = published.events
    assert isinstance(event, ModelPromoted)
    assert (event.model_version, event.champion_version) == (2, 1)
    assert (event.challenger_score, event.champion_score) == (80.0, 100.0)
    assert event.run_id == registry.run_ids[1]
    assert event.episode_id == "ep-1"
    assert event.event_id == decision.event_id


def test_a_retry_after_the_alias_moved_only_announces_again(registry: Registry) -> None:
    first, second = Published(), Published()
    arguments = (extracted_for(registry), challenger_of(registry), evaluation_of(80.0))
    retrain.decide_step(
        *arguments, connections=unreachable_connections(registry.uri), publish=first
    )

    again = retrain.decide_step(
        *arguments, connections=unreachable_connections(registry.uri), publish=second
    )

    assert again.outcome is Outcome.PROMOTED
    assert registry.champion() == 2
    assert [event.event_id for event in second.events] == [first.events[0].event_id]


def test_a_challenger_short_of_the_margin_is_rejected_and_the_champion_stays(
    registry: Registry,
) -> None:
    published = Published()

    decision = retrain.decide_step(
        extracted_for(registry),
        challenger_of(registry),
        evaluation_of(99.0),
        connections=unreachable_connections(registry.uri),
        publish=published,
    )

    assert decision.outcome is Outcome.REJECTED
    assert registry.champion() == 1
    assert registry.tags(2)[retrain.DECISION_TAG] == "rejected"
    assert "short of the 2.0% margin" in registry.tags(2)[retrain.DECISION_REASON_TAG]
    [event] = published.events
    assert isinstance(event, ModelRejected)
    assert event.reason == decision.reason


def test_a_champion_moved_during_the_run_rejects_even_a_better_challenger(
    registry: Registry,
) -> None:
    registry.client.set_registered_model_alias(registry.name, trainer.CHAMPION_ALIAS, "3")
    published = Published()

    decision = retrain.decide_step(
        extracted_for(registry),
        challenger_of(registry),
        evaluation_of(50.0),
        connections=unreachable_connections(registry.uri),
        publish=published,
    )

    assert decision.outcome is Outcome.REJECTED
    assert decision.reason.startswith("champion moved to v3 during the run")
    assert registry.champion() == 3
    assert isinstance(published.events[0], ModelRejected)


def test_mlflow_down_fails_the_decision_without_announcing_anything(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    published = Published()

    with pytest.raises(MlflowException, match=r"127\.0\.0\.1"):
        retrain.decide_step(
            extracted_for(registry),
            challenger_of(registry),
            evaluation_of(50.0),
            connections=unreachable_connections("http://127.0.0.1:1"),
            publish=published,
        )

    assert published.events == []
    assert registry.champion() == 1


def test_decision_events_have_stable_ids() -> None:
    challenger = Challenger(model_name="bikeshare", version=2, run_id="a" * 32, reused=False)
    evaluation = evaluation_of(80.0)

    first = retrain.decision_event(
        Outcome.PROMOTED, challenger=challenger, evaluation=evaluation, episode_id=None, reason="r"
    )
    again = retrain.decision_event(
        Outcome.PROMOTED, challenger=challenger, evaluation=evaluation, episode_id=None, reason="r"
    )
    rejected = retrain.decision_event(
        Outcome.REJECTED, challenger=challenger, evaluation=evaluation, episode_id=None, reason="r"
    )

    assert first.event_id == again.event_id != rejected.event_id
    assert isinstance(rejected, ModelRejected)
    assert first.episode_id is None
    assert isinstance(first.event_id, uuid.UUID)


def test_the_version_of_a_dag_run_is_found_by_its_tag(registry: Registry) -> None:
    run_id = "manual__2026-06-01T10:00:00+00:00"
    registry.client.set_model_version_tag(registry.name, "2", retrain.DAG_RUN_TAG, run_id)

    assert retrain.version_for_dag_run(registry.client, registry.name, run_id) == 2
    assert retrain.version_for_dag_run(registry.client, registry.name, "drift-other") is None
    with pytest.raises(ValueError, match="quote"):
        retrain.version_for_dag_run(registry.client, registry.name, "x' or name != '")


def test_a_retried_train_reuses_the_version_registered_for_the_run(registry: Registry) -> None:
    extracted = extracted_for(registry)
    registry.client.set_model_version_tag(
        registry.name, "2", retrain.DAG_RUN_TAG, extracted.dag_run_id
    )

    # Nothing else is reachable: the step must not read the work objects or train again.
    challenger = retrain.train_step(extracted, connections=unreachable_connections(registry.uri))

    assert challenger == Challenger(
        model_name=registry.name, version=2, run_id=registry.run_ids[1], reused=True
    )
