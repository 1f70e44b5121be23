"""What the consumer integration tests share: topics per test, consumer subprocesses, polling,
and taking the stack's broker down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from driftloop.drift.store import DriftStore
from driftloop.events.kafka import create_topics
from driftloop.events.producer import EventProducer, Record
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings
from driftloop.training.bootstrap import BootstrapResult, bootstrap_model
from driftloop.training.trainer import RegisteredModel, read_dataset, train_champion
from driftloop_tools.stack import readiness
from driftloop_tools.stack.settings import StackSettings
from schemas.events import Event
from schemas.features import FeatureSpec, load_feature_spec
from schemas.topics import Topic

REPOSITORY = Path(__file__).resolve().parents[2]


async def produce(settings: KafkaSettings, topic: Topic, events: Sequence[Event]) -> None:
    """Send typed events keyed by their partition key and wait for every acknowledgement."""
    await produce_raw(
        settings, topic, [(event.partition_key(), event.to_bytes()) for event in events]
    )


async def produce_raw(
    settings: KafkaSettings, topic: Topic | str, messages: Sequence[tuple[bytes | None, bytes]]
) -> None:
    name = settings.topic(topic) if isinstance(topic, Topic) else topic
    producer = EventProducer(settings, "test-producer", linger_ms=20)
    await producer.start(give_up_after_seconds=60)
    try:
        await producer.send(Record(name, key, value) for key, value in messages)
    finally:
        await producer.close()


async def _from_the_start(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer``, positioned at the beginning."""
    partitions = [
        TopicPartition(topic, partition)
        for partition in sorted(
            consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        )
    ]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    return partitions


async def read_topic(
    settings: KafkaSettings, topic: str, *, expected: int, within: float = 60
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the start, once at least ``expected`` have arrived."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await _from_the_start(consumer, topic)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + within
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        return records
    finally:
        await consumer.stop()


async def read_to_end(
    settings: KafkaSettings, topic: str, *, within: float = 60
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the start up to its end offsets when called."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = await _from_the_start(consumer, topic)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + within
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within:.0f}s reading {topic} to its end")
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        return records
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 90, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gateway_environment(port: int, folder: Path) -> dict[str, str]:
    """A test's own gateway: its port, and its model cache and spool under ``folder``."""
    return {
        "GATEWAY_PORT": str(port),
        "GATEWAY_MODEL_CACHE_DIR": str(folder / "gateway-models"),
        "GATEWAY_SPOOL_PATH": str(folder / "gateway-spool.sqlite3"),
    }


def feature_logger_environment(unique: str) -> dict[str, str]:
    """A test's own feature-logger: group, Postgres schema and Parquet prefix named by
    ``unique``, flushes every 3 s, metrics on a free port."""
    return {
        "FEATURE_LOGGER_GROUP": f"{unique}-feature-logger",
        "FEATURE_LOGGER_DB_SCHEMA": unique,
        "FEATURE_LOGGER_PARQUET_PREFIX": f"tests/{unique}/features/",
        "FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS": "3",
        "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
    }


def feature_logger_process(unique: str, topic_prefix: str, log: Path) -> ConsumerProcess:
    """A test's own feature-logger on the topics under ``topic_prefix``, Postgres only (its
    Parquet writer off), not started."""
    return ConsumerProcess(
        "consumers.feature_logger",
        {
            "KAFKA_TOPIC_PREFIX": topic_prefix,
            **feature_logger_environment(unique),
            "FEATURE_LOGGER_PARQUET_ENABLED": "false",
        },
        log,
    )


async def served_models(port: int) -> dict[str, Any]:
    """The gateway's ``/models``, by model name."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        models = (await client.get("/models", timeout=10)).json()["models"]
    return {model["name"]: model for model in models}


async def serves_champions(port: int, *names: str) -> bool:
    """Whether the gateway on ``port`` serves a champion of each of ``names`` (False while it
    does not answer)."""
    try:
        served = await served_models(port)
    except httpx.HTTPError:
        return False
    return all(served.get(name, {}).get("champion") is not None for name in names)


def drift_monitor_environment(unique: str, model: str) -> dict[str, str]:
    """A test's own drift-monitor of ``model``: its Postgres schema and report prefix named by
    ``unique``, windows of 1 s settled 2 s after they close, metrics on a free port."""
    return {
        "DRIFT_MONITOR_MODELS": model,
        "DRIFT_MONITOR_DB_SCHEMA": unique,
        "DRIFT_MONITOR_WINDOW_SECONDS": "1",
        "DRIFT_MONITOR_SETTLE_SECONDS": "2",
        "DRIFT_MONITOR_POLL_SECONDS": "0.2",
        "DRIFT_MONITOR_CHAMPION_REFRESH_SECONDS": "1",
        "DRIFT_MONITOR_REPORT_PREFIX": f"tests/{unique}/drift-reports/",
        "DRIFT_MONITOR_METRICS_PORT": str(free_port()),
    }


async def monitored_model(
    unique: str, kafka: KafkaSettings, tracking_uri: str, name: str
) -> tuple[KafkaSettings, BootstrapResult]:
    """The test's topics (prefixed by ``unique``) and a bikeshare champion of its own, named
    ``name``, bootstrapped small (20 trees) with its reference and drift baseline."""
    prefixed = kafka.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(prefixed, list(Topic))
    result = await asyncio.to_thread(
        bootstrap_model,
        load_feature_spec("bikeshare"),
        tracking_uri=tracking_uri,
        model_name=name,
        num_boost_round=20,
    )
    return prefixed, result


async def baseline_published(store: DriftStore, model: str) -> bool:
    """Whether the drift-monitor published a layout of the model's version (it sketches from
    then on)."""
    found = await store.pool.fetchval(
        "SELECT count(*) FROM drift_baselines WHERE model_name = $1", model
    )
    return bool(found)


async def drop_test_schema(postgres: PostgresSettings, unique: str) -> None:
    """Drop the test's Postgres schema, unless KEEP_TEST_SCHEMA is set (to look at it)."""
    if os.environ.get("KEEP_TEST_SCHEMA"):
        return
    connection = await asyncpg.connect(postgres.dsn())
    try:
        # The schema is the test's own unique token, never input.
        await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
    finally:
        await connection.close()


class ConsumerProcess:
    """A consumer started as its own process (``python -m consumers.<name>``)."""

    def __init__(self, module: str, environment: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.environment = {**os.environ, **environment}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=REPOSITORY,
            env=self.environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no goodbye."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the graceful stop; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.terminate(timeout=20)
        if self.alive():
            self.kill()


def supervisorctl(stack: StackSettings, *arguments: str) -> None:
    """Run ``supervisorctl`` on the native stack's supervisord, e.g. ``stop kafka``."""
    subprocess.run(
        ["supervisorctl", "-c", str(stack.run / "supervisord.conf"), *arguments],
        check=True,
        capture_output=True,
        timeout=120,
    )


@contextlib.asynccontextmanager
async def broker_stopped(stack: StackSettings) -> AsyncIterator[None]:
    """The stack's Kafka broker stopped for the body, then started again whatever happens.

    On the way out it waits until the broker answers, so the test (and the next one) finds it
    up; everything else on the stack sees the outage too.
    """
    try:
        await asyncio.to_thread(supervisorctl, stack, "stop", "kafka")
        yield
    finally:
        # "start" fails when the program is running already; the probe below is the check.
        with contextlib.suppress(subprocess.CalledProcessError):
            await asyncio.to_thread(supervisorctl, stack, "start", "kafka")

        async def broker_ready() -> bool:
            return (await readiness.check("kafka", stack)).ready

        await eventually(broker_ready, within=120, what="the broker to answer again")


# What aiokafka logs when a client loses the broker: a refused (re)connection, a dead coordinator.
BROKER_LOST_MARKERS = ("Unable connect to", "Marking the coordinator dead")


async def broker_loss_seen(process: ConsumerProcess, since: int, *, within: float = 60) -> None:
    """Wait until ``process`` logs, after the first ``since`` characters, that it lost Kafka."""

    async def seen() -> bool:
        tail = process.log()[since:]
        return any(marker in tail for marker in BROKER_LOST_MARKERS)

    await eventually(seen, within=within, what=f"{process.module} to notice the broker is gone")


def register_champion(tracking_uri: str, model_name: str, work_dir: Path) -> RegisteredModel:
    """A small bikeshare model registered under ``model_name`` with the champion alias."""
    spec = load_feature_spec("bikeshare")
    work_dir.mkdir(parents=True, exist_ok=True)
    return train_champion(
        spec,
        read_dataset(spec, since="2011-01-01", until="2011-03-01"),
        tracking_uri=tracking_uri,
        model_name=model_name,
        work_dir=work_dir,
        num_boost_round=20,
    )


async def metric(port: int | str, name: str, **labels: str) -> float | None:
    """One sample of a consumer's /metrics, or None when it is not exposed (yet)."""
    async with httpx.AsyncClient() as client:
        try:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
        except httpx.HTTPError:
            return None
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{selector}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return None


async def ensure_champion(
    spec: FeatureSpec, model: str, mlflow_settings: MlflowSettings, kafka_settings: KafkaSettings
) -> None:
    """The stack's model needs a champion; a fresh stack gets the bootstrap one, announced."""
    from driftloop.training.bootstrap import ChampionExistsError, bootstrap_model, current_champion
    from driftloop_tools.cli.model import announce_promotion

    tracking_uri = mlflow_settings.tracking_uri
    if await asyncio.to_thread(current_champion, tracking_uri, model) is not None:
        return
    try:
        result = await asyncio.to_thread(
            bootstrap_model, spec, tracking_uri=tracking_uri, model_name=model
        )
    except ChampionExistsError:
        return  # registered meanwhile by someone else
    await announce_promotion(result, kafka_settings)
