"""retrain-trigger on the real Kafka, Postgres and Airflow: one DAG run per drift episode.

The DAG triggered is ``platform_healthcheck`` (RETRAIN_TRIGGER_DAG_ID), so no retrain DAG is
needed; each test uses its own topic prefix, group, ledger schema and model name. "Airflow
down" is simulated without touching the shared Airflow: the trigger first points at a closed
port (unreachable), then at the real api-server.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumers.retrain_trigger import NAME
from driftloop.events.kafka import create_topics
from driftloop.orchestration.ledger import (
    PriorTrigger,
    TriggerState,
    dag_run_id_for,
    open_retrain_ledger,
)
from driftloop.settings import AirflowApiSettings, KafkaSettings, PostgresSettings
from schemas.events import DriftDetected
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    eventually,
    free_port,
    metric,
    produce,
    produce_raw,
    read_topic,
)

DAG_ID = "platform_healthcheck"


@dataclass
class TriggerSetup:
    kafka: KafkaSettings
    unique: str
    model: str
    group: str
    environment: dict[str, str]
    connection: asyncpg.Connection
    tmp_path: Path

    def process(self, **overrides: str) -> ConsumerProcess:
        environment = {**self.environment, **overrides}
        return ConsumerProcess(
            "consumers.retrain_trigger", environment, self.tmp_path / "retrain-trigger.log"
        )

    @property
    def port(self) -> str:
        return self.environment["RETRAIN_TRIGGER_METRICS_PORT"]

    def drift(self, episode: str, model: str | None = None) -> DriftDetected:
        end = datetime.now(UTC).replace(microsecond=0)
        return DriftDetected(
            model_name=model or self.model,
            model_version=1,
            episode_id=f"{model or self.model}:1:{episode}",
            window_start=end - timedelta(hours=1),
            window_end=end,
            window_rows=400,
            drift_share=0.5,
            drifted_features=("temp",),
            prediction_drifted=False,
            report_uri=f"s3://driftloop-data/tests/{self.unique}/report.json",
        )

    async def ledger(self) -> dict[str, asyncpg.Record]:
        try:
            rows = await self.connection.fetch(
                f"SELECT * FROM {self.unique}.retrain_triggers"  # noqa: S608 - test schema
            )
        except asyncpg.UndefinedTableError:
            return {}
        return {row["episode_id"]: row for row in rows}

    async def committed(self) -> int | None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap_servers)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        found = [meta.offset for tp, meta in offsets.items() if meta.offset >= 0]
        return sum(found) if found else None


@pytest.fixture
async def trigger_setup(
    unique: str,
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> AsyncIterator[TriggerSetup]:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.DRIFT_EVENTS])
    model = f"model-{unique}"
    group = f"{unique}-retrain-trigger"
    environment = {
        "KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "RETRAIN_TRIGGER_GROUP": group,
        "RETRAIN_TRIGGER_DB_SCHEMA": unique,
        "RETRAIN_TRIGGER_DAG_ID": DAG_ID,
        "RETRAIN_TRIGGER_MODELS": model,
        "RETRAIN_TRIGGER_COOLDOWN_SECONDS": "3600",
        "RETRAIN_TRIGGER_POLL_TIMEOUT_MS": "200",
        "RETRAIN_TRIGGER_AIRFLOW_ATTEMPTS": "2",
        "RETRAIN_TRIGGER_BACKOFF_MAX_SECONDS": "2",
        "RETRAIN_TRIGGER_STATUS_REFRESH_SECONDS": "1",
        "RETRAIN_TRIGGER_METRICS_PORT": str(free_port()),
    }
    connection = await asyncpg.connect(postgres_settings.dsn())
    try:
        yield TriggerSetup(kafka, unique, model, group, environment, connection, tmp_path)
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await connection.close()


async def runs_of(client: httpx.AsyncClient, unique: str) -> list[dict[str, object]]:
    """The DAG runs of ``DAG_ID`` whose run id contains ``unique``, from the REST listing."""
    response = await client.get(
        f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_id_pattern": unique, "limit": 100}
    )
    assert response.status_code == 200, response.text
    runs: list[dict[str, object]] = response.json()["dag_runs"]
    return runs


async def test_an_event_delivered_twice_starts_exactly_one_dag_run(
    trigger_setup: TriggerSetup, airflow_client: httpx.AsyncClient
) -> None:
    setup = trigger_setup
    event = setup.drift(f"{setup.unique}-summer")
    # The same message twice, and the episode again in a later event (a new window).
    again = event.model_copy(update={"event_id": uuid.uuid4()})
    await produce(setup.kafka, Topic.DRIFT_EVENTS, [event, event, again])
    trigger = setup.process().start()
    try:

        async def finished() -> bool:
            row = (await setup.ledger()).get(event.episode_id)
            return row is not None and row["dag_run_state"] in {"success", "failed"}

        await eventually(finished, within=180, what="the DAG run to finish in the ledger")
        await eventually(lambda: committed_is(setup, 3), within=30, what="offsets committed")
        assert await metric(
            setup.port, "driftloop_retrain_triggers_total", outcome="duplicate"
        ) == pytest.approx(2)
    finally:
        assert trigger.terminate() == 0, trigger.log()

    runs = await runs_of(airflow_client, setup.unique)
    assert [run["dag_run_id"] for run in runs] == [f"drift-{event.episode_id}"]
    assert runs[0]["conf"] == {**runs[0]["conf"], "episode_id": event.episode_id}  # type: ignore[dict-item]
    row = (await setup.ledger())[event.episode_id]
    assert row["state"] == "triggered"
    assert row["dag_id"] == DAG_ID
    assert row["dag_run_id"] == f"drift-{event.episode_id}"
    assert row["model_name"] == setup.model
    assert row["drift_share"] == pytest.approx(0.5)
    assert row["dag_run_state"] == runs[0]["state"] == "success"
    assert row["dag_run_started_at"] is not None

    # A replay from the start by a new group (same ledger): no second run, the ledger row stays.
    replay = setup.process(RETRAIN_TRIGGER_GROUP=f"{setup.group}-replay").start()
    try:

        async def replayed() -> bool:
            value = await metric(
                setup.port, "driftloop_retrain_triggers_total", outcome="duplicate"
            )
            return value == 3

        await eventually(replayed, within=60, what="the replay to skip every duplicate")
    finally:
        assert replay.terminate() == 0, replay.log()
    assert len(await runs_of(airflow_client, setup.unique)) == 1


async def test_cooldown_suppresses_a_second_episode_and_bad_input_is_recorded(
    trigger_setup: TriggerSetup, airflow_client: httpx.AsyncClient
) -> None:
    setup = trigger_setup
    first = setup.drift(f"{setup.unique}-first")
    second = setup.drift(f"{setup.unique}-second")
    stranger = setup.drift(f"{setup.unique}-stranger", model=f"unknown-{setup.unique}")
    await produce(setup.kafka, Topic.DRIFT_EVENTS, [first, second, stranger])
    await produce_raw(setup.kafka, Topic.DRIFT_EVENTS, [(None, b"{not json")])
    trigger = setup.process().start()
    try:
        await eventually(
            lambda: committed_is(setup, 4), within=60, what="all four records committed"
        )
    finally:
        assert trigger.terminate() == 0, trigger.log()

    ledger = await setup.ledger()
    assert ledger[first.episode_id]["state"] == "triggered"
    assert ledger[second.episode_id]["state"] == "suppressed_cooldown"
    assert first.episode_id in ledger[second.episode_id]["reason"]
    assert ledger[second.episode_id]["triggered_at"] is None
    assert ledger[stranger.episode_id]["state"] == "failed"
    assert "unknown model" in ledger[stranger.episode_id]["reason"]
    runs = await runs_of(airflow_client, setup.unique)
    assert [run["dag_run_id"] for run in runs] == [f"drift-{first.episode_id}"]
    # The status command refreshes and prints the same ledger.
    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumers.retrain_trigger",
        "status",
        env={**os.environ, **setup.environment},
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(status.communicate(), timeout=60)
    assert status.returncode == 0
    lines = {line.split("\t")[0]: line.split("\t") for line in stdout.decode().splitlines()}
    assert lines[first.episode_id][2] == "triggered"
    assert lines[second.episode_id][2] == "suppressed_cooldown"
    assert lines[stranger.episode_id][2] == "failed"
    letters = await read_topic(
        setup.kafka, setup.kafka.topic(Topic.DRIFT_EVENTS.dead_letter), expected=1, within=30
    )
    assert len(letters) == 1


async def test_airflow_unreachable_holds_the_offset_then_fires_once(
    trigger_setup: TriggerSetup,
    airflow_client: httpx.AsyncClient,
    airflow_settings: AirflowApiSettings,
) -> None:
    setup = trigger_setup
    event = setup.drift(f"{setup.unique}-outage")
    await produce(setup.kafka, Topic.DRIFT_EVENTS, [event])
    # Nothing listens on this port yet: connection refused, as from a stopped Airflow. The
    # shared Airflow keeps running for everyone else.
    port = free_port()
    environment = {"AIRFLOW_API_URL": f"http://127.0.0.1:{port}"}
    down = setup.process(**environment).start()
    try:
        await eventually(
            lambda: backed_off(setup, 2), within=60, what="the trigger to back off twice"
        )
        unavailable = await metric(
            setup.port, "driftloop_retrain_airflow_errors_total", kind="unavailable"
        )
        assert unavailable is not None
        assert unavailable >= 2
        sinks_up = await metric(setup.port, "driftloop_consumer_sinks_up", consumer=NAME)
        assert sinks_up == 0
        assert await setup.committed() is None
        assert event.episode_id not in await setup.ledger()
    finally:
        # SIGTERM during the backoff abandons the batch without committing it.
        assert down.terminate() == 0, down.log()
    assert await setup.committed() is None
    assert await runs_of(airflow_client, setup.unique) == []

    # Restarted, still unreachable; then "Airflow comes back" on that address: a TCP relay to
    # the real api-server opens on the port, and the waiting trigger fires once, in-process.
    waiting = setup.process(**environment).start()
    try:
        await eventually(lambda: backed_off(setup, 1), within=60, what="the trigger to wait")
        assert await setup.committed() is None
        target = httpx.URL(airflow_settings.url)
        relay = await asyncio.start_server(
            partial(_relay, target.host, target.port or 80), "127.0.0.1", port
        )
        async with relay:
            await eventually(
                lambda: committed_is(setup, 1), within=60, what="the trigger to commit"
            )
            assert await metric(setup.port, "driftloop_consumer_sinks_up", consumer=NAME) == 1
            # Stopped while the relay is open: closing it waits for the client's keep-alives.
            assert waiting.terminate() == 0, waiting.log()
    finally:
        waiting.close()
    assert (await setup.ledger())[event.episode_id]["state"] == "triggered"
    runs = await runs_of(airflow_client, setup.unique)
    assert [run["dag_run_id"] for run in runs] == [f"drift-{event.episode_id}"]


async def backed_off(setup: TriggerSetup, times: int) -> bool:
    backoffs = await metric(setup.port, "driftloop_consumer_backoffs_total", consumer=NAME)
    return backoffs is not None and backoffs >= times


async def _relay(
    host: str, port: int, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
) -> None:
    upstream_in, upstream_out = await asyncio.open_connection(host, port)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    await asyncio.gather(pipe(client_in, upstream_out), pipe(upstream_in, client_out))


async def committed_is(setup: TriggerSetup, expected: int) -> bool:
    return await setup.committed() == expected


async def test_ledger_writes_are_idempotent_and_final_once_accepted(
    unique: str, postgres_settings: PostgresSettings
) -> None:
    ledger = await open_retrain_ledger(postgres_settings, unique, give_up_after_seconds=10)
    try:
        event = DriftDetected(
            model_name="bikeshare",
            model_version=2,
            episode_id=f"bikeshare:2:{unique}",
            window_start=datetime(2026, 7, 1, tzinfo=UTC),
            window_end=datetime(2026, 7, 2, tzinfo=UTC),
            window_rows=100,
            drift_share=0.4,
            drifted_features=(),
            prediction_drifted=True,
            report_uri="s3://driftloop-data/r.json",
        )
        record = partial(
            ledger.record, event, dag_id="d", dag_run_id=dag_run_id_for(event.episode_id)
        )
        assert await record(state=TriggerState.FAILED, reason="404", triggered_at=None)
        assert await ledger.last_trigger("bikeshare") is None
        accepted_at = datetime.now(UTC)
        assert await record(state=TriggerState.TRIGGERED, reason=None, triggered_at=accepted_at)
        # A final row is never overwritten, whatever a replay decides.
        assert not await record(state=TriggerState.FAILED, reason="late", triggered_at=None)
        entry = await ledger.entry(event.episode_id)
        assert entry is not None
        assert entry.state is TriggerState.TRIGGERED
        assert entry.reason is None
        assert await ledger.last_trigger("bikeshare") == PriorTrigger(
            event.episode_id, event.window_end
        )
        # An older window accepted later (delivered late) is not the last trigger: the
        # cooldown counts from the latest window in prediction time.
        late = event.model_copy(
            update={
                "episode_id": f"bikeshare:2:{unique}-late",
                "window_start": event.window_start - timedelta(days=7),
                "window_end": event.window_end - timedelta(days=7),
            }
        )
        assert await ledger.record(
            late,
            dag_id="d",
            dag_run_id=dag_run_id_for(late.episode_id),
            state=TriggerState.TRIGGERED,
            reason=None,
            triggered_at=accepted_at + timedelta(seconds=5),
        )
        assert await ledger.last_trigger("bikeshare") == PriorTrigger(
            event.episode_id, event.window_end
        )
        await ledger.update_run_state(late.episode_id, "success", accepted_at, accepted_at)
        assert [row.episode_id for row in await ledger.open_runs()] == [event.episode_id]
        started = accepted_at + timedelta(seconds=1)
        await ledger.update_run_state(event.episode_id, "success", started, started)
        assert await ledger.open_runs() == []
        assert [row.dag_run_state for row in await ledger.recent()] == ["success", "success"]
    finally:
        await ledger.pool.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await ledger.close()
