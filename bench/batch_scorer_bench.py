"""batch-scorer end to end (produce to scoring.requests -> every result consumed), against a
pass-through consumer (consume -> produce the same messages, no model) in the same run.

    uv run python bench/batch_scorer_bench.py [--rows 50000]

A 200-tree bikeshare model is registered as champion of a unique model name. Each contender
runs as its own process on its own topic set; the client (``driftloop.serving.batch_client``) sends
the rows and waits for all results. The pass-through worker runs the same consumer loop and
produces the same two messages per request (a result and a prediction event), with a fixed
score instead of the model, so the ratio isolates the cost of decoding rows and scoring.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.structs import TopicPartition

from driftloop.events import kafka
from driftloop.events.consumer_loop import ConsumerLoop, Delivery, LoopOptions, install_stop_signals
from driftloop.events.producer import EventProducer, Record
from driftloop.serving.batch_client import score_rows
from driftloop.settings import KafkaSettings, MlflowSettings, load_settings
from schemas.events import TOPIC_EVENTS, PredictionEvent, ScoringRequest, ScoringResult
from schemas.fields import utc_now
from schemas.topics import Topic

SCRIPT = Path(__file__).resolve()
REPOSITORY = SCRIPT.parents[1]
TOPICS = (Topic.SCORING_REQUESTS, Topic.SCORING_RESULTS, Topic.PREDICTIONS)
RUN_ID = "0" * 32


class PassThrough:
    """The scorer's work without the model: one result and one prediction per request."""

    def __init__(self, producer: EventProducer, settings: KafkaSettings) -> None:
        self.producer = producer
        self.results = settings.topic(Topic.SCORING_RESULTS)
        self.predictions = settings.topic(Topic.PREDICTIONS)

    def is_transient(self, error: BaseException) -> bool:
        return False

    async def write(self, deliveries: Sequence[Delivery[ScoringRequest]]) -> None:
        # The scorer's producing path (per-batch encoders and timestamp, one send per batch),
        # so the ratio isolates the model: row checks, encoding and predict.
        encode_result = ScoringResult.trusted_encoder(
            model_name="pass-through", model_version=1, error=None
        )
        encode_prediction = PredictionEvent.encoder(
            model_name="pass-through", model_version=1, run_id=RUN_ID, source="batch"
        )
        answered_at = utc_now()
        messages = []
        for delivery in deliveries:
            request = delivery.event
            messages.append(
                Record(
                    self.results,
                    ScoringResult.key_of(request.request_id, request.batch_id),
                    encode_result(
                        occurred_at=answered_at,
                        request_id=request.request_id,
                        batch_id=request.batch_id,
                        prediction=0.0,
                    ),
                )
            )
            messages.append(
                Record(
                    self.predictions,
                    request.partition_key(),
                    encode_prediction(
                        occurred_at=answered_at,
                        request_id=request.request_id,
                        features=request.features,
                        prediction=0.0,
                        latency_ms=0.0,
                    ),
                )
            )
        await self.producer.send(messages)

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


async def pass_through_worker(prefix: str) -> None:
    settings = load_settings(KafkaSettings).model_copy(update={"topic_prefix": prefix})
    requests = settings.topic(Topic.SCORING_REQUESTS)
    producer = EventProducer(settings, "pass-through", config={"batch.size": 1024 * 1024})
    consumer = kafka.consumer(settings, f"{prefix}pass-through")
    await producer.start()
    await consumer.start()
    try:
        loop: ConsumerLoop[ScoringRequest] = ConsumerLoop(
            LoopOptions(
                name="pass-through",
                group=f"{prefix}pass-through",
                topics={requests: TOPIC_EVENTS[Topic.SCORING_REQUESTS]},
                dead_letter_topics={requests: f"{requests}.dlq"},
                poll_timeout_ms=100,
            ),
            consumer,
            producer,
            PassThrough(producer, settings),
        )
        install_stop_signals(loop.stop)
        await loop.run()
    finally:
        await consumer.stop()
        await producer.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rows(count: int) -> list[dict[str, Any]]:
    from driftloop.training.trainer import read_dataset
    from driftloop_tools.cli.batch import rows_from_records
    from schemas.features import load_feature_spec

    spec = load_feature_spec("bikeshare")
    records = [
        {str(name): value for name, value in record.items()}
        for record in read_dataset(spec).to_dict(orient="records")
    ]
    found = rows_from_records(spec, records)
    return [found[index % len(found)] for index in range(count)]


async def ready(settings: KafkaSettings, sample: list[dict[str, Any]]) -> None:
    """Wait until the worker answers (group joined, model loaded)."""
    while True:
        outcome = await score_rows(
            settings, sample[:1], [f"warm-{uuid.uuid4().hex}"], batch_id="warm", wait_seconds=5
        )
        if not outcome.missing:
            return


async def measure(settings: KafkaSettings, sample: list[dict[str, Any]], tag: str) -> float:
    await ready(settings, sample)
    ids = [f"{tag}-{index}" for index in range(len(sample))]
    started = time.monotonic()
    outcome = await score_rows(settings, sample, ids, batch_id=tag, wait_seconds=600)
    elapsed = time.monotonic() - started
    assert not outcome.missing, f"{len(outcome.missing)} results missing"
    return len(sample) / elapsed


def start(module: list[str], environment: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *module],
        cwd=REPOSITORY,
        env={**os.environ, **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        await pass_through_worker(options.worker)
        return
    from driftloop.training.trainer import read_dataset, train_champion
    from schemas.features import load_feature_spec

    tag = f"b{uuid.uuid4().hex[:10]}"
    base = load_settings(KafkaSettings)
    tracking_uri = load_settings(MlflowSettings).tracking_uri
    spec = load_feature_spec("bikeshare")
    with tempfile.TemporaryDirectory() as work:
        model = train_champion(
            spec,
            read_dataset(spec, since="2011-01-01", until="2011-04-01"),
            tracking_uri=tracking_uri,
            model_name=f"bench-{tag}",
            work_dir=Path(work),
        )
        sample = rows(options.rows)
        scorer_kafka = base.model_copy(update={"topic_prefix": f"{tag}.scorer."})
        passing_kafka = base.model_copy(update={"topic_prefix": f"{tag}.pass."})
        await kafka.create_topics(scorer_kafka, TOPICS)
        await kafka.create_topics(passing_kafka, TOPICS)
        print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
        scorer = start(
            ["-m", "consumers.batch_scorer"],
            {
                "KAFKA_TOPIC_PREFIX": scorer_kafka.topic_prefix,
                "BATCH_SCORER_GROUP": f"{tag}-scorer",
                "BATCH_SCORER_MODEL_NAME": model.name,
                "BATCH_SCORER_MODEL_CACHE_DIR": str(Path(work) / "cache"),
                "BATCH_SCORER_METRICS_PORT": str(free_port()),
            },
        )
        try:
            scored = await measure(scorer_kafka, sample, f"{tag}-scored")
        finally:
            scorer.terminate()
            scorer.wait(timeout=60)
        passing = start([str(SCRIPT), "--worker", passing_kafka.topic_prefix], {})
        try:
            passed = await measure(passing_kafka, sample, f"{tag}-passed")
        finally:
            passing.terminate()
            passing.wait(timeout=60)
    print(f"batch-scorer end to end ({options.rows:,} rows): {scored:,.0f} records/s")
    print(f"pass-through consumer (no model):        {passed:,.0f} records/s")
    print(f"ratio: {scored / passed:.2f}x (targets: >= 15,000 records/s and >= 0.5x)")
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    asyncio.run(main())
