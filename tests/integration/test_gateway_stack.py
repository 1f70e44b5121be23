"""The gateway on the real stack: real MLflow registry, real Kafka, the real broker stopped."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from driftloop.events import kafka
from driftloop.events.producer import EventProducer
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import trainer
from driftloop_tools.stack.settings import StackSettings
from gateway.app import create_app
from gateway.contract import example_row
from gateway.settings import GatewaySettings
from schemas.events import ModelPromoted, PredictionEvent
from schemas.features import FeatureSpec, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import supervisorctl

ROW: dict[str, Any] = example_row(load_feature_spec("bikeshare"))


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


def _register(
    spec: FeatureSpec, mlflow_settings: MlflowSettings, name: str, rounds: int, work_dir: Path
) -> trainer.RegisteredModel:
    return trainer.train_champion(
        spec,
        trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01"),
        tracking_uri=mlflow_settings.tracking_uri,
        model_name=name,
        work_dir=work_dir,
        num_boost_round=rounds,
    )


async def _eventually(check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def _read_predictions(
    settings: KafkaSettings, expected: int, *, quiet_seconds: float = 3.0, within: float = 90.0
) -> list[PredictionEvent]:
    """Every event on the predictions topic: until ``expected`` arrived and then a quiet spell."""
    consumer = kafka.consumer(
        settings, f"gateway-test-{uuid.uuid4().hex[:8]}", settings.topic(Topic.PREDICTIONS)
    )
    await kafka.start_with_retry(consumer, settings, give_up_after_seconds=60)
    events: list[PredictionEvent] = []
    deadline = time.monotonic() + within
    try:
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            records = [record for batch in batches.values() for record in batch]
            events += [PredictionEvent.from_bytes(record.value) for record in records]
            if records:
                quiet_since = time.monotonic()
            elif len(events) >= expected and time.monotonic() - quiet_since > quiet_seconds:
                break
    finally:
        await consumer.stop()
    return events


@pytest.fixture
async def gateway(
    spec: FeatureSpec,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    unique: str,
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, GatewaySettings]]:
    """A gateway on a champion registered for this test, publishing to its own topics."""
    name = f"gw-{unique}"
    await asyncio.to_thread(_register, spec, mlflow_settings, name, 20, tmp_path)
    topics = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await kafka.create_topics(topics, [Topic.PREDICTIONS, Topic.MODEL_EVENTS])
    settings = GatewaySettings(
        admin_token=SecretStr("integration-admin-token"),
        model_name=name,
        model_cache_dir=tmp_path / "models",
        spool_path=tmp_path / "spool.sqlite3",
        model_poll_seconds=3600,  # promotions must arrive through model.events
        kafka_timeout_seconds=3.0,
        kafka=topics,
        mlflow=mlflow_settings,
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
        ) as client,
    ):
        yield client, settings


async def test_one_prediction_event_per_row(
    gateway: tuple[httpx.AsyncClient, GatewaySettings],
) -> None:
    client, settings = gateway
    expected_ids: list[str] = []
    for index in range(10):
        single = await client.post("/predict", json=ROW, headers={"X-Request-ID": f"one-{index}"})
        assert single.status_code == 200, single.text
        expected_ids.append(f"one-{index}")
    rows = await client.post("/predict", json=[ROW] * 5, headers={"X-Request-ID": "many"})
    assert rows.status_code == 200, rows.text
    expected_ids += [f"many:{index}" for index in range(5)]

    events = await _read_predictions(settings.kafka, len(expected_ids))

    assert sorted(event.request_id for event in events) == sorted(expected_ids)
    assert {event.model_name for event in events} == {settings.model_name}
    assert {event.source for event in events} == {"http"}


async def test_broker_outage_loses_nothing(
    gateway: tuple[httpx.AsyncClient, GatewaySettings], stack_settings: StackSettings
) -> None:
    client, settings = gateway
    sent: list[str] = []
    statuses: list[int] = []

    async def predict(request_id: str) -> None:
        response = await client.post("/predict", json=ROW, headers={"X-Request-ID": request_id})
        statuses.append(response.status_code)
        sent.append(request_id)

    for index in range(10):
        await predict(f"before-{index}")
    await asyncio.to_thread(supervisorctl, stack_settings, "stop", "kafka")
    try:
        for index in range(60):
            await predict(f"during-{index}")
            await asyncio.sleep(0.05)

        async def spooling() -> bool:
            return bool((await client.get("/health/ready")).json()["spool_depth"] > 0)

        await _eventually(spooling, within=30)
    finally:
        await asyncio.to_thread(supervisorctl, stack_settings, "start", "kafka")
    for index in range(10):
        await predict(f"after-{index}")

    async def drained() -> bool:
        ready = (await client.get("/health/ready")).json()
        return bool(ready["spool_depth"] == 0 and ready["kafka"] == "direct")

    await _eventually(drained, within=120)
    events = await _read_predictions(settings.kafka, len(sent))

    assert statuses == [200] * len(sent)
    assert {event.request_id for event in events} == set(sent)


async def test_promotion_event_swaps_the_model_without_failures(
    gateway: tuple[httpx.AsyncClient, GatewaySettings],
    spec: FeatureSpec,
    mlflow_settings: MlflowSettings,
    tmp_path: Path,
) -> None:
    client, settings = gateway
    assert settings.model_name is not None

    async def following() -> bool:
        return bool((await client.get("/health/ready")).json()["model_events"] == "following")

    await _eventually(following, within=30)
    first = (await client.get("/models/current")).json()
    statuses: list[int] = []
    versions: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            response = await client.post("/predict", json=ROW)
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.append(response.json()["model_version"])
            await asyncio.sleep(0.01)

    load = asyncio.create_task(traffic())
    try:
        challenger = await asyncio.to_thread(
            _register, spec, mlflow_settings, settings.model_name, 40, tmp_path
        )
        producer = EventProducer(settings.kafka, "gateway-test")
        await producer.start(give_up_after_seconds=60)
        try:
            promoted = ModelPromoted(
                model_name=challenger.name,
                model_version=challenger.version,
                run_id=challenger.run_id,
                champion_version=first["version"],
                metric_name="rmse",
                greater_is_better=False,
                challenger_score=1.0,
                champion_score=2.0,
            )
            await producer.send_event(settings.kafka.topic(Topic.MODEL_EVENTS), promoted)
        finally:
            await producer.close()

        async def serving_challenger() -> bool:
            current = (await client.get("/models/current")).json()
            return bool(current["version"] == challenger.version)

        await _eventually(serving_challenger, within=60)
        await _eventually(lambda: _has_version(versions, challenger.version), within=10)
    finally:
        stop.set()
        await load

    assert statuses
    assert set(statuses) == {200}
    assert versions[0] == first["version"]
    assert versions[-1] == challenger.version


async def _has_version(versions: list[int], version: int) -> bool:
    return version in versions
