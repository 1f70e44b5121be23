"""Fixtures that reach the real local stack (`make up`): no mocks of Kafka, Postgres, S3,
MLflow, Airflow or Prometheus here. Every test gets unique topic / group / key prefixes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from driftloop.drift.store import DriftStore, open_drift_store
from driftloop.settings import (
    AirflowApiSettings,
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
    load_settings,
)
from driftloop_tools.demo.replay import wait_for_champion
from driftloop_tools.stack.settings import StackSettings
from gateway.settings import GatewaySettings
from schemas.features import declared_feature_specs, load_feature_spec
from tests.integration.consumer_support import drop_test_schema, ensure_champion


@pytest.fixture(scope="session")
def stack_settings() -> StackSettings:
    return load_settings(StackSettings)


@pytest.fixture
def unique() -> str:
    """A short unique token for topic names, consumer groups, object keys and run names."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def kafka_settings() -> KafkaSettings:
    return load_settings(KafkaSettings)


@pytest.fixture(scope="session")
def postgres_settings() -> PostgresSettings:
    return load_settings(PostgresSettings)


@pytest.fixture(scope="session")
def object_store_settings() -> ObjectStoreSettings:
    return load_settings(ObjectStoreSettings)


@pytest.fixture(scope="session")
def mlflow_settings() -> MlflowSettings:
    return load_settings(MlflowSettings)


@pytest.fixture(scope="session")
def airflow_settings() -> AirflowApiSettings:
    return load_settings(AirflowApiSettings)


@pytest.fixture
async def airflow_client(airflow_settings: AirflowApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on Airflow's REST API, authenticated with a token from /auth/token."""
    base = airflow_settings.url.rstrip("/")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post(
            "/auth/token",
            json={
                "username": airflow_settings.username,
                "password": airflow_settings.password.get_secret_value(),
            },
        )
        assert response.status_code in {200, 201}, response.text
        client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        yield client


@pytest.fixture
async def served_champion(
    stack_settings: StackSettings,
    mlflow_settings: MlflowSettings,
    kafka_settings: KafkaSettings,
) -> str:
    """The stack gateway's model, with a champion it serves (a fresh stack has none): its name.

    Without one, /predict answers 503 and /health/ready says not ready, as they should.
    """
    gateway = load_settings(GatewaySettings)
    spec = load_feature_spec(gateway.feature_spec)
    model = gateway.model_name or spec.registered_model_name
    await ensure_champion(spec, model, mlflow_settings, kafka_settings)
    # Every other declared model the gateway serves gets its first version too (a model without
    # one answers its /models/{name}/predict with 503).
    for name in declared_feature_specs():
        other = load_feature_spec(name)
        if other.registered_model_name != model:
            await ensure_champion(
                other, other.registered_model_name, mlflow_settings, kafka_settings
            )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack_settings.gateway_port}", timeout=10
    ) as client:
        await wait_for_champion(client, timeout_seconds=120)
        await wait_for_every_champion(client, timeout_seconds=120)
    return model


async def wait_for_every_champion(client: httpx.AsyncClient, *, timeout_seconds: float) -> None:
    """Poll GET /models until every model the gateway serves has a champion loaded."""
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while True:
        models = (await client.get("/models")).json()["models"]
        if all(model["champion"] is not None for model in models):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"models without a champion: {models}")
        await asyncio.sleep(0.5)


@pytest.fixture
async def drift_store(
    postgres_settings: PostgresSettings, unique: str
) -> AsyncIterator[DriftStore]:
    """The drift tables in the test's own Postgres schema, dropped afterwards."""
    store = await open_drift_store(postgres_settings, unique)
    try:
        yield store
    finally:
        await store.close()
        await drop_test_schema(postgres_settings, unique)
