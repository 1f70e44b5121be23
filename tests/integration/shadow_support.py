"""What the shadow tests share: a served model with its logger and shadow-scorer, and traffic.

A ``ShadowRig`` is a gateway (in this process, on the test's topics, following model.events
only), a feature-logger and a shadow-scorer (processes, on the test's topics, group and
Postgres schema) around one registered model. ``LiveTraffic`` sends replayed hours to the
gateway with their true labels as feedback, and records every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pandas as pd
from pydantic import SecretStr

from driftloop.events import kafka
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings
from driftloop.training import trainer
from driftloop_tools.demo.replay import ReplayHour
from gateway.app import create_app
from gateway.settings import GatewaySettings
from schemas.events import ModelEvent, decode_model_event
from schemas.features import FeatureSpec, LiveEvidence
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    eventually,
    free_port,
    metric,
    read_to_end,
)


def judged_live(spec: FeatureSpec, live: LiveEvidence) -> FeatureSpec:
    """``spec`` with another ``training.live`` (registered with the versions trained on it)."""
    return spec.model_copy(update={"training": spec.training.model_copy(update={"live": live})})


def shuffled_labels(spec: FeatureSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with their targets permuted: a model trained on them learns nothing."""
    target = spec.target.name
    rng = np.random.default_rng(15)
    return frame.assign(**{target: rng.permutation(frame[target].to_numpy())})


def register(
    spec: FeatureSpec, tracking_uri: str, name: str, frame: pd.DataFrame, work_dir: Path
) -> trainer.RegisteredModel:
    """A version of ``name`` trained on ``frame`` (no alias)."""
    booster = trainer.train_booster(spec, frame, num_boost_round=40)
    work_dir.mkdir(parents=True, exist_ok=True)
    return trainer.log_and_register(
        booster, spec, tracking_uri=tracking_uri, model_name=name, work_dir=work_dir
    )


@dataclass
class ShadowRig:
    """A model served, logged and scored in shadow on the test's own topics and schema."""

    name: str
    schema: str
    kafka: KafkaSettings
    client: httpx.AsyncClient
    shadow_scorer: ConsumerProcess
    feature_logger: ConsumerProcess
    shadow_scorer_port: int

    async def shadow_metric(self, name: str, **labels: str) -> float | None:
        """One sample of the shadow-scorer's /metrics (labels in name order, as exposed)."""
        return await metric(self.shadow_scorer_port, name, **labels)

    async def model_events(self) -> list[ModelEvent]:
        records = await read_to_end(self.kafka, self.kafka.topic(Topic.MODEL_EVENTS))
        return [decode_model_event(record.value) for record in records]

    async def serving(self) -> int:
        return int((await self.client.get("/models/current")).json()["version"])

    async def following(self) -> None:
        async def ready() -> bool:
            state = (await self.client.get("/health/ready")).json()["model_events"]
            return bool(state == "following")

        await eventually(ready, within=60, what="the gateway to follow model.events")


@contextlib.asynccontextmanager
async def shadow_rig(
    name: str,
    unique: str,
    *,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> AsyncIterator[ShadowRig]:
    """The rig around ``name`` (which has a champion); the schema is dropped afterwards."""
    topics = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await kafka.create_topics(topics, [Topic.PREDICTIONS, Topic.LABELS, Topic.MODEL_EVENTS])
    common = {"KAFKA_TOPIC_PREFIX": topics.topic_prefix}
    ports = {"feature-logger": free_port(), "shadow-scorer": free_port()}
    feature_logger = ConsumerProcess(
        "consumers.feature_logger",
        {
            **common,
            "FEATURE_LOGGER_GROUP": f"{unique}-feature-logger",
            "FEATURE_LOGGER_DB_SCHEMA": unique,
            "FEATURE_LOGGER_PARQUET_ENABLED": "false",
            "FEATURE_LOGGER_METRICS_PORT": str(ports["feature-logger"]),
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
            "SHADOW_SCORER_METRICS_PORT": str(ports["shadow-scorer"]),
        },
        tmp_path / "shadow-scorer.log",
    ).start()
    settings = GatewaySettings(
        admin_token=SecretStr("integration-admin-token"),
        model_name=name,
        model_cache_dir=tmp_path / "gateway-models",
        spool_path=tmp_path / "spool.sqlite3",
        model_poll_seconds=3600,  # every swap must arrive through model.events
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
            rig = ShadowRig(
                name,
                unique,
                topics,
                client,
                shadow_scorer,
                feature_logger,
                ports["shadow-scorer"],
            )
            await rig.following()
            for consumer, port in ports.items():
                # Consuming: its migrations ran and its partitions are assigned.
                await eventually(
                    functools.partial(_ready, port, consumer),
                    within=120,
                    what=f"the {consumer} to consume",
                )
            yield rig
    finally:
        shadow_scorer.close()
        feature_logger.close()
        connection = await asyncpg.connect(postgres_settings.dsn())
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        finally:
            await connection.close()


async def _ready(port: int, consumer: str) -> bool:
    return await metric(port, "driftloop_consumer_ready", consumer=consumer) == 1


@dataclass
class LiveTraffic:
    """Replayed hours sent to the gateway one at a time, each answer's label sent back."""

    rig: ShadowRig
    hours: Sequence[ReplayHour]
    statuses: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _send(self) -> None:
        index = 0
        while not self._stop.is_set():
            hour = self.hours[index % len(self.hours)]
            request_id = f"{self.rig.schema}-{index}"
            client = self.rig.client
            response = await client.post(
                "/predict", json=hour.row, headers={"X-Request-ID": request_id}
            )
            self.statuses.append(response.status_code)
            if response.status_code == 200:
                self.versions.append(response.json()["model_version"])
                feedback = await client.post(
                    "/feedback", json={"request_id": request_id, "label": hour.label}
                )
                assert feedback.status_code == 202, feedback.text
            index += 1
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self._task = asyncio.create_task(self._send())

    def check(self) -> None:
        """Fail at once when the traffic or the shadow-scorer died."""
        assert self._task is not None
        if self._task.done():
            self._task.result()
            raise AssertionError("the traffic stopped")
        assert self.rig.shadow_scorer.alive(), self.rig.shadow_scorer.log()[-3000:]

    async def until_serving(self, version: int, *, within: float) -> None:
        """Send until the gateway serves ``version``, then ten answers more."""

        async def serving() -> bool:
            self.check()
            return await self.rig.serving() == version

        await eventually(serving, within=within, what=f"the gateway to serve v{version}")
        answered = len(self.versions)

        async def more() -> bool:
            self.check()
            return len(self.versions) > answered + 10

        await eventually(more, within=30, what="answers after the swap")

    async def until_labelled(self, rows: int, *, within: float) -> None:
        """Send until ``rows`` requests were answered (and labelled)."""

        async def enough() -> bool:
            self.check()
            return len(self.versions) >= rows

        await eventually(enough, within=within, what=f"{rows} answers")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
