"""Shadow evidence and rollback on the real stack: real Kafka, Postgres, MLflow and processes.

A good first champion (v1) and a bad one promoted over it (v2, trained on shuffled labels: what
a holdout that got it wrong would let through) serve live traffic through a gateway; the
feature-logger logs the predictions and their labels; the shadow-scorer scores v1 in shadow on
the predictions stream and judges v2 over its first labelled rows. v2 is rolled back: the
alias moves to v1, ``ModelRolledBack`` is published, and the gateway serves v1 again without a
failed request. A second test checks that such a bad model passes no gate: the DAG's holdout
evaluation and decision steps, called directly (the stack's Airflow runs main's code), reject it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from driftloop.events import kafka
from driftloop.serving.shadow import RESTORED_FROM_TAG
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings
from driftloop.training import trainer
from driftloop.training.live_judge import LIVE_VERDICT_TAG, ROLLED_BACK
from driftloop.training.retrain import CHAMPION_VERSION_TAG, DECISION_TAG, Outcome
from driftloop_tools.demo.replay import ReplayHour, load_replay_hours
from gateway.app import create_app
from gateway.settings import GatewaySettings
from schemas.events import ModelRolledBack, decode_model_event
from schemas.features import FeatureSpec, LiveEvidence, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    eventually,
    free_port,
    read_to_end,
)

pytestmark = pytest.mark.integration

LIVE_ROWS = 30
TRAFFIC_DAYS = (60, 75)  # March 2011: after both models' training months


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    """Bikeshare, judged live over its first LIVE_ROWS labelled rows (registered with it)."""
    bikeshare = load_feature_spec("bikeshare")
    live = LiveEvidence(rows=LIVE_ROWS, margin=0.05)
    return bikeshare.model_copy(
        update={"training": bikeshare.training.model_copy(update={"live": live})}
    )


def _training_rows(spec: FeatureSpec, *, shuffled: bool) -> object:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    if shuffled:
        target = spec.target.name
        rng = np.random.default_rng(15)
        frame = frame.assign(**{target: rng.permutation(frame[target].to_numpy())})
    return frame


def register(
    spec: FeatureSpec, tracking_uri: str, name: str, work_dir: Path, *, shuffled: bool
) -> trainer.RegisteredModel:
    """A version of ``name`` trained on Jan-Feb, on shuffled labels when asked (not champion)."""
    frame = _training_rows(spec, shuffled=shuffled)
    booster = trainer.train_booster(spec, frame, num_boost_round=40)  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    return trainer.log_and_register(
        booster, spec, tracking_uri=tracking_uri, model_name=name, work_dir=work_dir
    )


def promote_as_the_dag_does(
    tracking_uri: str, model: trainer.RegisteredModel, champion_version: int
) -> None:
    """The alias and the tags ``decide_step`` leaves on a promoted challenger."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    trainer.set_champion(model, tracking_uri=tracking_uri)
    client.set_model_version_tag(model.name, str(model.version), DECISION_TAG, "promoted")
    client.set_model_version_tag(
        model.name, str(model.version), CHAMPION_VERSION_TAG, str(champion_version)
    )


@dataclass
class Loop:
    """The model's versions and the processes around them."""

    name: str
    schema: str
    kafka: KafkaSettings
    good: trainer.RegisteredModel
    bad: trainer.RegisteredModel
    client: httpx.AsyncClient
    shadow_scorer: ConsumerProcess
    feature_logger: ConsumerProcess


@pytest.fixture
async def loop(
    spec: FeatureSpec,
    unique: str,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> AsyncIterator[Loop]:
    name = f"rb-{unique}"
    uri = mlflow_settings.tracking_uri
    good = await asyncio.to_thread(register, spec, uri, name, tmp_path / "v1", shuffled=False)
    trainer.set_champion(good, tracking_uri=uri)
    bad = await asyncio.to_thread(register, spec, uri, name, tmp_path / "v2", shuffled=True)
    await asyncio.to_thread(promote_as_the_dag_does, uri, bad, good.version)

    topics = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await kafka.create_topics(topics, [Topic.PREDICTIONS, Topic.LABELS, Topic.MODEL_EVENTS])
    common = {"KAFKA_TOPIC_PREFIX": topics.topic_prefix}
    feature_logger = ConsumerProcess(
        "consumers.feature_logger",
        {
            **common,
            "FEATURE_LOGGER_GROUP": f"{unique}-feature-logger",
            "FEATURE_LOGGER_DB_SCHEMA": unique,
            "FEATURE_LOGGER_PARQUET_ENABLED": "false",
            "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
        },
        tmp_path / "feature-logger.log",
    ).start()
    shadow_scorer = ConsumerProcess(
        "consumers.shadow_scorer",
        {
            **common,
            "SHADOW_SCORER_GROUP": f"{unique}-shadow-scorer",
            "SHADOW_SCORER_DB_SCHEMA": unique,
            "SHADOW_SCORER_MODELS": name,
            "SHADOW_SCORER_JUDGE_INTERVAL_SECONDS": "1",
            "SHADOW_SCORER_PLAN_POLL_SECONDS": "2",
            "SHADOW_SCORER_MODEL_CACHE_DIR": str(tmp_path / "shadow-models"),
            "SHADOW_SCORER_METRICS_PORT": str(free_port()),
        },
        tmp_path / "shadow-scorer.log",
    ).start()
    settings = GatewaySettings(
        admin_token=SecretStr("integration-admin-token"),
        model_name=name,
        model_cache_dir=tmp_path / "gateway-models",
        spool_path=tmp_path / "spool.sqlite3",
        model_poll_seconds=3600,  # the swap back must arrive through model.events
        kafka_timeout_seconds=3.0,
        kafka=topics,
        mlflow=mlflow_settings,
    )
    app = create_app(settings)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
            ) as client,
        ):
            yield Loop(name, unique, topics, good, bad, client, shadow_scorer, feature_logger)
    finally:
        shadow_scorer.close()
        feature_logger.close()
        connection = await asyncpg.connect(postgres_settings.dsn())
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        finally:
            await connection.close()


async def test_a_promotion_that_loses_live_is_rolled_back_without_a_failed_request(
    loop: Loop,
    spec: FeatureSpec,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
) -> None:
    client = loop.client

    async def following() -> bool:
        return bool((await client.get("/health/ready")).json()["model_events"] == "following")

    await eventually(following, within=60, what="the gateway to follow model.events")
    assert (await client.get("/models/current")).json()["version"] == loop.bad.version

    hours: list[ReplayHour] = load_replay_hours(
        spec, first_day=TRAFFIC_DAYS[0], last_day=TRAFFIC_DAYS[1]
    )
    statuses: list[int] = []
    versions: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        index = 0
        while not stop.is_set():
            hour = hours[index % len(hours)]
            request_id = f"{loop.schema}-{index}"
            response = await client.post(
                "/predict", json=hour.row, headers={"X-Request-ID": request_id}
            )
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.append(response.json()["model_version"])
                feedback = await client.post(
                    "/feedback", json={"request_id": request_id, "label": hour.label}
                )
                assert feedback.status_code == 202, feedback.text
            index += 1
            await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    try:

        async def serving_the_good_one_again() -> bool:
            assert not load.done(), "the traffic stopped"
            assert loop.shadow_scorer.alive(), loop.shadow_scorer.log()[-3000:]
            current = (await client.get("/models/current")).json()
            return bool(current["version"] == loop.good.version)

        await eventually(
            serving_the_good_one_again, within=180, what="the gateway to serve v1 again"
        )
        # A few requests more, answered by the version restored.
        answered = len(versions)

        async def more_answers() -> bool:
            return len(versions) > answered + 10

        await eventually(more_answers, within=30, what="traffic after the swap")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await load
    load.result()

    assert statuses
    assert set(statuses) == {200}, "a request failed around the rollback"
    assert versions[0] == loop.bad.version
    assert versions[-1] == loop.good.version
    # Served by v2, then by v1 for good: one swap, no flapping back.
    swap = versions.index(loop.good.version)
    assert set(versions[:swap]) == {loop.bad.version}
    assert set(versions[swap:]) == {loop.good.version}

    records = await read_to_end(loop.kafka, loop.kafka.topic(Topic.MODEL_EVENTS))
    events = [decode_model_event(record.value) for record in records]
    rollbacks = [event for event in events if isinstance(event, ModelRolledBack)]
    assert len(rollbacks) == 1, events
    rollback = rollbacks[0]
    assert (rollback.model_name, rollback.model_version) == (loop.name, loop.good.version)
    assert rollback.champion_version == loop.bad.version
    assert rollback.run_id == loop.good.run_id
    # Judged over exactly the first LIVE_ROWS labelled rows v2 served, and lost by the margin.
    assert rollback.live_rows == LIVE_ROWS
    assert rollback.metric_name == "rmse"
    assert rollback.champion_score is not None
    assert rollback.challenger_score < rollback.champion_score * (1 - 0.05)

    uri = mlflow_settings.tracking_uri
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert trainer.current_champion(uri, loop.name) == loop.good.version
    demoted = registry.get_model_version(loop.name, str(loop.bad.version)).tags
    restored = registry.get_model_version(loop.name, str(loop.good.version)).tags
    assert demoted[LIVE_VERDICT_TAG] == ROLLED_BACK
    assert demoted[DECISION_TAG] == Outcome.PROMOTED.value
    assert restored[RESTORED_FROM_TAG] == str(loop.bad.version)

    connection = await asyncpg.connect(postgres_settings.dsn())
    try:
        rows = await connection.fetch(
            f"SELECT s.role, s.served_version, count(*) AS n, "  # noqa: S608 - test schema
            f"count(l.request_id) AS labelled "
            f"FROM {loop.schema}.shadow_predictions s "
            f"LEFT JOIN {loop.schema}.labels l USING (request_id) "
            f"WHERE s.model_name = $1 AND s.model_version = $2 "
            f"GROUP BY s.role, s.served_version",
            loop.name,
            loop.good.version,
        )
        duplicates = await connection.fetchval(
            f"SELECT count(*) - count(DISTINCT (request_id, model_version)) "  # noqa: S608
            f"FROM {loop.schema}.shadow_predictions"
        )
    finally:
        await connection.close()
    # v1 was scored in shadow, as the previous champion, on the rows v2 served.
    by_role = {(row["role"], row["served_version"]): row for row in rows}
    assert set(by_role) == {("previous_champion", loop.bad.version)}, rows
    assert by_role[("previous_champion", loop.bad.version)]["labelled"] >= LIVE_ROWS
    assert duplicates == 0
