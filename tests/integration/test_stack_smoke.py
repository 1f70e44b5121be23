"""Smoke suite: every service of the stack is real and reachable the way the platform uses it."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import mlflow
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from mlflow.tracking import MlflowClient

from driftloop.events import kafka
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)
from driftloop.storage.database import create_pool
from driftloop.storage.objectstore import s3_client
from driftloop_tools.stack.settings import StackSettings
from schemas.events import PredictionEvent


async def _create_topic(settings: KafkaSettings, name: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def test_typed_event_round_trips_through_kafka(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    topic = f"{unique}.predictions"
    await _create_topic(kafka_settings, topic)
    sent = PredictionEvent(
        request_id=f"req-{unique}",
        model_name="bikeshare",
        model_version=1,
        run_id=uuid.uuid4().hex,
        features={"temp": 0.24, "hr": 7, "weathersit": "clear"},
        prediction=42.5,
        latency_ms=1.25,
        source="http",
    )
    producer = kafka.producer(kafka_settings, f"smoke-{unique}")
    await kafka.start_with_retry(producer, kafka_settings, give_up_after_seconds=30)
    try:
        metadata = await producer.send_and_wait(
            topic, sent.to_bytes(), key=sent.request_id.encode()
        )
    finally:
        await producer.stop()

    consumer = kafka.consumer(kafka_settings, f"smoke-{unique}", topic)
    await kafka.start_with_retry(consumer, kafka_settings, give_up_after_seconds=30)
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
    finally:
        await consumer.stop()

    received = PredictionEvent.from_bytes(record.value)
    assert received == sent
    assert record.key == sent.request_id.encode()
    assert (record.partition, record.offset) == (metadata.partition, metadata.offset)


async def test_postgres_write_and_read(postgres_settings: PostgresSettings, unique: str) -> None:
    pool = await create_pool(postgres_settings, give_up_after_seconds=30)
    try:
        async with pool.acquire() as connection:
            await connection.execute(
                f"CREATE TEMP TABLE {unique} (request_id text PRIMARY KEY, prediction float8)"
            )
            await connection.copy_records_to_table(
                unique, records=[("a", 1.5), ("b", 2.5)], columns=["request_id", "prediction"]
            )
            rows = await connection.fetch(f"SELECT * FROM {unique} ORDER BY request_id")  # noqa: S608
            version = await connection.fetchval("SHOW server_version")
    finally:
        await pool.close()
    assert [tuple(row) for row in rows] == [("a", 1.5), ("b", 2.5)]
    assert int(version.split(".")[0]) >= 15


async def test_object_store_put_and_get(
    object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    key = f"smoke/{unique}/hello.txt"
    body = f"driftloop {unique}".encode()
    async with s3_client(object_store_settings) as client:
        await client.put_object(Bucket=object_store_settings.data_bucket, Key=key, Body=body)
        response = await client.get_object(Bucket=object_store_settings.data_bucket, Key=key)
        async with response["Body"] as stream:
            fetched = await stream.read()
        listing = await client.list_objects_v2(
            Bucket=object_store_settings.data_bucket, Prefix=f"smoke/{unique}/"
        )
        await client.delete_object(Bucket=object_store_settings.data_bucket, Key=key)
    assert fetched == body
    assert [item["Key"] for item in listing["Contents"]] == [key]


async def test_mlflow_run_artifact_lands_in_object_store(
    mlflow_settings: MlflowSettings,
    object_store_settings: ObjectStoreSettings,
    unique: str,
    tmp_path: Path,
) -> None:
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    client = MlflowClient(mlflow_settings.tracking_uri)
    experiment_id = client.create_experiment(f"smoke-{unique}")
    artifact = tmp_path / "notes.txt"
    artifact.write_text(f"smoke artifact {unique}\n")
    with mlflow.start_run(experiment_id=experiment_id, run_name=unique) as run:
        mlflow.log_param("kind", "smoke")
        mlflow.log_metric("rmse", 1.25)
        mlflow.log_artifact(str(artifact))
    stored = client.get_run(run.info.run_id)
    assert stored.data.metrics["rmse"] == 1.25
    assert [item.path for item in client.list_artifacts(run.info.run_id)] == ["notes.txt"]

    # The server proxies artifacts to its S3 destination: the object must be in the bucket.
    async with s3_client(object_store_settings) as s3:
        listing = await s3.list_objects_v2(
            Bucket=object_store_settings.mlflow_bucket, Prefix=f"{experiment_id}/"
        )
    keys = [item["Key"] for item in listing.get("Contents", [])]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/notes.txt") for key in keys), keys


async def _wait_for_dag(client: httpx.AsyncClient, dag_id: str, within_seconds: float) -> None:
    deadline = time.monotonic() + within_seconds
    while (response := await client.get(f"/api/v2/dags/{dag_id}")).status_code != 200:
        assert time.monotonic() < deadline, f"{dag_id} never parsed: {response.text}"
        await asyncio.sleep(1)


async def test_airflow_lists_dags_and_runs_one(
    airflow_client: httpx.AsyncClient, unique: str
) -> None:
    dag_id = "platform_healthcheck"
    await _wait_for_dag(airflow_client, dag_id, within_seconds=120)
    listing = await airflow_client.get("/api/v2/dags", params={"limit": 100})
    assert listing.status_code == 200
    assert dag_id in {dag["dag_id"] for dag in listing.json()["dags"]}

    run_id = f"smoke-{unique}"
    created = await airflow_client.post(
        f"/api/v2/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None}
    )
    assert created.status_code == 200, created.text
    # The same run id again is refused: this is what makes triggers idempotent.
    repeated = await airflow_client.post(
        f"/api/v2/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None}
    )
    assert repeated.status_code == 409

    deadline = time.monotonic() + 180
    state = "queued"
    while state not in {"success", "failed"}:
        assert time.monotonic() < deadline, f"run {run_id} still {state}"
        await asyncio.sleep(1)
        try:
            run = await airflow_client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        except httpx.ReadTimeout:
            continue  # a busy api-server on a loaded machine; the deadline still bounds us
        state = run.json()["state"]
    assert state == "success"


async def test_prometheus_answers_queries(stack_settings: StackSettings) -> None:
    base = f"http://127.0.0.1:{stack_settings.prometheus_port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        deadline = time.monotonic() + 60
        while True:
            response = await client.get("/api/v1/query", params={"query": 'up{job="prometheus"}'})
            assert response.status_code == 200
            result = response.json()["data"]["result"]
            if result:
                break
            assert time.monotonic() < deadline, "Prometheus never scraped itself"
            await asyncio.sleep(1)
    assert result[0]["value"][1] == "1"


@pytest.mark.parametrize(
    "service", ["postgres", "kafka", "s3proxy", "mlflow", "airflow", "prometheus"]
)
async def test_stack_reports_every_service_ready(
    stack_settings: StackSettings, service: str
) -> None:
    from driftloop_tools.stack.readiness import check

    readiness = await check(service, stack_settings)
    assert readiness.ready, readiness.detail
