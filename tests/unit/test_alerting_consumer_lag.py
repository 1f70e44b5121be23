"""What the consumer loop exports for the pipeline alerts: the lag of every assigned partition
(also while paused on a failing sink), and dead-letter and backoff counters from zero."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY

from driftloop.events.consumer_loop import ConsumerLoop, Delivery, LoopOptions
from schemas.events import TOPIC_EVENTS, FailureKind, PredictionEvent
from schemas.topics import Topic

pytestmark = pytest.mark.unit

TOPIC = "predictions"
TP0 = TopicPartition(TOPIC, 0)
TP1 = TopicPartition(TOPIC, 1)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


def record(partition: int, offset: int) -> Record:
    event = PredictionEvent(
        request_id=f"r-{offset}",
        model_name="bikeshare",
        model_version=1,
        run_id=uuid.uuid4().hex,
        features={"temp": 0.5},
        prediction=1.0,
        latency_ms=1.0,
        source="http",
    )
    return Record(TOPIC, partition, offset, event.to_bytes(), event.partition_key())


class LogConsumer:
    """A consumer double over a log that keeps growing: highwater from the last fetch,
    end offsets from the brokers (the log's real end)."""

    def __init__(self, batches: list[dict[TopicPartition, list[Record]]]) -> None:
        self.batches = batches
        self.assigned = {TP0, TP1}
        self.paused: set[TopicPartition] = set()
        self.fetched_highwater = {TP0: 0, TP1: 0}
        self.log_end = {TP0: 0, TP1: 0}
        self.end_offset_requests = 0
        self.loop: ConsumerLoop[Any] | None = None
        self.stop_when_drained = True
        self.paused_once = asyncio.Event()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        return None

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(0.001)
        if self.paused:
            # Producers go on writing while the consumer is paused; nothing is fetched.
            for tp in self.log_end:
                self.log_end[tp] += 10
            return {}
        self.fetched_highwater = dict(self.log_end)
        if self.batches:
            return self.batches.pop(0)
        if self.stop_when_drained:
            assert self.loop is not None
            self.loop.stop()
        return {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)
        self.paused_once.set()

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        return None

    def highwater(self, tp: TopicPartition) -> int:
        return self.fetched_highwater[tp]

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.end_offset_requests += 1
        return {tp: self.log_end[tp] for tp in partitions}

    async def committed(self, tp: TopicPartition) -> int | None:
        return 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        return None

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        return None


class Producer:
    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


@dataclass
class Processor:
    failures: int = 0
    written: list[int] = field(default_factory=list)
    consumer: LogConsumer | None = None

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, ConnectionError)

    async def write(self, deliveries: Sequence[Delivery[PredictionEvent]]) -> None:
        if deliveries and self.failures:
            self.failures -= 1
            raise ConnectionError("postgres down")
        self.written += [delivery.offset for delivery in deliveries]

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        return None

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


def make_loop(
    name: str, consumer: LogConsumer, processor: Processor, **options: Any
) -> ConsumerLoop[PredictionEvent]:
    loop: ConsumerLoop[PredictionEvent] = ConsumerLoop(
        LoopOptions(
            name=name,
            group=f"{name}-group",
            topics={TOPIC: TOPIC_EVENTS[Topic.PREDICTIONS]},
            dead_letter_topics={TOPIC: f"{TOPIC}.dlq"},
            **options,
        ),
        consumer,
        Producer(),
        processor,
    )
    consumer.loop = loop
    # Both partitions are assigned and taken over at the group's committed offset 0 (the
    # first poll, an empty one, is where the loop takes them over).
    loop._assigned(frozenset(consumer.assigned))
    consumer.paused.clear()
    consumer.paused_once.clear()
    return loop


def lag(name: str, tp: TopicPartition) -> float | None:
    return REGISTRY.get_sample_value(
        "driftloop_consumer_lag",
        {"consumer": name, "topic": tp.topic, "partition": str(tp.partition)},
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_every_assigned_partition_reports_its_lag_after_a_poll() -> None:
    name = unique("lag")
    consumer = LogConsumer([{}, {TP0: [record(0, 0), record(0, 1)]}])
    consumer.log_end = {TP0: 5, TP1: 3}  # TP1 has records, none fetched in this batch
    loop = make_loop(name, consumer, Processor())
    await loop.run()
    assert lag(name, TP0) == 3  # end 5, committed 2
    assert lag(name, TP1) == 3  # idle in the batch: end 3, committed 0


async def test_lag_keeps_growing_while_the_consumer_is_paused_on_a_failing_sink() -> None:
    name = unique("paused")
    consumer = LogConsumer([{}, {TP0: [record(0, 0)]}])
    consumer.stop_when_drained = False
    processor = Processor(failures=1_000_000)
    loop = make_loop(
        name,
        consumer,
        processor,
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.05,
        paused_lag_refresh_seconds=0.05,
    )
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(consumer.paused_once.wait(), 5)
        readings: list[float] = []
        while len(readings) < 3:
            await asyncio.sleep(0.05)
            value = lag(name, TP0)
            if value is not None and (not readings or value > readings[-1]):
                readings.append(value)
        # Growth seen while paused can only come from the end offsets asked of the brokers.
        assert consumer.end_offset_requests >= 2
        assert consumer.paused
        assert processor.written == []
    finally:
        loop.stop()
        await asyncio.wait_for(task, 5)


async def test_dead_letter_and_backoff_counters_start_at_zero() -> None:
    name = unique("zero")
    make_loop(name, LogConsumer([]), Processor())
    for failure in FailureKind:
        labels = {"consumer": name, "topic": TOPIC, "failure": failure.value}
        assert REGISTRY.get_sample_value("driftloop_consumer_dead_letters_total", labels) == 0
    assert REGISTRY.get_sample_value("driftloop_consumer_backoffs_total", {"consumer": name}) == 0


async def test_a_revoked_partition_stops_reporting_lag() -> None:
    name = unique("revoke")
    consumer = LogConsumer([{}, {TP0: [record(0, 0)], TP1: [record(1, 0)]}])
    consumer.log_end = {TP0: 4, TP1: 4}
    loop = make_loop(name, consumer, Processor())
    await loop.run()
    assert lag(name, TP1) == 3
    consumer.assigned = {TP0}
    await loop._revoke(frozenset({TP1}))
    assert lag(name, TP1) is None
    assert lag(name, TP0) == 3
