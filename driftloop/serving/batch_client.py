"""Scoring a set of rows through Kafka: produce ``ScoringRequest``s, collect their results.

The client reads ``scoring.results`` from the end offsets it saw *before* producing (no
consumer group: nothing to commit, every client sees every result) and keeps the first result
per request id of its batch; a result repeated by a replaying scorer is counted, not kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from driftloop.events import kafka
from driftloop.events.producer import EventProducer, Record
from driftloop.settings import KafkaSettings
from schemas.events import EventDecodeError, ScoringRequest, ScoringResult
from schemas.fields import FeatureValue
from schemas.topics import Topic

log = logging.getLogger(__name__)

_SEND_WINDOW: Final = 5000


@dataclass(slots=True)
class BatchOutcome:
    """The results of one batch by request id, and what did not come back."""

    batch_id: str
    results: dict[str, ScoringResult] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(1 for result in self.results.values() if result.error is not None)


async def score_rows(
    settings: KafkaSettings,
    rows: Sequence[Mapping[str, FeatureValue]],
    request_ids: Sequence[str],
    *,
    batch_id: str,
    model_name: str | None = None,
    wait_seconds: float = 600.0,
    on_sent: Callable[[int], None] | None = None,
    on_result: Callable[[int], None] | None = None,
) -> BatchOutcome:
    """Send one request per row, to be scored by ``model_name`` (None: the scorer's default
    model), and wait (at most ``wait_seconds``) for every result."""
    if len(rows) != len(request_ids) or len(set(request_ids)) != len(request_ids):
        raise ValueError("one distinct request id per row is required")
    outcome = BatchOutcome(batch_id)
    wanted = set(request_ids)
    results_topic = settings.topic(Topic.SCORING_RESULTS)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id_prefix}-batch-client",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    # Large batches carry the throughput; a result repeated by a retry is counted, not kept.
    producer = EventProducer(settings, "batch-client", config={"batch.size": 1024 * 1024})
    started = time.monotonic()
    await kafka.start_with_retry(consumer, settings, give_up_after_seconds=60)
    try:
        partitions = [
            TopicPartition(results_topic, partition)
            for partition in sorted(await _partitions(consumer, results_topic))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        # Resolve the end offsets now: every result of this batch comes after them.
        for tp in partitions:
            await consumer.position(tp)
        await producer.start(give_up_after_seconds=60)
        try:
            collector = asyncio.create_task(_collect(consumer, outcome, wanted, on_result))
            try:
                await _send(producer, settings, rows, request_ids, batch_id, model_name, on_sent)
                await asyncio.wait_for(asyncio.shield(collector), wait_seconds)
            except TimeoutError:
                outcome.missing = sorted(wanted - set(outcome.results))
            finally:
                collector.cancel()
        finally:
            await producer.close()
    finally:
        await consumer.stop()
    outcome.seconds = time.monotonic() - started
    return outcome


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    found: set[int] | None = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + 30
    while not found:
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} does not exist")
        # aiokafka has no public metadata refresh; a fresh topic needs one.
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
    return found


async def _send(
    producer: EventProducer,
    settings: KafkaSettings,
    rows: Sequence[Mapping[str, FeatureValue]],
    request_ids: Sequence[str],
    batch_id: str,
    model_name: str | None,
    on_sent: Callable[[int], None] | None,
) -> None:
    topic = settings.topic(Topic.SCORING_REQUESTS)
    window: list[Record] = []
    for request_id, row in zip(request_ids, rows, strict=True):
        request = ScoringRequest(
            request_id=request_id, features=dict(row), batch_id=batch_id, model_name=model_name
        )
        window.append(Record(topic, request.partition_key(), request.to_bytes()))
        if len(window) >= _SEND_WINDOW:
            await producer.send(window)
            if on_sent is not None:
                on_sent(len(window))
            window = []
    await producer.send(window)
    if on_sent is not None:
        on_sent(len(window))


async def _collect(
    consumer: AIOKafkaConsumer,
    outcome: BatchOutcome,
    wanted: set[str],
    on_result: Callable[[int], None] | None,
) -> None:
    while len(outcome.results) < len(wanted):
        batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
        fresh = 0
        for records in batch.values():
            for record in records:
                try:
                    result = ScoringResult.from_bytes(record.value or b"")
                except EventDecodeError as error:
                    log.warning("unreadable result at %s: %s", record.offset, error)
                    continue
                if result.batch_id != outcome.batch_id or result.request_id not in wanted:
                    continue
                if result.request_id in outcome.results:
                    outcome.duplicates += 1
                    continue
                outcome.results[result.request_id] = result
                fresh += 1
        if fresh and on_result is not None:
            on_result(fresh)
