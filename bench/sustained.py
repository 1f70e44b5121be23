"""Sustained load (issue 4): the gateway at 1,000 requests/s for 5 minutes with the logger running.

The issue's targets: every request id is in Postgres, the feature-logger's consumer lag
p99 < 5 s, its resident memory flat. The bench starts its own gateway and feature-logger (own
topic prefix, consumer group, Postgres schema and a model of its own in the dev stack's
MLflow), so their figures are theirs alone and the dev stack never sees the synthetic rows:
its drift monitor judges the prediction log in windows of 168 rows, and 300,000 identical rows
there would be judged as drift and set off retraining.

Load: vegeta at a constant rate, open loop (a slow answer does not slow the sending, as it
does with wrk's fixed connections), one JSON target per request, each with its own
X-Request-ID, so every id is looked up in Postgres afterwards. When vegeta is missing it is
installed with ``go install`` (Go module proxy) into the stack's runtimes folder.

Every second: the logger group's lag on the predictions topic measured from Kafka (end offsets
minus committed offsets, and its age: how long ago the oldest uncommitted record was appended,
interpolated on the timeline of end offsets), the logger's own driftloop_consumer_lag gauge,
the resident memory and CPU of the logger, the gateway and vegeta, the gateway's Kafka state.

    uv run python bench/sustained.py [--rate 1000] [--seconds 300] [--warmup 60]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from driftloop.events.kafka import create_topics
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings, load_settings
from driftloop.training import trainer
from driftloop_tools.stack.settings import StackSettings
from gateway.contract import example_row
from schemas.features import load_feature_spec
from schemas.topics import Topic, topic_specs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12"
VEGETA_VERSION = "v12.13.0"
LOGGER = "feature-logger"
LAG_TARGET_SECONDS = 5.0
# Memory is flat when the largest RSS of the last window is within this of the first window's
# after the warm-up. The logger buffers a Parquet flush interval of rows (60 s by default, 60,000
# rows here) before it writes them: its RSS climbs for the whole first interval, then rises and
# falls with each buffer. So the warm-up is one interval, and each window spans one, so that two
# windows compare like with like where two single samples could catch different points.
FLAT_TOLERANCE = 0.10
MEMORY_WINDOW_SECONDS = 60.0
WARMUP_SECONDS = 60.0
MEMORY_VERDICT = f"logger memory flat (<= +{FLAT_TOLERANCE:.0%})"
RATE_TOLERANCE = 0.01
NO_TARGETS = "no targets to attack"
WARM_REQUESTS = 200
ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")
MIB = 1024 * 1024


@dataclass
class Sample:
    """One second of the run, as seen from outside the processes."""

    t: float
    phase: str
    lag_records: int | None
    """None when Kafka did not answer (the broker down or moving its partitions)."""
    lag_seconds: float | None
    topic_records: int | None
    """Records on the predictions topic (its end offsets), None when Kafka did not answer."""
    logger_lag_gauge: float | None
    logger_rss_mib: float
    gateway_rss_mib: float
    logger_cpu_percent: float
    gateway_cpu_percent: float
    relay_cpu_percent: float
    """The gateway's publishing relay (its child process)."""
    vegeta_cpu_percent: float
    bench_cpu_percent: float
    """This script (the sampler, reading vegeta's results after the load)."""
    others_cpu_percent: float
    """The rest of the machine (Kafka, Postgres, the dev stack, other work), in % of one core."""
    gateway_kafka: str
    """The gateway's Kafka state from /health/ready, or ``unanswered`` (busy for over 2 s)."""
    gateway_spool_depth: int
    load1: float


@dataclass
class LoadResult:
    """What vegeta sent and what came back."""

    sent: int
    answered_2xx: set[str] = field(default_factory=set)
    status_codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    per_second: Counter[str] = field(default_factory=Counter)
    report: dict[str, Any] = field(default_factory=dict)


def code_version() -> str:
    """The commit measured, with ``+changes`` when the working tree differs from it."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{commit or 'unknown'}{'+changes' if changed else ''}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def vegeta_binary(runtimes: Path) -> Path:
    """vegeta from the stack's runtimes folder, installed there with ``go install`` if missing."""
    folder = runtimes / f"vegeta-{VEGETA_VERSION.removeprefix('v')}"
    binary = folder / "vegeta"
    if binary.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        sys.exit("vegeta is missing and there is no Go toolchain to install it with")
    print(f"vegeta not found: go install {VEGETA_MODULE}@{VEGETA_VERSION} into {folder} ...")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [go, "install", f"{VEGETA_MODULE}@{VEGETA_VERSION}"],
        env={**os.environ, "GOBIN": str(folder)},
        check=True,
    )
    return binary


@contextmanager
def process(command: list[str], env: Mapping[str, str], log: Path) -> Iterator[psutil.Popen]:
    """A process in its own group with its output in ``log``; SIGTERM (then SIGKILL) at exit."""
    with log.open("w") as output:
        started = psutil.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield started
    finally:
        with suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGTERM)
        try:
            started.wait(timeout=60)
        except psutil.TimeoutExpired:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()


async def wait_until_ready(
    started: psutil.Popen, url: str, ready: Any, what: str, log: Path, within: float = 180
) -> None:
    """Poll ``url`` until ``ready(response)``; fail early if the process exits."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if started.poll() is not None:
                sys.exit(f"{what} exited ({started.returncode}); see {log}")
            with suppress(httpx.HTTPError):
                if ready(await client.get(url)):
                    return
            if time.monotonic() > deadline:
                sys.exit(f"{what} not ready in {within:.0f} s; see {log}")
            await asyncio.sleep(0.5)


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None when absent."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


class EndOffsetTimeline:
    """Each partition's end offset at each sample: when the records were appended."""

    def __init__(self) -> None:
        self.points: dict[TopicPartition, list[tuple[float, int]]] = {}

    def add(self, now: float, ends: Mapping[TopicPartition, int]) -> None:
        for tp, end in ends.items():
            self.points.setdefault(tp, []).append((now, end))

    def appended_at(self, tp: TopicPartition, offset: int) -> float:
        """When the record at ``offset`` was appended, linear between two samples."""
        points = self.points[tp]
        index = bisect.bisect_right(points, offset, key=lambda point: point[1])
        if index == 0:
            return points[0][0]  # appended before the first sample: at least this old
        if index == len(points):
            return points[-1][0]
        (before, end_before), (after, end_after) = points[index - 1], points[index]
        return before + (after - before) * (offset + 1 - end_before) / (end_after - end_before)

    def age(self, now: float, committed: Mapping[TopicPartition, int]) -> float:
        """Age of the oldest record not committed by the group, over all partitions."""
        ages = [0.0]
        for tp, points in self.points.items():
            position = committed.get(tp, 0)
            if position < points[-1][1]:
                ages.append(now - self.appended_at(tp, position))
        return max(ages)


class Sampler:
    """Samples the run every second (see the module docstring)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        group: str,
        logger: psutil.Popen,
        gateway: psutil.Popen,
        logger_metrics: str,
        gateway_url: str,
    ) -> None:
        self.kafka = kafka
        self.group = group
        self.logger = logger
        self.gateway = gateway
        self.vegeta: psutil.Process | None = None
        self.logger_metrics = logger_metrics
        self.gateway_url = gateway_url
        self.topic = kafka.topic(Topic.PREDICTIONS)
        self.partitions: list[TopicPartition] = []
        self.timeline = EndOffsetTimeline()
        self.samples: list[Sample] = []
        self.started = 0.0
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Sampler:
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka.bootstrap_servers)
        await self.admin.start()
        self._stack.push_async_callback(self.admin.close)
        self.offsets = AIOKafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers)
        await self.offsets.start()
        self._stack.push_async_callback(self.offsets.stop)
        self.http = await self._stack.enter_async_context(httpx.AsyncClient(timeout=2))
        self.partitions = predictions_partitions(self.kafka)
        self.bench = psutil.Process()
        # The gateway is ready, so its relay runs (none with GATEWAY_PUBLISHER_PROCESS=false).
        self.relays = self.gateway.children()
        for watched in (self.logger, self.gateway, self.bench, *self.relays):
            watched.cpu_percent()
        psutil.cpu_percent()
        self.cores = psutil.cpu_count() or 1
        self.started = time.monotonic()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def watch_vegeta(self, pid: int) -> None:
        self.vegeta = psutil.Process(pid)
        self.vegeta.cpu_percent()

    async def lag(self) -> tuple[int, float, int]:
        """Records not committed by the logger's group, the age of the oldest of them, and the
        records on the topic."""
        # Committed first, ends second: a commit can never look ahead of the end it is
        # compared with.
        committed = {
            tp: meta.offset
            for tp, meta in (await self.admin.list_consumer_group_offsets(self.group)).items()
            if tp.topic == self.topic and meta.offset >= 0
        }
        ends = await self.offsets.end_offsets(self.partitions)
        now = time.monotonic()
        self.timeline.add(now, ends)
        records = sum(end - committed.get(tp, 0) for tp, end in ends.items())
        return records, self.timeline.age(now, committed), sum(ends.values())

    async def sample(self, phase: str) -> Sample:
        lag_records: int | None = None
        lag_seconds: float | None = None
        topic_records: int | None = None
        with suppress(KafkaError, OSError):
            lag_records, lag_seconds, topic_records = await asyncio.wait_for(self.lag(), 5)
        gauge = None
        with suppress(httpx.HTTPError):
            text = (await self.http.get(self.logger_metrics)).text
            gauge = metric_sum(text, "driftloop_consumer_lag", consumer=LOGGER, topic=self.topic)
        kafka_state, spool = "unanswered", -1
        with suppress(httpx.HTTPError, ValueError, KeyError):
            ready = (await self.http.get(f"{self.gateway_url}/health/ready")).json()
            kafka_state, spool = str(ready["kafka"]), int(ready["spool_depth"])
        relay_cpu = 0.0
        for relay in self.relays:
            with suppress(psutil.NoSuchProcess):
                relay_cpu += relay.cpu_percent()
        vegeta_cpu = 0.0
        if self.vegeta is not None:
            with suppress(psutil.NoSuchProcess):
                vegeta_cpu = self.vegeta.cpu_percent()
        sample = Sample(
            t=round(time.monotonic() - self.started, 3),
            phase=phase,
            lag_records=lag_records,
            lag_seconds=None if lag_seconds is None else round(lag_seconds, 3),
            topic_records=topic_records,
            logger_lag_gauge=gauge,
            logger_rss_mib=round(self.logger.memory_info().rss / MIB, 1),
            gateway_rss_mib=round(self.gateway.memory_info().rss / MIB, 1),
            logger_cpu_percent=self.logger.cpu_percent(),
            gateway_cpu_percent=self.gateway.cpu_percent(),
            relay_cpu_percent=relay_cpu,
            vegeta_cpu_percent=vegeta_cpu,
            bench_cpu_percent=self.bench.cpu_percent(),
            others_cpu_percent=0.0,
            gateway_kafka=kafka_state,
            gateway_spool_depth=spool,
            load1=os.getloadavg()[0],
        )
        sample.others_cpu_percent = max(
            0.0,
            psutil.cpu_percent() * self.cores
            - sample.logger_cpu_percent
            - sample.gateway_cpu_percent
            - sample.relay_cpu_percent
            - sample.vegeta_cpu_percent
            - sample.bench_cpu_percent,
        )
        self.samples.append(sample)
        return sample

    async def every_second(self, phase: str, until: Any) -> None:
        """Sample once a second until ``until(sample)`` is true."""
        tick = time.monotonic()
        while True:
            sample = await self.sample(phase)
            if until(sample):
                return
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - time.monotonic()))


def predictions_partitions(settings: KafkaSettings) -> list[TopicPartition]:
    topic = settings.topic(Topic.PREDICTIONS)
    (count,) = (
        spec.partitions for spec in topic_specs(settings.topic_prefix) if spec.name == topic
    )
    return [TopicPartition(topic, partition) for partition in range(count)]


async def topic_size(settings: KafkaSettings) -> int:
    """Records on the predictions topic: its partitions' end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(predictions_partitions(settings))).values())
    finally:
        await consumer.stop()


async def delete_topics(settings: KafkaSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        names = [
            spec.name
            for spec in topic_specs(settings.topic_prefix)
            if spec.name in set(await admin.list_topics())
        ]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def write_targets(path: Path, url: str, row: dict[str, Any], count: int) -> list[str]:
    """vegeta's JSON targets, one line per request, each with its own X-Request-ID."""
    body = base64.b64encode(orjson.dumps(row)).decode()
    ids = [f"req-{index:07d}" for index in range(count)]
    with path.open("wb") as targets:
        for request_id in ids:
            target = {
                "method": "POST",
                "url": url,
                "body": body,
                "header": {"Content-Type": ["application/json"], "X-Request-ID": [request_id]},
            }
            targets.write(orjson.dumps(target) + b"\n")
    return ids


def read_results(vegeta: Path, results: Path) -> LoadResult:
    """Every vegeta result (status, latency, the id echoed in X-Request-ID) and its report."""
    load = LoadResult(sent=0)
    with subprocess.Popen(
        [str(vegeta), "encode", "-to", "json", str(results)], stdout=subprocess.PIPE
    ) as encode:
        assert encode.stdout is not None
        for line in encode.stdout:
            result = orjson.loads(line)
            if result["error"] == NO_TARGETS:
                continue  # a tick after the last target: nothing was sent
            load.sent += 1
            load.per_second[result["timestamp"][:19]] += 1
            load.latencies_ms.append(result["latency"] / 1e6)
            code = int(result["code"])
            load.status_codes[str(code)] += 1
            if result["error"]:
                load.errors[ADDRESS.sub("<address>", result["error"])] += 1
            if 200 <= code < 300:
                load.answered_2xx.update((result.get("headers") or {}).get("X-Request-Id", []))
    report = subprocess.run(
        [str(vegeta), "report", "-type", "json", str(results)],
        capture_output=True,
        check=True,
    )
    load.report = orjson.loads(report.stdout)
    return load


async def postgres_figures(postgres: PostgresSettings, schema: str) -> dict[str, Any]:
    """Request ids logged, rows, and prediction -> Postgres delays of the bench's rows."""
    connection = await asyncpg.connect(postgres.dsn())
    try:
        # The schema name is the bench's own constant pattern, never input.
        rows = await connection.fetch(f"SELECT request_id FROM {schema}.prediction_log")  # noqa: S608
        delay = await connection.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT request_id) AS distinct_ids, "  # noqa: S608
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99, max(d) AS max "
            "FROM (SELECT request_id, extract(epoch FROM logged_at - predicted_at)::float8 AS d "
            f"FROM {schema}.prediction_log WHERE starts_with(request_id, 'req-')) AS logged"
        )
    finally:
        await connection.close()
    return {"request_ids": {row["request_id"] for row in rows}, **dict(delay)}


async def parquet_rows(postgres: PostgresSettings, schema: str) -> int:
    connection = await asyncpg.connect(postgres.dsn())
    try:
        return int(
            await connection.fetchval(
                f"SELECT coalesce(sum(row_count), 0) FROM {schema}.feature_files"  # noqa: S608
            )
        )
    finally:
        await connection.close()


async def drop_schema(postgres: PostgresSettings, schema: str) -> None:
    connection = await asyncpg.connect(postgres.dsn())
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


def percentiles(values: list[float], *quantiles: float) -> list[float]:
    if not values:
        return [float("nan")] * len(quantiles)
    return [float(np.percentile(values, q)) for q in quantiles]


def memory_verdict(samples: list[Sample], warmup: float, end: float) -> dict[str, Any]:
    """Largest RSS of the first window after warm-up against that of the last window."""
    window = min(MEMORY_WINDOW_SECONDS, (end - warmup) / 2)
    first = [s.logger_rss_mib for s in samples if warmup <= s.t < warmup + window]
    last = [s.logger_rss_mib for s in samples if end - window <= s.t <= end]
    after = [s for s in samples if s.t >= warmup]
    start_mib, end_mib = max(first), max(last)
    slope = (
        float(np.polyfit([s.t for s in after], [s.logger_rss_mib for s in after], 1)[0]) * 60
        if len(after) > 2
        else float("nan")
    )
    return {
        "window_seconds": window,
        "start_mib": start_mib,
        "end_mib": end_mib,
        "growth": end_mib / start_mib - 1,
        "trend_mib_per_minute": slope,
        "first_sample_after_warmup_mib": after[0].logger_rss_mib,
        "last_sample_mib": last[-1],
        "max_mib": max(s.logger_rss_mib for s in samples),
    }


async def run(arguments: argparse.Namespace) -> None:
    rate, seconds = arguments.rate, arguments.seconds
    warmup = min(arguments.warmup, seconds / 4)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"sustained-{stamp}-", dir=RESULTS))
    stack = load_settings(StackSettings)
    vegeta = vegeta_binary(stack.runtimes)
    mlflow = load_settings(MlflowSettings)
    postgres = load_settings(PostgresSettings)
    kafka = load_settings(KafkaSettings).model_copy(update={"topic_prefix": f"sustained{stamp}."})
    schema = f"sustained_{stamp.lower()}"
    group = f"sustained-{stamp}-{LOGGER}"
    await create_topics(kafka, [Topic.PREDICTIONS, Topic.LABELS, Topic.MODEL_EVENTS])

    spec = load_feature_spec("bikeshare")
    model_name = f"bench-sustained-{stamp}"
    trainer.train_champion(
        spec,
        trainer.read_dataset(spec, since="2011-01-01", until="2011-04-01"),
        tracking_uri=mlflow.tracking_uri,
        model_name=model_name,
        work_dir=work,
        num_boost_round=arguments.trees,
    )

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
        "KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
    }
    gateway_port, metrics_port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    logger_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    logger_env = {
        **env,
        "FEATURE_LOGGER_GROUP": group,
        "FEATURE_LOGGER_DB_SCHEMA": schema,
        "FEATURE_LOGGER_PARQUET_PREFIX": f"bench/{schema}/features/",
        "FEATURE_LOGGER_METRICS_PORT": str(metrics_port),
    }
    gateway_env = {
        **env,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_MODEL_NAME": model_name,
        "GATEWAY_ADMIN_TOKEN": secrets.token_urlsafe(16),
        "GATEWAY_MODEL_CACHE_DIR": str(work / "models"),
        "GATEWAY_SPOOL_PATH": str(work / "spool.sqlite3"),
        "GATEWAY_MODEL_POLL_SECONDS": "3600",
    }
    targets, results = work / "targets.jsonl", work / "results.bin"
    ids = write_targets(targets, f"{gateway_url}/predict", example_row(spec), rate * seconds)
    load_before = os.getloadavg()
    python = sys.executable
    try:
        with (
            process([python, "-m", "consumers.feature_logger"], logger_env, work / "logger.log")
            as logger,
            process([python, "-m", "gateway"], gateway_env, work / "gateway.log") as gateway,
        ):  # fmt: skip
            await wait_until_ready(
                logger,
                logger_metrics,
                lambda r: metric_sum(r.text, "driftloop_consumer_ready", consumer=LOGGER) == 1,
                "feature-logger",
                work / "logger.log",
            )
            await wait_until_ready(
                gateway,
                f"{gateway_url}/health/ready",
                lambda r: r.status_code == 200 and r.json()["kafka"] == "direct",
                "gateway",
                work / "gateway.log",
            )
            async with httpx.AsyncClient(timeout=10) as client:
                for index in range(WARM_REQUESTS):  # the first targets find the gateway warm
                    response = await client.post(
                        f"{gateway_url}/predict",
                        json=example_row(spec),
                        headers={"X-Request-ID": f"warm-{index:03d}"},
                    )
                    response.raise_for_status()
            print(
                f"{rate}/s for {seconds} s at {gateway_url} (gateway pid {gateway.pid}, "
                f"feature-logger pid {logger.pid}, group {group}, schema {schema}) ..."
            )
            async with Sampler(
                kafka, group, logger, gateway, logger_metrics, gateway_url
            ) as sampler:
                await sampler.sample("before")
                before_rss = sampler.samples[-1].logger_rss_mib
                sampler.started = time.monotonic()
                sampler.samples.clear()
                with (work / "vegeta.log").open("w") as vegeta_log:
                    attack = await asyncio.create_subprocess_exec(
                        str(vegeta), "attack", "-format=json", "-lazy", f"-targets={targets}",
                        f"-rate={rate}/1s", f"-duration={seconds}s", "-max-body=0",
                        "-timeout=30s", f"-output={results}",
                        stderr=vegeta_log,
                    )  # fmt: skip
                sampler.watch_vegeta(attack.pid)
                try:
                    await sampler.every_second("load", lambda _: attack.returncode is not None)
                finally:
                    if attack.returncode is None:
                        attack.terminate()
                    await attack.wait()
                if attack.returncode != 0:
                    sys.exit(f"vegeta failed ({attack.returncode}); see {work / 'vegeta.log'}")
                load_end = sampler.samples[-1].t
                # Sampling goes on while vegeta's results are read (some seconds for 300,000).
                reading = asyncio.create_task(asyncio.to_thread(read_results, vegeta, results))
                deadline = load_end + arguments.drain_seconds

                def caught_up(sample: Sample) -> bool:
                    # Every accepted event on the topic (none left in the gateway's spool) and
                    # committed by the logger: all it will ever log is in Postgres.
                    accepted = len(reading.result().answered_2xx) + WARM_REQUESTS
                    return (
                        sample.lag_records == 0
                        and sample.gateway_spool_depth == 0
                        and (sample.topic_records or 0) >= accepted
                    )

                await sampler.every_second(
                    "drain",
                    lambda s: (reading.done() and caught_up(s)) or s.t > deadline,
                )
                load = await reading
                accepted = len(load.answered_2xx) + WARM_REQUESTS
                drain_seconds = next(
                    (s.t - load_end for s in sampler.samples if s.t >= load_end and caught_up(s)),
                    None,
                )
                logged = await postgres_figures(postgres, schema)
                metrics = (await sampler.http.get(logger_metrics)).text
                duplicates_ignored = metric_sum(
                    metrics, "driftloop_consumer_duplicates_total", consumer=LOGGER, sink="postgres"
                )
                samples = sampler.samples
        # Both stopped: the logger flushed its last Parquet rows on SIGTERM.
        in_parquet = await parquet_rows(postgres, schema)
        topic_records = await topic_size(kafka)
    finally:
        if not arguments.keep:
            await drop_schema(postgres, schema)
            await delete_topics(kafka)
            targets.unlink(missing_ok=True)
            results.unlink(missing_ok=True)

    missing = [
        request_id for request_id in ids[: load.sent] if request_id not in logged["request_ids"]
    ]
    figures = summarise(
        load=load,
        samples=samples,
        rate=rate,
        warmup=warmup,
        load_end=load_end,
        drain_seconds=drain_seconds,
        logged=logged,
        missing=missing,
        topic_records=topic_records,
        accepted=accepted,
        duplicates_ignored=duplicates_ignored,
        in_parquet=in_parquet,
        before_rss=before_rss,
        load_average=(list(load_before), list(os.getloadavg())),
    )
    figures["setup"] = {
        "stamp": stamp,
        "rate": rate,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "vegeta": f"{VEGETA_MODULE}@{VEGETA_VERSION}",
        "trees": arguments.trees,
        "topic_prefix": kafka.topic_prefix,
        "group": group,
        "schema": schema,
        "kept": arguments.keep,
        "cores": os.cpu_count(),
        "code": code_version(),
    }
    print_report(figures)
    document = {**figures, "samples": [asdict(sample) for sample in samples]}
    path = RESULTS / f"sustained-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nresults: {path}  (logs in {work})")


def spread(values: list[float]) -> dict[str, float]:
    p50, p99, top = percentiles(values, 50, 99, 100)
    return {"p50": p50, "p99": p99, "max": top}


def summarise(
    *,
    load: LoadResult,
    samples: list[Sample],
    rate: int,
    warmup: float,
    load_end: float,
    drain_seconds: float | None,
    logged: dict[str, Any],
    missing: list[str],
    topic_records: int,
    accepted: int,
    duplicates_ignored: float | None,
    in_parquet: int,
    before_rss: float,
    load_average: tuple[list[float], list[float]],
) -> dict[str, Any]:
    under_load = [s for s in samples if s.phase == "load"]
    gauge = [s.logger_lag_gauge for s in under_load if s.logger_lag_gauge is not None]
    memory = memory_verdict(under_load, warmup, load_end)
    full_seconds = [n for _, n in sorted(load.per_second.items())[1:-1]]  # ends are partial
    not_2xx = load.sent - len(load.answered_2xx)
    latency = percentiles(load.latencies_ms, 50, 90, 99, 100)
    figures: dict[str, Any] = {
        "load": {
            "sent": load.sent,
            "rate": load.report["rate"],
            "throughput": load.report["throughput"],
            "slowest_second": min(full_seconds, default=0),
            "fastest_second": max(full_seconds, default=0),
            "latency_ms": dict(zip(("p50", "p90", "p99", "max"), latency, strict=True)),
            "status_codes": dict(load.status_codes),
            "errors": dict(load.errors),
            "not_2xx": not_2xx,
        },
        "lag": {
            "records": spread(
                [float(s.lag_records) for s in under_load if s.lag_records is not None]
            ),
            "seconds": spread([s.lag_seconds for s in under_load if s.lag_seconds is not None]),
            "samples_without_kafka": sum(s.lag_records is None for s in samples),
            "logger_gauge_records": spread(gauge),
            "drain_seconds": drain_seconds,
        },
        "memory": {"before_load_mib": before_rss, **memory},
        "gateway": {
            "rss_first_mib": under_load[0].gateway_rss_mib,
            "rss_last_mib": under_load[-1].gateway_rss_mib,
            "kafka_trouble_samples": sum(
                s.gateway_kafka not in {"direct", "unanswered"} for s in samples
            ),
            "health_unanswered_samples": sum(s.gateway_kafka == "unanswered" for s in samples),
            "max_spool_depth": max(s.gateway_spool_depth for s in samples),
        },
        "cpu_percent_mean": {
            name: float(np.mean([getattr(s, f"{name}_cpu_percent") for s in under_load]))
            for name in ("gateway", "relay", "logger", "vegeta", "bench", "others")
        },
        "postgres": {
            "sent_ids_logged": load.sent - len(missing),
            "missing": len(missing),
            "missing_answered_2xx": sum(r in load.answered_2xx for r in missing),
            "missing_examples": missing[:10],
            "rows": logged["rows"],
            "duplicate_rows": logged["rows"] - logged["distinct_ids"],
            "prediction_to_row_seconds": {q: logged[q] for q in ("p50", "p99", "max")},
            "topic_records": topic_records,
            "accepted_requests": accepted,
            "logger_duplicates_ignored": duplicates_ignored,
            "parquet_rows": in_parquet,
        },
        "load_average": {"before": load_average[0], "after": load_average[1]},
    }
    figures["verdict"] = {
        "every request id in Postgres": load.sent > 0 and not missing,
        "no duplicate rows": figures["postgres"]["duplicate_rows"] == 0,
        f"consumer lag p99 < {LAG_TARGET_SECONDS:g} s": figures["lag"]["seconds"]["p99"]
        < LAG_TARGET_SECONDS,
        # None (not judged) when the run is too short for a warm-up and two full windows.
        MEMORY_VERDICT: memory["growth"] <= FLAT_TOLERANCE
        if memory["window_seconds"] >= MEMORY_WINDOW_SECONDS
        else None,
        "rate held, every answer 2xx": not_2xx == 0
        and load.report["rate"] >= rate * (1 - RATE_TOLERANCE),
        # Not the issue's: whether the figures measure the steady state at all (a broker
        # restarted by someone else on the shared stack shows here).
        "undisturbed: Kafka answered every sample, the gateway never spooled": not (
            figures["lag"]["samples_without_kafka"] or figures["gateway"]["kafka_trouble_samples"]
        ),
    }
    return figures


def print_report(figures: dict[str, Any]) -> None:
    setup, load, lag, memory = (figures[k] for k in ("setup", "load", "lag", "memory"))
    postgres, gateway, cpu = figures["postgres"], figures["gateway"], figures["cpu_percent_mean"]
    average = figures["load_average"]
    latency, delay = load["latency_ms"], postgres["prediction_to_row_seconds"]
    drain = (
        "not within the wait"
        if lag["drain_seconds"] is None
        else f"{lag['drain_seconds']:.1f} s (1 s samples)"
    )
    lines = [
        ("load", f"{setup['rate']:,}/s for {setup['seconds']} s, vegeta {VEGETA_VERSION} "
                 "(open loop), own gateway and feature-logger"),
        ("requests sent", f"{load['sent']:,}"),
        ("achieved rate", f"{load['rate']:,.1f}/s (full seconds {load['slowest_second']:,}"
                          f"-{load['fastest_second']:,}), throughput {load['throughput']:,.1f}/s"),
        ("latency p50 / p90 / p99 / max", f"{latency['p50']:.1f} / {latency['p90']:.1f} / "
                                          f"{latency['p99']:.1f} / {latency['max']:.0f} ms"),
        ("answers not 2xx", f"{load['not_2xx']:,}  codes {load['status_codes']}"),
        *(("  error", f"{count:,} x {error}") for error, count in Counter(load["errors"])
          .most_common(3)),
        ("lag, records p50 / p99 / max", "{p50:,.0f} / {p99:,.0f} / {max:,.0f}".format(
            **lag["records"]) + " (logger's gauge p99 {p99:,.0f})".format(
            **lag["logger_gauge_records"])),
        ("lag, seconds p50 / p99 / max", "{p50:.2f} / {p99:.2f} / {max:.2f}".format(
            **lag["seconds"])),
        ("all committed, after the last answer", drain),
        ("scored -> row in Postgres p50/p99/max", "{p50:.2f} / {p99:.2f} / {max:.2f} s".format(
            **delay)),
        ("sent ids in Postgres", f"{postgres['sent_ids_logged']:,} of {load['sent']:,} "
                                 f"(missing {postgres['missing']:,}, of which answered 2xx "
                                 f"{postgres['missing_answered_2xx']:,})"),
        ("duplicate rows", f"{postgres['duplicate_rows']:,} (logger ignored "
                           f"{postgres['logger_duplicates_ignored'] or 0:,.0f} redelivered)"),
        ("topic records / accepted requests", f"{postgres['topic_records']:,} / "
                                              f"{postgres['accepted_requests']:,} (with warm-up)"),
        ("rows in Parquet files", f"{postgres['parquet_rows']:,}"),
        ("logger RSS before load", f"{memory['before_load_mib']:.0f} MiB"),
        ("logger RSS start / end", f"{memory['start_mib']:.0f} / {memory['end_mib']:.0f} MiB "
                                   f"({memory['growth']:+.1%}; largest of the first and last "
                                   f"{memory['window_seconds']:.0f} s after a "
                                   f"{setup['warmup_seconds']:.0f} s warm-up)"),
        ("logger RSS samples", f"first {memory['first_sample_after_warmup_mib']:.0f}, last "
                               f"{memory['last_sample_mib']:.0f}, max {memory['max_mib']:.0f} "
                               f"MiB; trend {memory['trend_mib_per_minute']:+.2f} MiB/min"),
        ("gateway RSS first / last", f"{gateway['rss_first_mib']:.0f} / "
                                     f"{gateway['rss_last_mib']:.0f} MiB"),
        ("CPU, % of one core, mean", f"gateway {cpu['gateway']:.0f}, its relay "
                                     f"{cpu['relay']:.0f}, logger {cpu['logger']:.0f}"
                                     f", vegeta {cpu['vegeta']:.0f}, this script "
                                     f"{cpu['bench']:.0f}, rest of the machine "
                                     f"{cpu['others']:.0f} (of {100 * setup['cores']})"),
        ("gateway Kafka spooling or stopped", f"{gateway['kafka_trouble_samples']} samples, "
                                              f"max spool depth {gateway['max_spool_depth']}"),
        ("gateway too busy for /health/ready", f"{gateway['health_unanswered_samples']} samples "
                                               "(no answer within 2 s)"),
        ("samples Kafka did not answer", f"{lag['samples_without_kafka']}"),
        ("load average before / after", " ".join(f"{v:.2f}" for v in average["before"])
         + " / " + " ".join(f"{v:.2f}" for v in average["after"])
         + f" ({setup['cores']} cores, shared)"),
    ]  # fmt: skip
    print(f"\nsustained load {setup['stamp']} (code {setup['code']})")
    for label, value in lines:
        print(f"  {label:38} {value}")
    print("\nverdict (issue 4)")
    for label, passed in figures["verdict"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[passed]
        print(f"  {verdict}  {label}")
    if figures["verdict"][MEMORY_VERDICT] is None:
        print(
            f"  (memory needs --seconds >= {WARMUP_SECONDS + 2 * MEMORY_WINDOW_SECONDS:.0f}: "
            "a warm-up and two windows of one Parquet flush interval)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="requests/s (default 1000)")
    parser.add_argument("--seconds", type=int, default=300, help="length of the load (300)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=WARMUP_SECONDS,
        help="seconds of load before the memory baseline (default 60, one Parquet flush "
        "interval; at most a quarter of the run)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=120.0,
        help="longest wait for the logger to catch up after the load (default 120)",
    )
    parser.add_argument("--trees", type=int, default=200, help="boosting rounds of the model")
    parser.add_argument(
        "--keep", action="store_true", help="keep the topics, the schema and vegeta's files"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
