"""The closed loop on the real stack: gateway -> feature-logger -> drift-monitor -> retrain-trigger
-> Airflow ``retrain_model`` -> MLflow -> ``model.events`` -> gateway, on the Bike Sharing data.

Each test runs the platform's own services as processes, in a namespace of its own (a Postgres
schema, a topic prefix, a registered model name, object key prefixes), against the shared
Kafka, Postgres, S3, MLflow and Airflow; the DAG reads and publishes in that namespace because
the trigger passes it in the run's conf. The first champion is trained on January-March, as
``driftloop model bootstrap`` does. (Airflow being away when a drift event arrives is covered
by tests/integration/test_retrain_trigger.py.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pandas as pd
import pytest

from driftloop.drift.parquet_windows import load_parquet_window
from driftloop.drift.store import DriftRun, DriftStore, open_drift_store
from driftloop.events.kafka import create_topics
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)
from driftloop.storage.database import create_pool
from driftloop.storage.objectstore import s3_client
from driftloop.training.bootstrap import bootstrap_model, current_champion
from driftloop_tools.demo.replay import Replayer, ReplayStats, day_of_year, load_replay_hours
from schemas.events import (
    DriftDetected,
    ModelEvent,
    ModelPromoted,
    ModelRejected,
    decode_model_event,
)
from schemas.features import load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    eventually,
    free_port,
    metric,
    produce,
    read_topic,
)

DAG_ID = "retrain_model"
SPEC = load_feature_spec("bikeshare")
# Windows of one second of prediction time: 300 rows of the winter replay (300 hours a
# second), 60 to 100 of the spring and summer ones, which then merge up to the policy's 150.
WINDOW_SECONDS = 1.0


@dataclass
class LoopRig:
    """One namespace of the platform: its services, topics, schema and model."""

    unique: str
    model: str
    kafka: KafkaSettings
    postgres: PostgresSettings
    mlflow: MlflowSettings
    tmp_path: Path
    gateway_port: int
    drift_port: int
    trigger_port: int
    champion_version: int
    store: DriftStore
    processes: dict[str, ConsumerProcess] = field(default_factory=dict)

    def start(self, name: str, module: str, environment: dict[str, str]) -> ConsumerProcess:
        process = ConsumerProcess(module, environment, self.tmp_path / f"{name}.log").start()
        self.processes[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{process.log()[-6000:]}" for name, process in self.processes.items()
        )

    async def replay(self, start: str, until: str, hours_per_second: float) -> ReplayStats:
        hours = load_replay_hours(SPEC, first_day=day_of_year(start), last_day=day_of_year(until))
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.gateway_port}", timeout=30
        ) as client:
            replayer = Replayer(
                client,
                hours,
                replay_id=f"{self.unique}-{start}",
                hours_per_second=hours_per_second,
                concurrency=8,
            )
            return await replayer.run()

    async def runs(self) -> list[DriftRun]:
        return await self.store.recent(self.model, limit=1000)

    async def served_version(self) -> int:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.gateway_port}") as client:
            response = await client.get("/models/current", timeout=10)
            assert response.status_code == 200, response.text
            return int(response.json()["version"])

    async def ledger(self) -> list[dict[str, Any]]:
        connection = await asyncpg.connect(self.postgres.dsn())
        try:
            rows = await connection.fetch(
                # The schema is the test's own unique token, never input.
                f"SELECT * FROM {self.unique}.retrain_triggers ORDER BY created_at"  # noqa: S608
            )
        finally:
            await connection.close()
        return [dict(row) for row in rows]


async def _gateway_ready(port: int, version: int) -> bool:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        try:
            response = await client.get("/models/current", timeout=5)
        except httpx.HTTPError:
            return False
    return response.status_code == 200 and response.json()["version"] == version


@pytest.fixture
async def make_rig(
    unique: str,
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    mlflow_settings: MlflowSettings,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Builds the namespace and starts the services; ``dag_params`` go into every run's conf."""
    rigs: list[LoopRig] = []

    async def build(dag_params: dict[str, Any]) -> LoopRig:
        kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
        await create_topics(kafka, list(Topic))
        model = f"loop-{unique}"
        result = await asyncio.to_thread(
            bootstrap_model, SPEC, tracking_uri=mlflow_settings.tracking_uri, model_name=model
        )
        store = await open_drift_store(postgres_settings, unique)
        rig = LoopRig(
            unique=unique,
            model=model,
            kafka=kafka,
            postgres=postgres_settings,
            mlflow=mlflow_settings,
            tmp_path=tmp_path,
            gateway_port=free_port(),
            drift_port=free_port(),
            trigger_port=free_port(),
            champion_version=result.model.version,
            store=store,
        )
        rigs.append(rig)
        shared = {"KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
        rig.start(
            "gateway",
            "gateway",
            {
                **shared,
                "GATEWAY_PORT": str(rig.gateway_port),
                "GATEWAY_MODEL_NAME": model,
                "GATEWAY_MODEL_CACHE_DIR": str(tmp_path / "gateway-models"),
                "GATEWAY_SPOOL_PATH": str(tmp_path / "gateway-spool.sqlite3"),
                "GATEWAY_MODEL_POLL_SECONDS": "30",
            },
        )
        rig.start(
            "feature-logger",
            "consumers.feature_logger",
            {
                **shared,
                "FEATURE_LOGGER_GROUP": f"{unique}-feature-logger",
                "FEATURE_LOGGER_DB_SCHEMA": unique,
                "FEATURE_LOGGER_PARQUET_PREFIX": f"tests/{unique}/features/",
                "FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS": "3",
                "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
            },
        )
        rig.start(
            "drift-monitor",
            "consumers.drift_monitor",
            {
                **shared,
                "DRIFT_MONITOR_MODELS": model,
                "DRIFT_MONITOR_DB_SCHEMA": unique,
                "DRIFT_MONITOR_WINDOW_SECONDS": str(WINDOW_SECONDS),
                "DRIFT_MONITOR_SETTLE_SECONDS": "1",
                "DRIFT_MONITOR_POLL_SECONDS": "0.5",
                "DRIFT_MONITOR_CHAMPION_REFRESH_SECONDS": "2",
                "DRIFT_MONITOR_REPORT_PREFIX": f"tests/{unique}/drift-reports/",
                "DRIFT_MONITOR_METRICS_PORT": str(rig.drift_port),
                # This loop is the input-drift path: the episode opens on the weather. With
                # the labelled error judged too it may open a week earlier, on a challenger
                # only ~4 % better than the 2 % margin asks, so promotion would hang on the
                # replay's timing (tests/integration/test_drift_quality.py covers quality).
                "DRIFT_MONITOR_POLICY": '{"judge_quality": false}',
            },
        )
        rig.start(
            "retrain-trigger",
            "consumers.retrain_trigger",
            {
                **shared,
                "RETRAIN_TRIGGER_GROUP": f"{unique}-retrain-trigger",
                "RETRAIN_TRIGGER_DB_SCHEMA": unique,
                "RETRAIN_TRIGGER_MODELS": model,
                "RETRAIN_TRIGGER_DAG_ID": DAG_ID,
                "RETRAIN_TRIGGER_COOLDOWN_SECONDS": "3600",
                "RETRAIN_TRIGGER_STATUS_REFRESH_SECONDS": "2",
                "RETRAIN_TRIGGER_DAG_PARAMS": orjson.dumps(dag_params).decode(),
                "RETRAIN_TRIGGER_METRICS_PORT": str(rig.trigger_port),
            },
        )
        await eventually(
            lambda: _gateway_ready(rig.gateway_port, rig.champion_version),
            within=120,
            what="the gateway to serve the first champion",
        )
        return rig

    try:
        yield build
    finally:
        for rig in rigs:
            for process in rig.processes.values():
                process.close()
            await rig.store.close()
            if not os.environ.get("KEEP_TEST_SCHEMA"):
                connection = await asyncpg.connect(postgres_settings.dsn())
                try:
                    await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
                finally:
                    await connection.close()


async def _decision(rig: LoopRig, within: float) -> ModelEvent:
    records = await read_topic(
        rig.kafka, rig.kafka.topic(Topic.MODEL_EVENTS), expected=1, within=within
    )
    decisions = [decode_model_event(record.value) for record in records]
    mine = [event for event in decisions if event.model_name == rig.model]
    assert len(mine) == 1, (decisions, rig.logs())
    return mine[0]


async def _one_finished_dag_run(client: httpx.AsyncClient, rig: LoopRig) -> dict[str, Any]:
    """The namespace's only DAG run, once it finished (its cleanup task follows the decision)."""
    runs: list[dict[str, Any]] = []

    async def finished() -> bool:
        nonlocal runs
        response = await client.get(
            f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_id_pattern": rig.unique, "limit": 100}
        )
        assert response.status_code == 200, response.text
        runs = response.json()["dag_runs"]
        return all(run["state"] in {"success", "failed"} for run in runs)

    await eventually(finished, within=120, what="the DAG run to finish")
    assert len(runs) == 1, runs
    return runs[0]


def _drifted(runs: Sequence[DriftRun]) -> list[DriftRun]:
    return [run for run in runs if run.outcome == "drifted"]


async def test_winter_against_the_winter_model_raises_no_drift(
    make_rig: Callable[..., Any],
    airflow_client: httpx.AsyncClient,
    object_store_settings: ObjectStoreSettings,
) -> None:
    rig: LoopRig = await make_rig({})
    started = datetime.now(UTC)
    stats = await rig.replay("01-01", "03-31", hours_per_second=300)
    assert stats.error_count == 0, stats.errors

    async def all_judged() -> bool:
        return sum(run.window_rows for run in await rig.runs()) >= stats.predictions

    # Every logged row counts in exactly one judged window.
    await eventually(all_judged, within=180, what=f"{stats.predictions} rows judged")
    runs = await rig.runs()
    assert sum(run.window_rows for run in runs) == stats.predictions
    # The replay's last rows, too few for a window and with no traffic after them to merge
    # with, may be refused with the reason; every other window is judged.
    refused = [run for run in runs if run.outcome == "refused"]
    assert all(run.refusal_reason == "too_few_rows" for run in refused), refused
    assert len(refused) <= 1, refused
    if refused:
        assert refused[0].window_end == max(run.window_end for run in runs), "not the tail"
    assert not any(run.drift_holds for run in runs), [(r.drift_share, r.episode_id) for r in runs]
    assert all(run.report_uri for run in runs if run.outcome != "refused")
    # Quality is computed on the labelled rows: labels came back through /feedback.
    assert any(run.quality and "rmse" in run.quality for run in runs)
    assert await metric(rig.drift_port, "driftloop_drift_events_total", model=rig.model) in {
        None,
        0.0,
    }
    assert await rig.ledger() == []
    response = await airflow_client.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_id_pattern": rig.unique}
    )
    assert response.json()["dag_runs"] == []

    # The same traffic as one long window, from the Parquet files (`driftloop drift check`).
    pool = await create_pool(rig.postgres, schema=rig.unique, max_size=2)
    try:
        async with s3_client(object_store_settings) as s3:

            async def long_window() -> pd.DataFrame:
                return await load_parquet_window(
                    pool,
                    s3,
                    object_store_settings.data_bucket,
                    SPEC,
                    rig.model,
                    rig.champion_version,
                    start=started,
                    end=datetime.now(UTC),
                )

            async def all_flushed() -> bool:
                frame = await long_window()
                labelled = int(frame[SPEC.target.name].notna().sum())
                return len(frame) == stats.predictions and labelled == stats.labels_sent

            await eventually(all_flushed, within=60, what="every row in the Parquet files")
            frame = await long_window()
    finally:
        await pool.close()
    assert list(frame.columns[1:-2]) == list(SPEC.feature_names)
    assert frame["predicted_at"].is_monotonic_increasing
    assert set(frame["hr"]) == set(range(24))


async def _drift_until_decided(
    rig: LoopRig,
) -> tuple[DriftDetected, ModelEvent]:
    """Replay spring and summer until the episode's run decided; the first drift event."""
    decision_task = asyncio.create_task(_decision(rig, within=420))
    stats = await rig.replay("04-01", "06-30", hours_per_second=60)
    assert stats.error_count == 0, stats.errors
    records = await read_topic(
        rig.kafka, rig.kafka.topic(Topic.DRIFT_EVENTS), expected=1, within=120
    )
    first = DriftDetected.from_bytes(records[0].value)
    decision = await decision_task
    return first, decision


async def test_summer_drift_retrains_once_and_the_gateway_serves_the_better_model(
    make_rig: Callable[..., Any], airflow_client: httpx.AsyncClient
) -> None:
    rig: LoopRig = await make_rig({"promotion_margin": 0.02})
    first, decision = await _drift_until_decided(rig)
    # The same drift event delivered again: the trigger keeps it to the one run.
    await produce(rig.kafka, Topic.DRIFT_EVENTS, [first])

    assert first.model_name == rig.model
    assert first.model_version == rig.champion_version
    assert {"temp", "atemp"} <= set(first.drifted_features)
    assert isinstance(decision, ModelPromoted), (decision, rig.logs())
    assert decision.champion_version == rig.champion_version
    assert decision.episode_id == first.episode_id
    assert decision.champion_score is not None
    assert decision.challenger_score < decision.champion_score * (1 - 0.02)
    new_version = decision.model_version
    assert await asyncio.to_thread(current_champion, rig.mlflow.tracking_uri, rig.model) == (
        new_version
    )

    async def serves_new() -> bool:
        return await rig.served_version() == new_version

    await eventually(serves_new, within=60, what="the gateway to serve the promoted version")
    # Summer traffic now goes to the new champion, and its windows to the new reference.
    stats = await rig.replay("07-01", "07-21", hours_per_second=100)
    assert stats.versions.keys() == {new_version}, stats.versions

    async def judged_new() -> bool:
        return any(run.model_version == new_version for run in await rig.runs())

    await eventually(judged_new, within=120, what="a window of the new champion judged")

    async def duplicate_seen() -> bool:
        value = await metric(
            rig.trigger_port, "driftloop_retrain_triggers_total", outcome="duplicate"
        )
        return value is not None and value >= 1

    await eventually(duplicate_seen, within=60, what="the redelivered event skipped")
    run = await _one_finished_dag_run(airflow_client, rig)
    assert run["dag_run_id"] == f"drift-{first.episode_id}"
    assert run["state"] == "success"
    assert run["conf"]["postgres_schema"] == rig.unique
    ledger = await rig.ledger()
    accepted = [row for row in ledger if row["state"] in {"triggered", "already_triggered"}]
    assert [row["episode_id"] for row in accepted] == [first.episode_id], ledger
    drifted = _drifted(await rig.runs())
    assert drifted, "no drifted window recorded"


async def test_a_challenger_short_of_the_margin_is_kept_out(
    make_rig: Callable[..., Any], airflow_client: httpx.AsyncClient
) -> None:
    rig: LoopRig = await make_rig({"promotion_margin": 0.99})
    first, decision = await _drift_until_decided(rig)

    assert isinstance(decision, ModelRejected), (decision, rig.logs())
    assert decision.champion_version == rig.champion_version
    assert decision.episode_id == first.episode_id
    assert "margin" in decision.reason
    assert await asyncio.to_thread(current_champion, rig.mlflow.tracking_uri, rig.model) == (
        rig.champion_version
    )
    assert await rig.served_version() == rig.champion_version
    run = await _one_finished_dag_run(airflow_client, rig)
    assert run["state"] == "success"
