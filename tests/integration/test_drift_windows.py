"""The drift monitor on time windows against the real stack: sketches written by the real
feature-logger, two monitor replicas (one works, the leader lock holds the other back), the
working one killed mid-window, every logged row judged once, each window by one verdict."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from driftloop.drift.store import DriftRun, DriftStore
from driftloop.settings import KafkaSettings, MlflowSettings, ObjectStoreSettings
from driftloop.storage.objectstore import s3_client
from driftloop_tools.demo.replay import load_replay_hours
from schemas.events import PredictionEvent
from schemas.features import load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    baseline_published,
    drift_monitor_environment,
    eventually,
    feature_logger_process,
    free_port,
    monitored_model,
    produce,
)

pytestmark = pytest.mark.integration

SPEC = load_feature_spec("bikeshare")
RATE = 150  # rows a second, a little above the policy's minimum per 1-second window


async def send_traffic(
    kafka: KafkaSettings, model: str, version: int, run_id: str, seconds: float, tag: str
) -> int:
    """July and August hours as predictions served now, ``RATE`` a second for ``seconds``."""
    # Summer, not spring: a window of one second holds about a week of hours, and early
    # April's weeks are still close to the Jan-Mar reference (they may or may not drift).
    hours = load_replay_hours(SPEC, first_day=182, last_day=243)
    sent = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < seconds:
        batch = [
            PredictionEvent(
                request_id=f"{tag}-{sent + i}",
                model_name=model,
                model_version=version,
                run_id=run_id,
                features=hours[(sent + i) % len(hours)].row,
                prediction=float(hours[(sent + i) % len(hours)].label),
                latency_ms=1.0,
                source="batch",
                occurred_at=datetime.now(UTC),
            )
            for i in range(RATE // 10)
        ]
        await produce(kafka, Topic.PREDICTIONS, batch)
        sent += len(batch)
        await asyncio.sleep(0.1)
    return sent


async def test_windows_count_every_row_once_across_a_monitor_kill(
    unique: str,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    object_store_settings: ObjectStoreSettings,
    drift_store: DriftStore,
    tmp_path: Path,
) -> None:
    model = f"windows-{unique}"
    kafka, result = await monitored_model(
        unique, kafka_settings, mlflow_settings.tracking_uri, model
    )
    version = result.model.version
    shared = {"KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    logger = feature_logger_process(unique, kafka.topic_prefix, tmp_path / "logger.log").start()
    monitor_environment = {**shared, **drift_monitor_environment(unique, model)}

    def replica(name: str) -> ConsumerProcess:
        environment = {**monitor_environment, "DRIFT_MONITOR_METRICS_PORT": str(free_port())}
        return ConsumerProcess("consumers.drift_monitor", environment, tmp_path / f"{name}.log")

    # Two replicas at once: the leader lock lets one work; the other waits to take over.
    monitors = [replica("monitor-a"), replica("monitor-b")]
    try:
        # Rows logged before the monitor published the version's layout: counted, unsketched.
        early = await send_traffic(kafka, model, version, result.model.run_id, 2.0, "early")
        for monitor in monitors:
            monitor.start()

        await eventually(
            lambda: baseline_published(drift_store, model),
            within=120,
            what="the version's layout published",
        )
        first = await send_traffic(kafka, model, version, result.model.run_id, 3.0, "first")

        async def some_judged() -> bool:
            return bool(await drift_store.recent(model, limit=1))

        await eventually(some_judged, within=120, what="a first window judged")
        working = next(m for m in monitors if "this replica works" in m.log())
        working.kill()  # mid-stream, maybe mid-window: no goodbye; the standby takes over
        second = await send_traffic(kafka, model, version, result.model.run_id, 3.0, "second")
        monitors.append(replica("monitor-c").start())  # and a restarted one stands by
        total = early + first + second

        async def all_judged() -> bool:
            runs = await drift_store.recent(model, limit=1000)
            return sum(run.window_rows for run in runs) >= total

        await eventually(all_judged, within=180, what=f"{total} rows judged")
        runs: list[DriftRun] = sorted(
            await drift_store.recent(model, limit=1000), key=lambda run: run.window_start
        )
        # Counted before the stop: stopping the working replica hands the lock to the last.
        worked = sum("this replica works" in monitor.log() for monitor in monitors)
    finally:
        for monitor in monitors:
            monitor.close()
        logger.close()
    logs = "\n".join(monitor.log() for monitor in monitors)
    assert worked == 2, logs
    assert sum(run.window_rows for run in runs) == total, logs
    ends = [run.window_end for run in runs]
    assert len(ends) == len(set(ends)), "a window was judged twice"
    for earlier, later in itertools.pairwise(runs):
        assert earlier.window_end <= later.window_start, (earlier, later)
    judged = [run for run in runs if run.outcome != "refused"]
    assert judged, [(run.outcome, run.refusal_reason) for run in runs]
    assert all(run.report_uri for run in judged)
    # Summer traffic against a Jan-Mar reference: the weather drifted.
    assert any(run.outcome == "drifted" for run in judged), [r.drift_share for r in judged]
    rebuilt = await drift_store.pool.fetchval("SELECT count(*) FROM drift_sketches")
    assert rebuilt == 0, "the slices of judged windows are deleted with their verdict"
    stored = await drift_store.pool.fetch(
        "SELECT sketch IS NOT NULL AS sketched, lag_seconds FROM drift_runs "
        "WHERE outcome <> 'refused'"
    )
    # Each verdict keeps its window's sketch and lag (the settle rule itself is tested on a
    # fake clock in tests/unit/test_drift_monitor.py, not on wall-clock time here).
    assert all(row["sketched"] and row["lag_seconds"] is not None for row in stored)
    report_uri = judged[0].report_uri
    assert report_uri is not None
    bucket, key = report_uri.removeprefix("s3://").split("/", 1)
    async with s3_client(object_store_settings) as s3:
        document = orjson.loads(await (await s3.get_object(Bucket=bucket, Key=key))["Body"].read())
    assert document["thresholds"]["quantile"] == 0.99
    assert document["evidently"]["sample_rows"] == judged[0].window_rows
