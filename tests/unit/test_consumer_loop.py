"""The consumer loop against in-memory Kafka doubles: decode, dead-letter, write, commit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from driftloop.events.consumer_loop import ConsumerLoop, Delivery, LoopOptions
from schemas.events import TOPIC_EVENTS, DeadLetter, FailureKind, GroundTruth, PredictionEvent
from schemas.topics import Topic
from tests.unit.fake_kafka import FakeRecordProducer

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


def prediction(index: int) -> PredictionEvent:
    return PredictionEvent(
        request_id=f"r-{index}",
        model_name="bikeshare",
        model_version=1,
        run_id=uuid.uuid4().hex,
        features={"temp": 0.5},
        prediction=1.0,
        latency_ms=1.0,
        source="http",
    )


class FakeConsumer:
    """Hands out scripted batches; records commits, pauses and seeks."""

    def __init__(self, batches: list[dict[TopicPartition, list[Record]]]) -> None:
        self.batches = batches
        self.assigned: set[TopicPartition] = {TP0, TP1}
        self.paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.listener: Any = None
        self.loop: ConsumerLoop[Any] | None = None
        self.polls_while_paused = 0
        self.paused_once = asyncio.Event()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(0)
        if self.paused:
            self.polls_while_paused += 1
            return {}
        if self.batches:
            return self.batches.pop(0)
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
        self.commits.append(dict(offsets))

    def highwater(self, tp: TopicPartition) -> int:
        return 100

    async def committed(self, tp: TopicPartition) -> int | None:
        return 7

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self.seeks += [(tp, 0) for tp in partitions]


@dataclass
class RecordingProcessor:
    failures: list[BaseException] = field(default_factory=list)
    written: list[list[str]] = field(default_factory=list)
    assigned: list[frozenset[TopicPartition]] = field(default_factory=list)

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, ConnectionError)

    async def write(self, deliveries: Sequence[Delivery[PredictionEvent]]) -> None:
        if not deliveries:
            return
        if self.failures:
            raise self.failures.pop(0)
        self.written.append([delivery.event.request_id for delivery in deliveries])

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        self.assigned.append(partitions)

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        return None


def make_loop(
    batches: list[dict[TopicPartition, list[Record]]],
    processor: RecordingProcessor,
    consumer: FakeConsumer | None = None,
    keep_key: Callable[[bytes | None], bool] | None = None,
) -> tuple[ConsumerLoop[PredictionEvent], FakeConsumer, FakeRecordProducer]:
    consumer = consumer or FakeConsumer(batches)
    producer = FakeRecordProducer()
    options = LoopOptions(
        name="test",
        group="test-group",
        topics={TOPIC: TOPIC_EVENTS[Topic.PREDICTIONS]},
        dead_letter_topics={TOPIC: f"{TOPIC}.dlq"},
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.02,
        keep_key=keep_key,
    )
    loop: ConsumerLoop[PredictionEvent] = ConsumerLoop(options, consumer, producer, processor)
    consumer.loop = loop
    return loop, consumer, producer


def good(partition: int, offset: int) -> Record:
    event = prediction(offset)
    return Record(TOPIC, partition, offset, event.to_bytes(), event.partition_key())


async def test_writes_then_commits_the_next_offsets() -> None:
    processor = RecordingProcessor()
    loop, consumer, _ = make_loop([{TP0: [good(0, 0), good(0, 1)], TP1: [good(1, 5)]}], processor)
    await loop.run()
    assert processor.written == [["r-0", "r-1", "r-5"]]
    assert consumer.commits == [{TP0: 2, TP1: 6}]


async def test_records_refused_by_key_are_skipped_undecoded_and_committed() -> None:
    processor = RecordingProcessor()
    broken = Record(TOPIC, 0, 2, b"{not json", b"r-skip")
    loop, consumer, producer = make_loop(
        [{TP0: [good(0, 0), good(0, 1), broken], TP1: [good(1, 5)]}],
        processor,
        keep_key=lambda key: key in (b"r-1", b"r-5"),
    )
    await loop.run()
    assert processor.written == [["r-1", "r-5"]]
    # Skipped, not dead-lettered: the undecoded record is no one's to judge here.
    assert not producer.sent
    assert consumer.commits == [{TP0: 3, TP1: 6}]


async def test_bad_messages_go_to_the_dead_letter_topic_and_good_ones_go_on() -> None:
    label = GroundTruth(request_id="x", label=1.0, observed_at=prediction(0).occurred_at)
    garbage = [
        Record(TOPIC, 0, 0, b"{not json", b"k"),
        Record(TOPIC, 0, 1, b"[1, 2]"),
        Record(TOPIC, 0, 2, label.to_bytes()),
        Record(
            TOPIC,
            0,
            3,
            prediction(3).to_bytes().replace(b'"schema_version":1', b'"schema_version":9'),
        ),
        Record(TOPIC, 0, 4, prediction(4).to_bytes().replace(b'"prediction":1.0,', b"")),
        Record(TOPIC, 0, 5, None),
    ]
    processor = RecordingProcessor()
    loop, consumer, producer = make_loop([{TP0: [*garbage, good(0, 6)]}], processor)
    await loop.run()
    assert processor.written == [["r-6"]]
    assert consumer.commits == [{TP0: 7}]
    letters = [DeadLetter.from_bytes(value) for _, _, value in producer.sent]
    assert all(topic == f"{TOPIC}.dlq" for topic, _, _ in producer.sent)
    assert [letter.failure for letter in letters] == [
        FailureKind.INVALID_JSON,
        FailureKind.NOT_AN_OBJECT,
        FailureKind.UNEXPECTED_EVENT_TYPE,
        FailureKind.UNSUPPORTED_SCHEMA_VERSION,
        FailureKind.INVALID_EVENT,
        FailureKind.INVALID_JSON,
    ]
    assert letters[0].original_value == b"{not json"
    assert letters[0].original_key == b"k"
    assert [letter.source_offset for letter in letters] == [0, 1, 2, 3, 4, 5]
    assert {letter.source_topic for letter in letters} == {TOPIC}
    assert {letter.consumer_group for letter in letters} == {"test-group"}
    assert "prediction" in letters[4].reason


async def test_a_transient_failure_pauses_and_retries_the_same_batch() -> None:
    processor = RecordingProcessor(failures=[ConnectionError("db down"), ConnectionError("still")])
    loop, consumer, _ = make_loop([{TP0: [good(0, 0)]}], processor)
    await loop.run()
    assert processor.written == [["r-0"]]
    assert consumer.commits == [{TP0: 1}]
    assert consumer.polls_while_paused >= 2  # the group saw it alive during the backoff
    assert not consumer.paused


async def test_a_non_transient_failure_stops_without_committing() -> None:
    processor = RecordingProcessor(failures=[RuntimeError("bug")])
    loop, consumer, _ = make_loop([{TP0: [good(0, 0)]}], processor)
    with pytest.raises(RuntimeError, match="bug"):
        await loop.run()
    assert consumer.commits == []


async def test_stopping_during_a_backoff_abandons_the_batch_uncommitted() -> None:
    processor = RecordingProcessor(failures=[ConnectionError("down")] * 1000)
    loop, consumer, _ = make_loop([{TP0: [good(0, 0)]}], processor)
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(consumer.paused_once.wait(), 5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert consumer.commits == []
    assert processor.written == []


class SlowProcessor(RecordingProcessor):
    """Holds its first non-empty write until ``release`` is set, then fails if told to."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.fail = fail
        self.held = False

    async def write(self, deliveries: Sequence[Delivery[PredictionEvent]]) -> None:
        if deliveries and not self.held:
            self.held = True
            await self.release.wait()
            if self.fail:
                raise RuntimeError("bug")
        await super().write(deliveries)


class IdleConsumer(FakeConsumer):
    """Once the batches are handed out, getmany waits until ``wake`` (the lock stays free)."""

    def __init__(self, batches: list[dict[TopicPartition, list[Record]]]) -> None:
        super().__init__(batches)
        self.wake = asyncio.Event()

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        if self.batches:
            return self.batches.pop(0)
        await self.wake.wait()
        return {}


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_the_next_batch_is_decoded_while_one_is_written_and_commits_keep_order() -> None:
    processor = SlowProcessor()
    loop, consumer, _ = make_loop([{TP0: [good(0, 0)]}, {TP0: [good(0, 1)]}], processor)
    task = asyncio.create_task(loop.run())
    await until(lambda: not consumer.batches)  # the second batch fetched during the first write
    await asyncio.sleep(0.05)
    assert processor.written == []
    assert consumer.commits == []
    processor.release.set()
    await asyncio.wait_for(task, 5)
    assert processor.written == [["r-0"], ["r-1"]]
    assert consumer.commits == [{TP0: 1}, {TP0: 2}]


async def test_a_write_failing_while_a_revoke_waits_for_it_stops_the_loop_uncommitted() -> None:
    processor = SlowProcessor(fail=True)
    loop, consumer, _ = make_loop([], processor, IdleConsumer([{TP0: [good(0, 0)]}]))
    assert isinstance(consumer, IdleConsumer)
    task = asyncio.create_task(loop.run())
    await until(lambda: processor.held)
    revoke = asyncio.create_task(consumer.listener.on_partitions_revoked({TP0}))
    await asyncio.sleep(0.05)
    processor.release.set()
    await asyncio.wait_for(revoke, 5)  # the revoke returns; the loop reports the failure
    consumer.wake.set()
    with pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(task, 5)
    assert consumer.commits == []


class EagerConsumer(FakeConsumer):
    """Hands out its batches even while paused: records fetched before a pause took effect."""

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(0)
        if self.batches:
            return self.batches.pop(0)
        return await super().getmany(timeout_ms, max_records)


async def test_a_batch_after_an_abandoned_one_is_neither_written_nor_committed() -> None:
    # The first write fails once; the loop is stopped during its backoff, so that batch is
    # abandoned. The next batch, already decoded, would succeed: committing it would commit
    # past the abandoned records, so it must be dropped too.
    processor = RecordingProcessor(failures=[ConnectionError("down")])
    loop, consumer, _ = make_loop(
        [], processor, EagerConsumer([{TP0: [good(0, 0)]}, {TP0: [good(0, 1)]}])
    )
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(consumer.paused_once.wait(), 5)
    loop.stop()
    await asyncio.wait_for(task, 5)
    assert processor.written == []
    assert consumer.commits == []


async def test_new_partitions_are_positioned_before_their_records_are_used() -> None:
    processor = RecordingProcessor()
    # Records fetched between the assignment and the take-over are dropped (and re-fetched
    # from the committed offset the loop seeks to).
    loop, consumer, _ = make_loop([{TP0: [good(0, 3)]}, {TP0: [good(0, 7)]}], processor)
    await consumer_listener_assigns(loop, consumer, {TP0})
    await loop.run()
    assert consumer.seeks == [(TP0, 7)]
    assert processor.assigned == [frozenset({TP0})]
    assert processor.written == [["r-7"]]
    assert consumer.commits == [{TP0: 8}]


async def consumer_listener_assigns(
    loop: ConsumerLoop[Any], consumer: FakeConsumer, partitions: set[TopicPartition]
) -> None:
    loop._assigned(frozenset(partitions))
    # aiokafka may already have fetched records of the new partitions before the pause.
    consumer.paused.clear()
