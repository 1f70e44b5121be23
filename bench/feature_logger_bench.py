"""feature-logger throughput: Kafka -> Postgres committed rows/s, against a per-row INSERT
consumer on the same data, in one run.

    uv run python bench/feature_logger_bench.py [--rows 200000] [--reference-seconds 20]

Both read the same pre-produced ``predictions`` topic (unique prefix) with their own group
and Postgres schema. The feature logger runs as its own process with its defaults (Parquet
on, flushing every 5 s); its rate is measured from its first logged row to the moment its
group's committed offsets reach the end of the topic, so start-up (imports, migrations,
group join) is not counted. The reference inserts one row per statement (autocommit) and
commits offsets per fetched batch; it runs for a fixed time, its rate is rows/s over it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from driftloop.events import kafka
from driftloop.settings import KafkaSettings, PostgresSettings, load_settings
from schemas.events import PredictionEvent
from schemas.fields import FeatureValue
from schemas.topics import Topic

REPOSITORY = Path(__file__).resolve().parents[1]
FEATURES: dict[str, FeatureValue] = {
    "season": 1, "mnth": "Jan", "hr": 8, "holiday": 0, "weekday": 2, "workingday": 1,
    "weathersit": "clear", "temp": 0.24, "atemp": 0.28, "hum": 0.81, "windspeed": 0.1,
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def produce(settings: KafkaSettings, rows: int, tag: str) -> None:
    producer = kafka.producer(settings, "bench", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    run_id = uuid.uuid4().hex
    topic = settings.topic(Topic.PREDICTIONS)
    try:
        window = []
        for index in range(rows):
            event = PredictionEvent(
                request_id=f"{tag}-{index}",
                model_name="bikeshare",
                model_version=1,
                run_id=run_id,
                features={**FEATURES, "hr": index % 24},
                prediction=float(index % 500),
                latency_ms=1.2,
                source="http",
            )
            window.append(await producer.send(topic, event.to_bytes(), key=event.partition_key()))
            if len(window) >= 10_000:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)
    finally:
        await producer.stop()


async def end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.topic(Topic.PREDICTIONS), p) for p in range(3)]
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def committed(settings: KafkaSettings, group: str, partitions: list[TopicPartition]) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return sum([await consumer.committed(tp) or 0 for tp in partitions])
    finally:
        await consumer.stop()


def start_logger(environment: dict[str, str], index: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.feature_logger"],
        cwd=REPOSITORY,
        env={**environment, "FEATURE_LOGGER_METRICS_PORT": str(free_port())},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def feature_logger_rate(
    settings: KafkaSettings, postgres: PostgresSettings, schema: str, total: int, count: int
) -> tuple[float, list[int]]:
    group = f"{schema}-logger"
    environment = {
        **os.environ,
        "KAFKA_TOPIC_PREFIX": settings.topic_prefix,
        "FEATURE_LOGGER_GROUP": group,
        "FEATURE_LOGGER_DB_SCHEMA": schema,
        "FEATURE_LOGGER_PARQUET_PREFIX": f"bench/{schema}/features/",
        "FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS": "5",
    }
    processes = [start_logger(environment, index) for index in range(count)]
    ends = await end_offsets(settings)
    connection = await asyncpg.connect(postgres.dsn())
    try:
        started = None
        rows_at_start = 0
        while True:
            try:
                rows = int(
                    await connection.fetchval(f"SELECT count(*) FROM {schema}.prediction_log")  # noqa: S608
                )
            except asyncpg.UndefinedTableError:
                rows = 0
            if started is None and rows:
                started, rows_at_start = time.monotonic(), rows
            if started is not None and rows >= total:
                done = await committed(settings, group, list(ends))
                if done >= sum(ends.values()):
                    elapsed = time.monotonic() - started
                    break
            await asyncio.sleep(0.1)
        rss = [_rss_kib(process.pid) for process in processes]
        return (total - rows_at_start) / elapsed, rss
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await connection.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def per_row_insert_rate(
    settings: KafkaSettings, postgres: PostgresSettings, schema: str, seconds: float
) -> float:
    """The naive consumer: one INSERT (its own transaction) per message."""
    connection = await asyncpg.connect(postgres.dsn())
    await connection.execute(f"CREATE SCHEMA {schema}")
    await connection.execute(
        f"CREATE TABLE {schema}.prediction_log (request_id text PRIMARY KEY, event_id uuid, "
        "predicted_at timestamptz, model_name text, model_version int, run_id text, "
        "features jsonb, prediction float8, latency_ms float8, source text)"
    )
    insert = (
        f"INSERT INTO {schema}.prediction_log VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "  # noqa: S608
        "ON CONFLICT (request_id) DO NOTHING"
    )
    consumer = kafka.consumer(settings, f"{schema}-per-row", settings.topic(Topic.PREDICTIONS))
    await consumer.start()
    rows = 0
    try:
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=500)
            for records in batch.values():
                for record in records:
                    if deadline is None:
                        deadline = time.monotonic() + seconds
                    event = PredictionEvent.from_bytes(record.value)
                    await connection.execute(
                        insert,
                        event.request_id,
                        event.event_id,
                        event.occurred_at,
                        event.model_name,
                        event.model_version,
                        event.run_id,
                        orjson.dumps(event.features).decode(),
                        event.prediction,
                        event.latency_ms,
                        event.source,
                    )
                    rows += 1
            if batch:
                await consumer.commit()
        return rows / seconds
    finally:
        await consumer.stop()
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reference-seconds", type=float, default=20.0)
    parser.add_argument(
        "--processes", type=int, default=1, help="feature-logger processes in the group"
    )
    options = parser.parse_args()
    tag = f"b{uuid.uuid4().hex[:10]}"
    settings = load_settings(KafkaSettings).model_copy(update={"topic_prefix": f"{tag}."})
    postgres = load_settings(PostgresSettings)
    await kafka.create_topics(settings, [Topic.PREDICTIONS, Topic.LABELS])
    print(f"producing {options.rows:,} predictions to {settings.topic(Topic.PREDICTIONS)} ...")
    await produce(settings, options.rows, tag)
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    rate, rss = await feature_logger_rate(
        settings, postgres, f"{tag}_copy", options.rows, options.processes
    )
    memory = ", ".join(f"{kib / 1024:.0f}" for kib in rss)
    print(
        f"feature-logger x{options.processes} (COPY micro-batches, Parquet on): "
        f"{rate:,.0f} committed rows/s (RSS MiB: {memory})"
    )
    reference = await per_row_insert_rate(
        settings, postgres, f"{tag}_per_row", options.reference_seconds
    )
    print(f"per-row INSERT consumer:                         {reference:,.0f} committed rows/s")
    print(f"ratio: {rate / reference:.1f}x (targets: >= 20,000 rows/s and >= 10x)")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    asyncio.run(main())
