"""Drift monitoring at traffic rate, through the real stack (issue 13).

Predictions are produced to Kafka at a constant rate (default 10,000 rows/s for 300 s), as the
batch scorer or gateways would publish them, with the Bike Sharing data's spring and summer
rows, so the weather drifts against the model's Jan-Mar reference. The bench starts its own
feature-logger (Postgres only; it writes the slice sketches with the rows) and drift-monitor
(windows of 60 s of prediction time, settle 10 s) on the dev stack's Kafka, Postgres, S3 and
MLflow, in a schema, topic prefix and model of their own, and a first model registered for
the run. Every 5 s it samples the processes' CPU and the windows judged. At the end it waits
for the last window, then measures the old design in the same run: Evidently on 168-row
windows read from the same prediction log (``evaluate_window`` and the report, as the monitor
judged each window before).

Prints and writes to ``bench/results/drift_throughput-<time>.json``:
- rows produced, logged and judged per second; every logged row counted in exactly one window;
- the monitor's lag per window (seconds from its close to its verdict; target: under one
  window plus 30 s), and its stages;
- the cost per row: the monitor's CPU and the feature-logger's sketching, over rows judged
  (target: at most 10 µs a row all in, 10 % of a core at 10,000 rows/s);
- the old design's rows/s and the ratio.

    make up
    uv run python bench/drift_throughput.py [--rate 10000] [--seconds 300] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil

from driftloop.drift.assessment import WindowEvaluation, evaluate_window, window_bounds
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reference import RegistryChampions
from driftloop.drift.reports import render_report
from driftloop.drift.store import open_drift_store
from driftloop.events import kafka
from driftloop.events.kafka import create_topics
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings, load_settings
from driftloop.training.bootstrap import bootstrap_model
from driftloop_tools.demo.replay import load_replay_hours
from schemas.events import PredictionEvent, uuid4_text
from schemas.features import load_feature_spec
from schemas.topics import Topic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SPEC = load_feature_spec("bikeshare")
TICK = 0.1


def code_version() -> str:
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


@contextmanager
def service(module: str, env: Mapping[str, str], log: Path) -> Iterator[psutil.Popen]:
    """``python -m module`` in its own process group; SIGTERM (then SIGKILL) at exit."""
    with log.open("w") as output:
        started = psutil.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env={**os.environ, **env},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
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


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def metric(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


class Traffic:
    """Prediction events as the wire carries them, built from a template (orjson, no model)."""

    def __init__(self, model: str, version: int, run_id: str) -> None:
        hours = load_replay_hours(SPEC, first_day=91, last_day=243)  # April to August
        self.rows = [hour.row for hour in hours]
        self.labels = [float(hour.label) for hour in hours]
        self.model, self.version, self.run_id = model, version, run_id
        self.sent = 0
        self.tag = uuid.uuid4().hex[:8]

    def next(self) -> tuple[bytes, bytes]:
        index = self.sent % len(self.rows)
        request_id = f"{self.tag}-{self.sent}"
        self.sent += 1
        document = {
            "event_type": "prediction",
            "schema_version": 1,
            "event_id": uuid4_text(),
            "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "request_id": request_id,
            "model_name": self.model,
            "model_version": self.version,
            "run_id": self.run_id,
            "features": self.rows[index],
            "prediction": self.labels[index] * random.uniform(0.8, 1.2),
            "latency_ms": 1.0,
            "source": "batch",
        }
        return orjson.dumps(document), request_id.encode()


async def produce(settings: KafkaSettings, traffic: Traffic, rate: int, seconds: float) -> float:
    """Send ``rate`` events a second for ``seconds``; returns the rate achieved."""
    producer = kafka.producer(settings, "bench-drift", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    topic = settings.topic(Topic.PREDICTIONS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    per_tick = max(1, round(rate * TICK))
    pending: list[asyncio.Future[Any]] = []
    try:
        tick = 0
        while loop.time() - started < seconds:
            for _ in range(per_tick):
                value, key = traffic.next()
                pending.append(await producer.send(topic, value, key=key))
            tick += 1
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
            delay = started + tick * TICK - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return traffic.sent / (loop.time() - started)


async def judged_rows(pool: asyncpg.Pool, schema: str) -> tuple[int, int]:
    """Rows counted in the windows judged so far, and the windows."""
    row = await pool.fetchrow(
        "SELECT coalesce(sum(window_rows), 0) AS rows, count(*) AS windows "  # noqa: S608
        f"FROM {schema}.drift_runs"  # the run's own token, never input
    )
    return int(row["rows"]), int(row["windows"])


def old_design_rows_per_second(
    postgres: PostgresSettings, schema: str, tracking_uri: str, model: str, version: int
) -> dict[str, float]:
    """Evidently on 168-row windows of this run's log, read from Postgres: the old monitor."""

    async def measure() -> dict[str, float]:
        store = await open_drift_store(postgres, schema)
        champions = RegistryChampions(tracking_uri)
        reference = champions.reference(model, version)
        policy = DriftPolicy()
        after = datetime(1970, 1, 1, tzinfo=UTC)
        rows = windows = 0
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < 20:
                frame = await store.window(
                    SPEC, model, version, after=after, before=datetime.now(UTC), limit=168
                )
                if frame.empty:
                    break
                evaluation = evaluate_window(reference, frame, SPEC, policy)
                if not isinstance(evaluation, WindowEvaluation):
                    break
                window = window_bounds(frame, "predicted_at")
                render_report(evaluation, model_name=model, model_version=version, window=window)
                end = window.end
                rows += len(frame)
                windows += 1
                after = end
        finally:
            await store.close()
        seconds = time.perf_counter() - started
        return {
            "rows": rows,
            "windows": windows,
            "seconds": seconds,
            "rows_per_second": rows / seconds,
        }

    return asyncio.run(measure())


async def run(arguments: argparse.Namespace) -> dict[str, Any]:
    kafka_settings = load_settings(KafkaSettings)
    postgres = load_settings(PostgresSettings)
    mlflow_settings = load_settings(MlflowSettings)
    token = f"b{uuid.uuid4().hex[:10]}"
    settings = kafka_settings.model_copy(update={"topic_prefix": f"{token}."})
    await create_topics(settings, list(Topic))
    model = f"bench-drift-{token}"
    print(f"registering {model} (Jan-Mar, 50 trees) ...")
    registered = await asyncio.to_thread(
        bootstrap_model,
        SPEC,
        tracking_uri=mlflow_settings.tracking_uri,
        model_name=model,
        num_boost_round=50,
    )
    version = registered.model.version
    logs = RESULTS / f"drift_throughput-{token}"
    logs.mkdir(parents=True, exist_ok=True)
    logger_port, monitor_port = free_port(), free_port()
    shared = {"KAFKA_TOPIC_PREFIX": settings.topic_prefix}
    logger_env = {
        **shared,
        "FEATURE_LOGGER_GROUP": f"{token}-logger",
        "FEATURE_LOGGER_DB_SCHEMA": token,
        "FEATURE_LOGGER_PARQUET_ENABLED": "false",
        "FEATURE_LOGGER_METRICS_PORT": str(logger_port),
    }
    monitor_env = {
        **shared,
        "DRIFT_MONITOR_MODELS": model,
        "DRIFT_MONITOR_DB_SCHEMA": token,
        "DRIFT_MONITOR_WINDOW_SECONDS": str(arguments.window),
        "DRIFT_MONITOR_SETTLE_SECONDS": str(arguments.settle),
        "DRIFT_MONITOR_POLL_SECONDS": "1",
        "DRIFT_MONITOR_REPORT_PREFIX": f"bench/{token}/drift-reports/",
        "DRIFT_MONITOR_METRICS_PORT": str(monitor_port),
    }
    pool = await asyncpg.create_pool(postgres.dsn(), min_size=1, max_size=2)
    samples: list[dict[str, float]] = []
    try:
        with (
            service("consumers.feature_logger", logger_env, logs / "feature-logger.log") as logger,
            service("consumers.drift_monitor", monitor_env, logs / "drift-monitor.log") as monitor,
        ):
            deadline = time.monotonic() + 180
            while True:
                found = None
                with suppress(asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                    found = await pool.fetchval(
                        f"SELECT count(*) FROM {token}.drift_baselines"  # noqa: S608
                    )
                if found:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the monitor published no layout; see {logs}")
                await asyncio.sleep(0.5)
            traffic = Traffic(model, version, registered.model.run_id)
            # The template must be what the logger decodes strictly.
            PredictionEvent.from_bytes(Traffic(model, version, registered.model.run_id).next()[0])
            cpu_start = {"logger": cpu_seconds(logger), "monitor": cpu_seconds(monitor)}
            sketch_start = await metric(
                logger_port, "driftloop_feature_logger_sketch_seconds_total"
            )

            async def sampler(stop: asyncio.Event) -> None:
                started = time.monotonic()
                while not stop.is_set():
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=5)
                    rows, windows = await judged_rows(pool, token)
                    lag = await pool.fetchval(
                        f"SELECT max(lag_seconds) FROM {token}.drift_runs"  # noqa: S608
                    )
                    samples.append(
                        {
                            "t": time.monotonic() - started,
                            "sent": traffic.sent,
                            "judged_rows": int(rows),
                            "windows": int(windows),
                            "max_lag": float(lag or 0.0),
                            "logger_cpu": cpu_seconds(logger) - cpu_start["logger"],
                            "monitor_cpu": cpu_seconds(monitor) - cpu_start["monitor"],
                        }
                    )
                    last = samples[-1]
                    print(
                        f"  t={last['t']:5.0f}s sent {last['sent']:>9,} judged "
                        f"{last['judged_rows']:>9,} in {last['windows']:>3} windows, max lag "
                        f"{last['max_lag']:5.1f}s, CPU logger {last['logger_cpu']:6.1f}s "
                        f"monitor {last['monitor_cpu']:5.1f}s"
                    )

            stop = asyncio.Event()
            watch = asyncio.create_task(sampler(stop))
            print(f"producing {arguments.rate:,} rows/s for {arguments.seconds:.0f}s ...")
            achieved = await produce(settings, traffic, arguments.rate, arguments.seconds)
            produced_at = time.monotonic()
            # The last window closes within a window of the end; then settle and judgement.
            limit = arguments.window + arguments.settle + 120
            while (await judged_rows(pool, token))[0] < traffic.sent:
                if time.monotonic() - produced_at > limit:
                    break
                await asyncio.sleep(1)
            stop.set()
            await watch
            cpu = {
                "logger": cpu_seconds(logger) - cpu_start["logger"],
                "monitor": cpu_seconds(monitor) - cpu_start["monitor"],
            }
            sketch_seconds = (
                await metric(logger_port, "driftloop_feature_logger_sketch_seconds_total")
                - sketch_start
            )
            stages = {}
            for stage in ("slices", "sample", "judge", "store"):
                total = await metric(
                    monitor_port, f'driftloop_drift_stage_duration_seconds_sum{{stage="{stage}"}}'
                )
                stages[stage] = total
        runs = await pool.fetch(
            f"SELECT window_rows, lag_seconds, outcome, check_seconds, sample_rows "  # noqa: S608
            f"FROM {token}.drift_runs ORDER BY window_start"
        )
        logged = await pool.fetchval(f"SELECT count(*) FROM {token}.prediction_log")  # noqa: S608
    finally:
        await pool.close()
    print("measuring the old design (Evidently on 168-row windows from Postgres) ...")
    old = await asyncio.to_thread(
        old_design_rows_per_second, postgres, token, mlflow_settings.tracking_uri, model, version
    )
    judged = sum(run["window_rows"] for run in runs)
    lags = [run["lag_seconds"] for run in runs if run["lag_seconds"] is not None]
    per_row_us = (cpu["monitor"] + sketch_seconds) / max(judged, 1) * 1e6
    return {
        "code": code_version(),
        "when": datetime.now(UTC).isoformat(),
        "rate_asked": arguments.rate,
        "rate_produced": achieved,
        "seconds": arguments.seconds,
        "window_seconds": arguments.window,
        "settle_seconds": arguments.settle,
        "rows_produced": traffic.sent,
        "rows_logged": int(logged),
        "rows_judged": judged,
        "windows": len(runs),
        "outcomes": dict(Counter(run["outcome"] for run in runs)),
        "lag_max": max(lags, default=float("nan")),
        "lag_median": statistics.median(lags) if lags else float("nan"),
        "lag_target": arguments.window + 30,
        "check_seconds_median": statistics.median(r["check_seconds"] for r in runs) if runs else 0,
        "stages_seconds_total": stages,
        "cpu_seconds": cpu,
        "sketch_seconds": sketch_seconds,
        "monitor_us_per_row": cpu["monitor"] / max(judged, 1) * 1e6,
        "sketch_us_per_row": sketch_seconds / max(judged, 1) * 1e6,
        "all_in_us_per_row": per_row_us,
        "core_share_at_rate": per_row_us * 1e-6 * achieved,
        "old_design": old,
        "ratio_vs_old": (judged / max(arguments.seconds, 1)) / max(old["rows_per_second"], 1e-9),
        "samples": samples,
        "logs": str(logs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--window", type=float, default=60)
    parser.add_argument("--settle", type=float, default=10)
    arguments = parser.parse_args()
    figures = asyncio.run(run(arguments))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"drift_throughput-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(figures, indent=1, default=str))
    old = figures["old_design"]
    print(
        f"\nproduced {figures['rows_produced']:,} rows at {figures['rate_produced']:,.0f}/s "
        f"(asked {figures['rate_asked']:,}); logged {figures['rows_logged']:,}; judged "
        f"{figures['rows_judged']:,} in {figures['windows']} windows of "
        f"{figures['window_seconds']:g}s {figures['outcomes']}\n"
        f"lag from a window's close to its verdict: median {figures['lag_median']:.1f}s, max "
        f"{figures['lag_max']:.1f}s (target < {figures['lag_target']:.0f}s)\n"
        f"cost per row: monitor {figures['monitor_us_per_row']:.2f} µs + logger sketching "
        f"{figures['sketch_us_per_row']:.2f} µs = {figures['all_in_us_per_row']:.2f} µs "
        f"(target <= 10), {figures['core_share_at_rate']:.1%} of a core at the rate produced\n"
        f"stages (s, whole run): {figures['stages_seconds_total']}\n"
        f"old design (Evidently on 168-row windows from Postgres): "
        f"{old['rows_per_second']:,.0f} rows/s over {old['windows']} windows; new judged "
        f"{figures['rows_judged'] / figures['seconds']:,.0f} rows/s: "
        f"{figures['ratio_vs_old']:.0f}x\n"
        f"results: {path}"
    )


if __name__ == "__main__":
    main()
