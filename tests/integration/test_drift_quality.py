"""A model that went wrong where no monitored input shows it, caught by its labelled error.

The real stack: a champion bootstrapped on January to March, and traffic from those same
months (the weather the reference knows) whose served predictions are far from the labels
that arrive. The real feature-logger joins predictions and labels; the real drift monitor
judges each window's error against the version's own holdout (its baseline's quality limit),
finds it past the limit, and publishes ``DriftDetected`` with ``quality_degraded``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from driftloop.drift.store import DriftStore
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop_tools.demo.replay import load_replay_hours
from schemas.events import DriftDetected, GroundTruth, PredictionEvent
from schemas.features import load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    baseline_published,
    drift_monitor_environment,
    eventually,
    feature_logger_process,
    monitored_model,
    produce,
    read_topic,
)

pytestmark = pytest.mark.integration

SPEC = load_feature_spec("bikeshare")
BATCH = 300  # rows sent at once: a window holding one holds more than the policy's 150
WRONG_BY = 150.0  # bikes an hour the served predictions miss by, against a holdout RMSE of ~40


async def send_wrong_winter(
    kafka: KafkaSettings, model: str, version: int, run_id: str, seconds: float
) -> int:
    """January to March hours served now, each prediction ``WRONG_BY`` off, and its label."""
    hours = load_replay_hours(SPEC, first_day=1, last_day=90)
    sent = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < seconds:
        chosen = [hours[(sent + i) % len(hours)] for i in range(BATCH)]
        now = datetime.now(UTC)
        ids = [f"wrong-{sent + i}" for i in range(len(chosen))]
        predictions = [
            PredictionEvent(
                request_id=request_id,
                model_name=model,
                model_version=version,
                run_id=run_id,
                features=hour.row,
                prediction=float(hour.label) + WRONG_BY,
                latency_ms=1.0,
                source="batch",
                occurred_at=now,
            )
            for request_id, hour in zip(ids, chosen, strict=True)
        ]
        labels = [
            GroundTruth(request_id=request_id, label=float(hour.label), observed_at=now)
            for request_id, hour in zip(ids, chosen, strict=True)
        ]
        await produce(kafka, Topic.PREDICTIONS, predictions)
        await produce(kafka, Topic.LABELS, labels)
        sent += len(chosen)
    return sent


async def test_a_labelled_error_past_the_holdouts_limit_is_drift(
    unique: str,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    drift_store: DriftStore,
    tmp_path: Path,
) -> None:
    model = f"quality-{unique}"
    kafka, result = await monitored_model(
        unique, kafka_settings, mlflow_settings.tracking_uri, model
    )
    version = result.model.version
    shared = {"KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    logger = feature_logger_process(unique, kafka.topic_prefix, tmp_path / "logger.log").start()
    monitor = ConsumerProcess(
        "consumers.drift_monitor",
        {**shared, **drift_monitor_environment(unique, model)},
        tmp_path / "monitor.log",
    )
    try:
        monitor.start()

        await eventually(
            lambda: baseline_published(drift_store, model),
            within=120,
            what="the version's layout published",
        )
        await send_wrong_winter(kafka, model, version, result.model.run_id, 8.0)

        async def degraded_twice() -> bool:
            runs = await drift_store.recent(model, limit=100)
            return sum(run.quality_degraded for run in runs) >= 2

        await eventually(degraded_twice, within=120, what="two windows past the quality limit")
        records = await read_topic(kafka, kafka.topic(Topic.DRIFT_EVENTS), expected=1, within=60)
        runs = await drift_store.recent(model, limit=100)
    finally:
        monitor.close()
        logger.close()
    degraded = [run for run in runs if run.quality_degraded]
    for run in degraded:
        assert run.outcome == "drifted"
        assert run.quality is not None
        assert run.quality_limit is not None
        # Every prediction is WRONG_BY off: the window's RMSE is that, past the version's limit.
        assert run.quality["rmse"] == pytest.approx(WRONG_BY)
        assert run.quality_limit < WRONG_BY
    events = [DriftDetected.model_validate_json(record.value) for record in records]
    assert events, monitor.log()
    assert all(event.model_name == model and event.quality_degraded for event in events)
