"""retrain_model on the real stack: Airflow runs the DAG against MLflow, Postgres, S3 and Kafka.

Each test bootstraps its own champion (winter data) under a unique registered model name, logs
summer traffic served by it into its own Postgres schema, triggers the DAG over the REST API
with that schema and its own topic prefix in the conf, waits for the run to finish, then reads
the registry, ``model.events`` and the object store.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from consumers.retrain_trigger import dag_run_conf
from driftloop.events.kafka import create_topics
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)
from driftloop.storage.database import open_migrated_pool
from driftloop.storage.hot_store import ensure_partitions, partition_day
from driftloop.storage.objectstore import s3_client
from driftloop.training import bootstrap, retrain, trainer, workspace
from schemas.events import (
    DriftDetected,
    ModelEvent,
    ModelPromoted,
    ModelRejected,
    decode_model_event,
)
from schemas.features import FeatureSpec, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import eventually, read_topic

DAG_ID = "retrain_model"
SUMMER = ("2011-06-01", "2011-08-01")


@dataclass
class RetrainSetup:
    unique: str
    spec: FeatureSpec
    model_name: str
    champion: trainer.RegisteredModel
    uri: str
    kafka: KafkaSettings
    pool: asyncpg.Pool
    object_store: ObjectStoreSettings
    tmp_path: Path

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @property
    def topic(self) -> str:
        return self.kafka.topic(Topic.MODEL_EVENTS)

    def conf(self, **extra: Any) -> dict[str, Any]:
        """The retrain-trigger's conf for a summer drift episode, pointed at this test's data."""
        end = datetime.now(UTC).replace(microsecond=0)
        event = DriftDetected(
            model_name=self.model_name,
            model_version=self.champion.version,
            episode_id=f"{self.model_name}:{self.champion.version}:summer",
            window_start=end - timedelta(hours=168),
            window_end=end,
            window_rows=168,
            drift_share=0.75,
            drifted_features=("temp", "atemp"),
            prediction_drifted=True,
            report_uri=f"s3://driftloop-data/tests/{self.unique}/report.json",
        )
        return {
            **dag_run_conf(event),
            "postgres_schema": self.unique,
            "topic_prefix": self.kafka.topic_prefix,
            **extra,
        }

    async def log_served_rows(self, span: tuple[str, str], *, labelled: int | None = None) -> int:
        """Log the hours of the ``(since, until)`` span as served by the champion (its real
        predictions), minutes apart and ending now, with the true ``bikers`` as labels for the
        first ``labelled`` (all by default); returns the rows logged."""
        frame = trainer.read_dataset(self.spec, since=span[0], until=span[1])
        champion = await asyncio.to_thread(
            retrain.load_version,
            self.uri,
            self.model_name,
            self.champion.version,
            self.tmp_path / "champion",
        )
        predictions = champion.predict(trainer.feature_matrix(self.spec, frame))
        first = datetime.now(UTC) - timedelta(minutes=len(frame) + 1)
        predictions_rows = []
        label_rows = []
        for position, record in enumerate(frame.to_dict(orient="records")):
            request_id = f"{self.unique}-{position:05d}"
            predicted_at = first + timedelta(minutes=position)
            features = {name: _plain(record[name]) for name in self.spec.feature_names}
            predictions_rows.append(
                (
                    request_id,
                    uuid.uuid4(),
                    predicted_at,
                    self.model_name,
                    self.champion.version,
                    self.champion.run_id,
                    orjson.dumps(features).decode(),
                    float(predictions[position]),
                    1.0,
                    "batch",
                    0,
                    position,
                )
            )
            if labelled is None or position < labelled:
                label_rows.append(
                    (request_id, predicted_at, float(record["bikers"]), predicted_at, uuid.uuid4())
                )
        async with self.pool.acquire() as connection:
            # The log is partitioned by day of prediction time: the days these rows fall in.
            await ensure_partitions(connection, {partition_day(row[2]) for row in predictions_rows})
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.executemany(
                """
                INSERT INTO prediction_log (request_id, event_id, predicted_at, model_name,
                    model_version, run_id, features, prediction, latency_ms, source,
                    kafka_partition, kafka_offset)
                VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12)
                """,
                predictions_rows,
            )
            await connection.executemany(
                "INSERT INTO labels (request_id, predicted_at, label, observed_at, event_id) "
                "VALUES ($1, $2, $3, $4, $5)",
                label_rows,
            )
        return len(frame)

    async def work_objects(self) -> list[str]:
        async with s3_client(self.object_store) as s3:
            listing = await s3.list_objects_v2(
                Bucket=self.object_store.data_bucket,
                Prefix=f"{workspace.WORK_PREFIX}/{self.model_name}/",
            )
        return [item["Key"] for item in listing.get("Contents", [])]

    def versions(self) -> list[int]:
        found = self.client.search_model_versions(f"name = '{self.model_name}'")
        return sorted(int(version.version) for version in found)


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


@pytest.fixture
async def retrain_dag(airflow_client: httpx.AsyncClient) -> None:
    """The DAG is parsed by the stack's dag-processor (within ~10-20 s of a new file)."""

    async def parsed() -> bool:
        response = await airflow_client.get(f"/api/v2/dags/{DAG_ID}")
        return response.status_code == 200 and not response.json()["is_paused"]

    await eventually(parsed, within=120, what=f"Airflow to know the DAG {DAG_ID}")


@pytest.fixture
async def setup(
    retrain_dag: None,
    unique: str,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    kafka_settings: KafkaSettings,
    object_store_settings: ObjectStoreSettings,
    tmp_path: Path,
) -> AsyncIterator[RetrainSetup]:
    spec = load_feature_spec("bikeshare")
    uri = mlflow_settings.tracking_uri
    name = f"retrain-{unique}"
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.MODEL_EVENTS])
    result = await asyncio.to_thread(
        bootstrap.bootstrap_model, spec, tracking_uri=uri, model_name=name, num_boost_round=100
    )
    pool = await open_migrated_pool(postgres_settings, unique)
    try:
        yield RetrainSetup(
            unique=unique,
            spec=spec,
            model_name=name,
            champion=result.model,
            uri=uri,
            kafka=kafka,
            pool=pool,
            object_store=object_store_settings,
            tmp_path=tmp_path,
        )
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await pool.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await pool.close()
        MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model(name)


async def run_dag(
    client: httpx.AsyncClient, run_id: str, conf: dict[str, Any], *, within: float = 600
) -> dict[str, Any]:
    """Trigger a run and poll it to a terminal state; returns the run as the API shows it."""
    response = await client.post(
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        json={"dag_run_id": run_id, "logical_date": None, "conf": conf},
    )
    assert response.status_code == 200, response.text
    started = time.monotonic()
    run: dict[str, Any] = {}

    async def finished() -> bool:
        nonlocal run
        answer = await client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        assert answer.status_code == 200, answer.text
        run = answer.json()
        return run["state"] in {"success", "failed"}

    await eventually(finished, within=within, what=f"DAG run {run_id} to finish")
    # Reported, never asserted: the timing depends on the machine and on queued runs.
    print(f"{run_id}: {run['state']} after {time.monotonic() - started:.1f} s")  # noqa: T201
    return run


async def task_instances(client: httpx.AsyncClient, run_id: str) -> dict[str, dict[str, Any]]:
    response = await client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    assert response.status_code == 200, response.text
    return {item["task_id"]: item for item in response.json()["task_instances"]}


async def task_log(client: httpx.AsyncClient, run_id: str, task_id: str, attempt: int) -> str:
    response = await client.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{attempt}",
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    return response.text


async def decisions(setup: RetrainSetup, expected: int) -> list[ModelEvent]:
    records = await read_topic(setup.kafka, setup.topic, expected=expected, within=30)
    return [decode_model_event(record.value) for record in records]


async def test_a_better_challenger_is_promoted_and_announced(
    setup: RetrainSetup, airflow_client: httpx.AsyncClient
) -> None:
    logged = await setup.log_served_rows(SUMMER)
    run_id = f"test-{setup.unique}-promote"
    conf = setup.conf(promotion_margin=0.02)

    run = await run_dag(airflow_client, run_id, conf)

    states = {
        task: item["state"] for task, item in (await task_instances(airflow_client, run_id)).items()
    }
    assert run["state"] == "success", states
    assert states == dict.fromkeys(["extract", "train", "evaluate", "decide", "cleanup"], "success")
    challenger = setup.champion.version + 1
    assert setup.versions() == [setup.champion.version, challenger]
    assert trainer.current_champion(setup.uri, setup.model_name) == challenger
    [event] = await decisions(setup, expected=1)
    assert isinstance(event, ModelPromoted)
    assert event.model_name == setup.model_name
    assert event.model_version == challenger
    assert event.champion_version == setup.champion.version
    assert event.metric_name == "rmse"
    assert event.greater_is_better is False
    assert event.champion_score is not None
    assert event.challenger_score <= event.champion_score * (1 - 0.02)
    assert event.episode_id == conf["episode_id"]
    version = setup.client.get_model_version(setup.model_name, str(challenger))
    assert version.run_id == event.run_id
    assert version.tags[retrain.DECISION_TAG] == "promoted"
    assert version.tags[retrain.DAG_RUN_TAG] == run_id
    assert version.tags[retrain.EPISODE_TAG] == conf["episode_id"]
    run_data = setup.client.get_run(event.run_id).data
    assert run_data.metrics["holdout_rmse"] == pytest.approx(event.challenger_score)
    assert run_data.metrics["champion_holdout_rmse"] == pytest.approx(event.champion_score)
    assert run_data.params["promotion_margin"] == "0.02"
    # The drift monitor and the next retraining find the challenger's reference.
    reference = await asyncio.to_thread(
        trainer.load_reference, setup.uri, setup.model_name, challenger
    )
    # bikeshare's training-data policy keeps the last 90 days of prediction time (as long as
    # its first model learned): the logged rows, minutes old, stay; the winter seed rows, dated
    # 2011, are out. The reference is the challenger's own training data and holdout.
    assert setup.spec.training_data.last_days == 90
    assert len(reference) == logged
    holdout_rows = int((reference["split"] == "holdout").sum())
    assert holdout_rows == int(np.ceil(logged * 0.25))
    assert reference["origin"].value_counts().to_dict() == {"logged": logged}
    assert {*setup.spec.feature_names, "prediction", "bikers"} <= set(reference.columns)
    assert await setup.work_objects() == []


async def test_a_challenger_short_of_a_huge_margin_is_rejected_on_a_manual_run(
    setup: RetrainSetup, airflow_client: httpx.AsyncClient
) -> None:
    await setup.log_served_rows(SUMMER)
    run_id = f"test-{setup.unique}-reject"
    # A person's run: no drift episode, no version; the data and topic of this test.
    conf = {
        "model_name": setup.model_name,
        "postgres_schema": setup.unique,
        "topic_prefix": setup.kafka.topic_prefix,
        "promotion_margin": 0.99,
    }

    run = await run_dag(airflow_client, run_id, conf)

    assert run["state"] == "success"
    challenger = setup.champion.version + 1
    assert trainer.current_champion(setup.uri, setup.model_name) == setup.champion.version
    [event] = await decisions(setup, expected=1)
    assert isinstance(event, ModelRejected)
    assert event.model_version == challenger
    assert event.champion_version == setup.champion.version
    assert event.episode_id is None
    assert "short of the 99.0% margin" in event.reason
    tags = setup.client.get_model_version(setup.model_name, str(challenger)).tags
    assert tags[retrain.DECISION_TAG] == "rejected"
    assert tags[retrain.DECISION_REASON_TAG] == event.reason


async def test_too_few_labels_fails_at_once_and_the_champion_stays(
    setup: RetrainSetup, airflow_client: httpx.AsyncClient
) -> None:
    # Plenty of served rows, but labels for only 120 of them (the policy needs 200).
    await setup.log_served_rows(("2011-06-01", "2011-07-01"), labelled=120)
    run_id = f"test-{setup.unique}-few-labels"

    run = await run_dag(airflow_client, run_id, setup.conf())

    assert run["state"] == "failed"
    tasks = await task_instances(airflow_client, run_id)
    assert tasks["extract"]["state"] == "failed"
    assert tasks["extract"]["try_number"] == 1, "a refusal must not be retried"
    assert tasks["train"]["state"] == "upstream_failed"
    assert tasks["decide"]["state"] == "upstream_failed"
    log = await task_log(airflow_client, run_id, "extract", 1)
    assert "too few labels to retrain: 120 labelled rows" in log
    assert setup.versions() == [setup.champion.version]
    assert trainer.current_champion(setup.uri, setup.model_name) == setup.champion.version
    assert await read_topic(setup.kafka, setup.topic, expected=1, within=3) == []


async def test_airflow_refuses_a_policy_param_of_the_wrong_type_at_trigger(
    retrain_dag: None, airflow_client: httpx.AsyncClient, unique: str
) -> None:
    response = await airflow_client.post(
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        json={
            "dag_run_id": f"test-{unique}-bad-param",
            "logical_date": None,
            "conf": {"model_name": f"retrain-{unique}", "promotion_margin": 1.5},
        },
    )

    assert response.status_code == 400, response.text
    assert "promotion_margin" in response.text
    missing = await airflow_client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/test-{unique}-bad-param")
    assert missing.status_code == 404


def test_summer_rows_are_enough_for_the_default_policy() -> None:
    """The fixture data meets the defaults the DAG runs with (guards the tests above)."""
    frame: pd.DataFrame = trainer.read_dataset(
        load_feature_spec("bikeshare"), since=SUMMER[0], until=SUMMER[1]
    )

    assert len(frame) >= 4 * 200


async def test_the_steps_train_on_the_declared_history_and_log_it_as_the_reference(
    setup: RetrainSetup,
    postgres_settings: PostgresSettings,
    mlflow_settings: MlflowSettings,
) -> None:
    # The stack's Airflow runs the DAG from its own checkout: the steps are called here
    # directly, against the same Postgres, object store and MLflow, to test this code's.
    await setup.log_served_rows(SUMMER)
    connections = retrain.RetrainConnections(
        postgres=postgres_settings,
        object_store=setup.object_store,
        mlflow=mlflow_settings,
        kafka=setup.kafka,
    )
    run_id = f"steps-{setup.unique}"
    cutoff = datetime.now(UTC)
    extracted = await asyncio.to_thread(
        retrain.extract_step,
        setup.conf(),
        {},
        dag_run_id=run_id,
        cutoff=cutoff,
        connections=connections,
    )
    try:
        # bikeshare learns as many days as its first model did. The logged rows are today's
        # (minutes apart), the first model's seed rows are dated 2011 by the dataset: the
        # span keeps only the logged rows older than the holdout.
        assert extracted.data_policy == "last 90 days"
        assert not extracted.weighted
        assert extracted.reference_rows > 0
        assert extracted.history_rows == extracted.recent_training_rows
        challenger = await asyncio.to_thread(retrain.train_step, extracted, connections=connections)
        # The new version's reference is its own training data and the holdout, nothing else.
        reference = await asyncio.to_thread(
            trainer.load_reference, setup.uri, setup.model_name, challenger.version
        )
        assert len(reference) == extracted.history_rows + extracted.holdout_rows
        assert set(reference[retrain.ORIGIN_COLUMN]) == {retrain.LOGGED_ORIGIN}
        times = pd.to_datetime(reference[retrain.PREDICTED_AT_COLUMN], utc=True)
        assert times.min() > pd.Timestamp(cutoff) - pd.Timedelta(days=90)
        assert reference[trainer.SPLIT_COLUMN].value_counts().to_dict() == {
            "train": extracted.history_rows,
            "holdout": extracted.holdout_rows,
        }
    finally:
        await asyncio.to_thread(
            workspace.delete_work_objects,
            extracted.bucket,
            extracted.prefix,
            settings=setup.object_store,
        )
