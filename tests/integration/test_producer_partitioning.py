"""The platform's producer places keyed records where Kafka's own Java client places them.

Predictions are produced by ``EventProducer`` (librdkafka, ``murmur2_random``), keyed by request
id. Their labels are produced by Kafka's own ``ConsoleProducer``, run from the stack's Kafka
jars, keyed by the same request ids: the Java client's default partitioner. Every label must
land on its prediction's partition. The feature-logger's range assignment gives one replica the
same partition of both topics, so a label from any Java producer meets its prediction there and
joins it in the same batch.
"""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime

import pytest

from driftloop.events.kafka import create_topics
from driftloop.events.producer import EventProducer, event_record
from driftloop.settings import KafkaSettings
from driftloop_tools.stack.programs import kafka_home
from driftloop_tools.stack.settings import StackSettings
from schemas.events import GroundTruth, PredictionEvent
from schemas.topics import Topic
from tests.integration.consumer_support import read_topic

pytestmark = pytest.mark.integration

KEYS = 60


def console_produce(stack: StackSettings, settings: KafkaSettings, topic: str, lines: str) -> None:
    """Send ``key<TAB>value`` lines with Kafka's ConsoleProducer (Java client defaults)."""
    libs = kafka_home(stack) / "libs"
    subprocess.run(
        [
            "java", "-cp", f"{libs}/*", "org.apache.kafka.tools.ConsoleProducer",
            "--bootstrap-server", settings.bootstrap_servers,
            "--topic", topic,
            "--property", "parse.key=true",
        ],
        input=lines,
        text=True,
        capture_output=True,
        check=True,
        timeout=120,
    )  # fmt: skip


async def test_a_java_clients_label_lands_on_its_predictions_partition(
    kafka_settings: KafkaSettings, stack_settings: StackSettings, unique: str
) -> None:
    settings = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(settings, [Topic.PREDICTIONS, Topic.LABELS])
    predictions_topic, labels_topic = (
        settings.topic(Topic.PREDICTIONS),
        settings.topic(Topic.LABELS),
    )
    request_ids = [f"{unique}-{index}" for index in range(KEYS)]

    producer = EventProducer(settings, "partitioning-test")
    await producer.start(give_up_after_seconds=60)
    try:
        await producer.send(
            event_record(
                predictions_topic,
                PredictionEvent(
                    request_id=request_id,
                    model_name="bikeshare",
                    model_version=1,
                    run_id="0" * 32,
                    features={"hr": 8},
                    prediction=1.0,
                    latency_ms=1.0,
                    source="http",
                ),
            )
            for request_id in request_ids
        )
    finally:
        await producer.close()
    observed_at = datetime.now(UTC)
    lines = "".join(
        f"{request_id}\t"
        + GroundTruth(request_id=request_id, label=1.0, observed_at=observed_at).to_bytes().decode()
        + "\n"
        for request_id in request_ids
    )
    await asyncio.to_thread(console_produce, stack_settings, settings, labels_topic, lines)

    predictions = await read_topic(settings, predictions_topic, expected=KEYS)
    labels = await read_topic(settings, labels_topic, expected=KEYS)

    prediction_partitions = {record.key: record.partition for record in predictions}
    label_partitions = {record.key: record.partition for record in labels}
    assert set(label_partitions) == {request_id.encode() for request_id in request_ids}
    assert label_partitions == prediction_partitions
    # Spread over every partition: a partitioner that put everything on one would pass above.
    assert len(set(prediction_partitions.values())) == 3
    for record in labels:
        assert GroundTruth.from_bytes(record.value).request_id.encode() == record.key
