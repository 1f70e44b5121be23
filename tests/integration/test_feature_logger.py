"""feature-logger on the real stack: exactly once in Postgres and Parquet across kill -9 and
outages of Postgres, the object store and the broker; labels before and after their
predictions."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest

from driftloop.events.kafka import create_topics
from driftloop.settings import KafkaSettings, ObjectStoreSettings, PostgresSettings
from driftloop.storage.objectstore import s3_client
from driftloop_tools.stack.settings import StackSettings
from schemas.events import GroundTruth, PredictionEvent
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    broker_loss_seen,
    broker_stopped,
    eventually,
    free_port,
    metric,
    produce,
)

RUN_ID = uuid.uuid4().hex
OUTAGE_BACKOFF_ROUNDS = 5
OUTAGE_FLUSH_FAILURES = 2


@dataclass
class LoggerSetup:
    kafka: KafkaSettings
    schema: str
    parquet_prefix: str
    environment: dict[str, str]
    connection: asyncpg.Connection
    tmp_path: Path

    def process(self, **overrides: str) -> ConsumerProcess:
        environment = {**self.environment, **overrides}
        return ConsumerProcess(
            "consumers.feature_logger", environment, self.tmp_path / "feature-logger.log"
        )

    async def count(self, table: str = "prediction_log") -> int:
        # The table name is one of the test's constants, never input.
        return int(await self.connection.fetchval(f"SELECT count(*) FROM {self.schema}.{table}"))  # noqa: S608

    async def rows_in_files(self) -> int:
        """Rows of the committed Parquet files (their manifest); 0 before the first start."""
        try:
            return int(
                await self.connection.fetchval(
                    f"SELECT coalesce(sum(row_count), 0) FROM {self.schema}.feature_files"  # noqa: S608
                )
            )
        except asyncpg.UndefinedTableError:
            return 0

    async def logged_request_ids(self) -> list[str]:
        rows = await self.connection.fetch(
            f"SELECT request_id FROM {self.schema}.prediction_log"  # noqa: S608
        )
        return [row["request_id"] for row in rows]


def prediction(index: int, tag: str, moment: datetime | None = None) -> PredictionEvent:
    return PredictionEvent(
        request_id=f"{tag}-{index}",
        model_name="bikeshare",
        model_version=1,
        run_id=RUN_ID,
        features={"season": 1, "mnth": "Jan", "hr": index % 24, "temp": 0.24, "weathersit": None},
        prediction=float(index),
        latency_ms=1.5,
        source="http",
        occurred_at=moment or datetime.now(UTC),
    )


@pytest.fixture
async def logger_setup(
    unique: str,
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> AsyncIterator[LoggerSetup]:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.PREDICTIONS, Topic.LABELS])
    environment = {
        "KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "FEATURE_LOGGER_GROUP": f"{unique}-feature-logger",
        "FEATURE_LOGGER_DB_SCHEMA": unique,
        "FEATURE_LOGGER_PARQUET_PREFIX": f"tests/{unique}/features/",
        "FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS": "3",
        "FEATURE_LOGGER_MAX_BATCH": "500",
        "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
    }
    connection = await asyncpg.connect(postgres_settings.dsn())
    try:
        yield LoggerSetup(
            kafka,
            unique,
            environment["FEATURE_LOGGER_PARQUET_PREFIX"],
            environment,
            connection,
            tmp_path,
        )
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await connection.close()


async def parquet_rows(
    settings: ObjectStoreSettings, prefix: str
) -> tuple[list[str], list[tuple[int, int]], list[str]]:
    """Request ids and (partition, offset) of every Parquet file under ``prefix``, and its keys."""
    request_ids: list[str] = []
    offsets: list[tuple[int, int]] = []
    keys: list[str] = []
    async with s3_client(settings) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=settings.data_bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                keys.append(item["Key"])
                body = await (await s3.get_object(Bucket=settings.data_bucket, Key=item["Key"]))[
                    "Body"
                ].read()
                table = pq.read_table(io.BytesIO(body))
                request_ids += table.column("request_id").to_pylist()
                offsets += zip(
                    table.column("kafka_partition").to_pylist(),
                    table.column("kafka_offset").to_pylist(),
                    strict=True,
                )
    return request_ids, offsets, keys


async def assert_in_parquet_once(
    setup: LoggerSetup, settings: ObjectStoreSettings, request_ids: set[str]
) -> None:
    """Every request id in exactly one row of the files, and the files are the manifest's."""
    found, offsets, keys = await parquet_rows(settings, setup.parquet_prefix)
    assert len(found) == len(request_ids), "a row is missing or duplicated in the Parquet files"
    assert set(found) == request_ids
    assert len(set(offsets)) == len(offsets)
    manifest = await setup.connection.fetch(
        f"SELECT object_key FROM {setup.schema}.feature_files"  # noqa: S608
    )
    assert sorted(keys) == sorted(row["object_key"] for row in manifest)
    assert all("/model=bikeshare/date=" in key and "/hour=" in key for key in keys)


async def test_kill_9_mid_stream_logs_every_prediction_exactly_once(
    logger_setup: LoggerSetup, object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    total = 12_000
    events = [prediction(index, unique) for index in range(total)]
    logger = logger_setup.process().start()
    try:
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[: total // 4])

        async def flushed() -> bool:
            return await logger_setup.rows_in_files() > 0

        await eventually(flushed, what="a first Parquet flush")
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[total // 4 : total // 2])

        async def parquet_behind_postgres() -> bool:
            # Kill when Postgres holds rows the committed Parquet files do not yet: the restart
            # must seek back for Parquet and re-insert nothing in Postgres.
            return await logger_setup.rows_in_files() < await logger_setup.count()

        await eventually(parquet_behind_postgres, what="rows logged after the last flush")
        logger.kill()
        # The rest of the stream arrives while the logger is dead, with duplicates of the first
        # half (a producer retrying): still exactly one row each.
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[total // 2 :] + events[:500])
        logger = logger_setup.process().start()

        async def all_logged() -> bool:
            return await logger_setup.count() == total

        await eventually(all_logged, within=120, what=f"{total} rows in Postgres")

        async def all_in_parquet() -> bool:
            return await logger_setup.rows_in_files() >= total

        await eventually(all_in_parquet, within=120, what=f"{total} rows in Parquet files")
        assert logger.terminate() == 0, logger.log()
    finally:
        logger.close()

    distinct = await logger_setup.connection.fetchval(
        f"SELECT count(DISTINCT request_id) FROM {unique}.prediction_log"  # noqa: S608
    )
    assert distinct == total
    await assert_in_parquet_once(
        logger_setup, object_store_settings, {event.request_id for event in events}
    )


async def test_labels_join_predictions_whatever_the_order(
    logger_setup: LoggerSetup, unique: str
) -> None:
    now = datetime.now(UTC)
    early = [prediction(index, unique, now) for index in range(10)]
    late = [prediction(index, unique, now) for index in range(10, 20)]
    labels = [
        GroundTruth(request_id=f"{unique}-{index}", label=float(index), observed_at=now)
        for index in range(20)
    ]
    corrected = GroundTruth(
        request_id=f"{unique}-0", label=99.0, observed_at=now + timedelta(minutes=5)
    )
    await produce(logger_setup.kafka, Topic.PREDICTIONS, early)
    logger = logger_setup.process(FEATURE_LOGGER_PARQUET_ENABLED="false").start()
    try:

        async def early_logged() -> bool:
            try:
                return await logger_setup.count() == 10
            except asyncpg.UndefinedTableError:
                return False

        await eventually(early_logged, what="the first predictions")
        # Labels 10..19 arrive before their predictions: pending until they do.
        await produce(logger_setup.kafka, Topic.LABELS, [*labels, *labels[:5], corrected])

        async def pending() -> bool:
            return await logger_setup.count("pending_labels") == 10

        await eventually(pending, what="pending labels")
        assert await logger_setup.count("labels") == 10
        await produce(logger_setup.kafka, Topic.PREDICTIONS, late)

        async def joined() -> bool:
            return await logger_setup.count("labels") == 20

        await eventually(joined, what="every label joined")
        assert logger.terminate() == 0, logger.log()
    finally:
        logger.close()
    assert await logger_setup.count("pending_labels") == 0
    first = await logger_setup.connection.fetchval(
        f"SELECT label FROM {unique}.labels WHERE request_id = $1",  # noqa: S608
        f"{unique}-0",
    )
    assert first == 99.0


class TcpProxy:
    """A TCP forwarder (to Postgres, the object store) the test takes down and brings back on
    one port: a sink outage for one consumer process, the shared stack untouched."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self.writers -= {writer, upstream_writer}


async def test_postgres_outage_pauses_then_drains_without_loss(
    logger_setup: LoggerSetup, postgres_settings: PostgresSettings, unique: str
) -> None:
    proxy = TcpProxy(free_port(), (postgres_settings.host, postgres_settings.port))
    await proxy.up()
    metrics_port = logger_setup.environment["FEATURE_LOGGER_METRICS_PORT"]
    logger = logger_setup.process(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(proxy.port)).start()
    total = 3000
    events = [prediction(index, unique) for index in range(total)]
    try:
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[:1000])

        async def first_logged() -> bool:
            try:
                return await logger_setup.count() == 1000
            except asyncpg.UndefinedTableError:
                return False

        await eventually(first_logged, what="rows before the outage")
        await proxy.down()
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[1000:])

        async def backing_off() -> bool:
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            return 'driftloop_consumer_sinks_up{consumer="feature-logger"} 0.0' in text

        await eventually(backing_off, what="the logger to pause on the failing sink")
        assert logger.alive(), logger.log()
        assert await logger_setup.count() == 1000

        async def several_backoffs() -> bool:
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            line = 'driftloop_consumer_backoffs_total{consumer="feature-logger"} '
            rounds = [
                float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)
            ]
            return bool(rounds) and rounds[0] >= OUTAGE_BACKOFF_ROUNDS

        # The outage lasts several backoff rounds (0.5 + 1 + 2 + 4 + 8 s), not a fixed sleep.
        await eventually(several_backoffs, within=60, what="several backoff rounds")
        assert await logger_setup.count() == 1000
        await proxy.up()

        async def drained() -> bool:
            return await logger_setup.count() == total

        await eventually(drained, within=90, what="the lag to drain after the outage")
        # In a thread: the proxy runs on this event loop and must keep forwarding meanwhile.
        assert await asyncio.to_thread(logger.terminate) == 0, logger.log()
    finally:
        await asyncio.to_thread(logger.close)
        if proxy.server is not None:
            await proxy.down()
    assert "consumption paused" in logger.log()


async def test_object_store_outage_keeps_logging_then_flushes_every_row_once(
    logger_setup: LoggerSetup, object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    endpoint = urlsplit(object_store_settings.endpoint_url)
    assert endpoint.hostname is not None
    assert endpoint.port is not None
    proxy = TcpProxy(free_port(), (endpoint.hostname, endpoint.port))
    await proxy.up()
    metrics_port = logger_setup.environment["FEATURE_LOGGER_METRICS_PORT"]
    logger = logger_setup.process(
        S3_ENDPOINT_URL=f"{endpoint.scheme}://127.0.0.1:{proxy.port}",
        FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS="1",
    ).start()
    total = 3000
    events = [prediction(index, unique) for index in range(total)]
    try:
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[:1000])

        async def first_flushed() -> bool:
            return await logger_setup.rows_in_files() == 1000

        await eventually(first_flushed, what="the rows before the outage in Parquet")
        # Nothing is buffered now, so no flush is in flight when the proxy goes down.
        await proxy.down()
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[1000:2000])

        async def flush_failed() -> bool:
            failures = await metric(
                metrics_port, "driftloop_feature_logger_parquet_flush_failures_total"
            )
            return (failures or 0) >= 1

        await eventually(flush_failed, what="a failed Parquet flush")
        # Produced after the flushes began to fail: Postgres logging does not wait for them.
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[2000:])

        async def all_logged() -> bool:
            return await logger_setup.count() == total

        await eventually(all_logged, what=f"{total} rows in Postgres, the object store down")

        async def flushes_failing() -> bool:
            failures = await metric(
                metrics_port, "driftloop_feature_logger_parquet_flush_failures_total"
            )
            buffered = await metric(metrics_port, "driftloop_feature_logger_parquet_buffered_rows")
            return (failures or 0) >= OUTAGE_FLUSH_FAILURES and buffered == total - 1000

        await eventually(flushes_failing, what="failed flushes with the rows buffered")
        assert logger.alive(), logger.log()
        assert await logger_setup.rows_in_files() == 1000
        # Parquet keeps its own offsets: the object store being away pauses nothing.
        assert (
            await metric(metrics_port, "driftloop_consumer_sinks_up", consumer="feature-logger")
            == 1.0
        )
        assert (
            await metric(
                metrics_port, "driftloop_consumer_backoffs_total", consumer="feature-logger"
            )
            == 0.0
        )
        await proxy.up()

        async def all_in_files() -> bool:
            return await logger_setup.rows_in_files() >= total

        await eventually(all_in_files, what=f"{total} rows in Parquet after the outage")
        # In a thread: the proxy runs on this event loop and must keep forwarding meanwhile.
        assert await asyncio.to_thread(logger.terminate) == 0, logger.log()
    finally:
        await asyncio.to_thread(logger.close)
        if proxy.server is not None:
            await proxy.down()
    assert "Parquet flush failed" in logger.log()
    await assert_in_parquet_once(
        logger_setup, object_store_settings, {event.request_id for event in events}
    )


async def test_broker_outage_mid_stream_logs_every_prediction_once(
    logger_setup: LoggerSetup,
    object_store_settings: ObjectStoreSettings,
    stack_settings: StackSettings,
    unique: str,
) -> None:
    metrics_port = logger_setup.environment["FEATURE_LOGGER_METRICS_PORT"]
    # Small batches: logging the backlog takes seconds, so the broker stops in the middle of it.
    logger = logger_setup.process(FEATURE_LOGGER_MAX_BATCH="50").start()
    total, before = 12_000, 10_000
    events = [prediction(index, unique) for index in range(total)]
    try:

        async def ready() -> bool:
            value = await metric(
                metrics_port, "driftloop_consumer_ready", consumer="feature-logger"
            )
            return value == 1.0

        await eventually(ready, what="the logger in its group")
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[:before])

        async def consuming() -> bool:
            return await logger_setup.count() > 0

        await eventually(consuming, what="the first rows logged")
        seen = len(logger.log())
        async with broker_stopped(stack_settings):
            await broker_loss_seen(logger, seen)
            assert logger.alive(), logger.log()
            assert await logger_setup.count() < before, "the backlog was logged before the outage"
        assert logger.alive(), logger.log()
        await produce(logger_setup.kafka, Topic.PREDICTIONS, events[before:])

        async def all_logged() -> bool:
            return await logger_setup.count() == total

        await eventually(all_logged, within=120, what=f"{total} rows in Postgres")
        await eventually(ready, within=60, what="the logger ready again")

        async def all_in_files() -> bool:
            return await logger_setup.rows_in_files() >= total

        await eventually(all_in_files, what=f"{total} rows in Parquet")
        assert logger.alive(), logger.log()
        assert await asyncio.to_thread(logger.terminate) == 0, logger.log()
    finally:
        await asyncio.to_thread(logger.close)
    logged = await logger_setup.logged_request_ids()
    assert len(logged) == total, "a prediction is missing or logged twice"
    assert set(logged) == {event.request_id for event in events}
    await assert_in_parquet_once(
        logger_setup, object_store_settings, {event.request_id for event in events}
    )
