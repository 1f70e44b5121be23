"""The group-consumer loop every driftloop consumer runs: decode, write, then commit.

Delivery is at least once: offsets are committed only after the ``Processor`` has written a
batch (and after the batch's dead letters are acknowledged), so a crash replays the
uncommitted tail and the processors make their writes idempotent. Order of one iteration:

1. ``getmany`` a batch; decode each record with ``decode_event`` into the topic's events;
   an undecodable or invalid record becomes a ``DeadLetter`` for ``<topic>.dlq``. This runs
   while the previous batch is being written (its own task), so decoding overlaps the sinks'
   I/O; writes and commits still happen one batch at a time, in order.
2. ``Processor.write`` the decoded events. A transient failure (a sink is down) pauses every
   assigned partition and retries the same batch with exponential backoff; records are never
   skipped. The loop keeps calling ``getmany`` on the paused partitions meanwhile, so the
   group does not evict it for exceeding ``max.poll.interval.ms``.
3. Produce the dead letters and wait for their acknowledgements.
4. Commit the batch's offsets; resume the partitions.

New partitions are paused by the rebalance listener and taken over between batches: seeked to
the group's committed offset, handed to ``Processor.on_assigned`` (which may seek further back,
e.g. to a sink's own offsets), then resumed; records fetched before that are dropped and
fetched again. A partition revoke waits for the batch in flight (or abandons it while the loop
is backing off — the new owner replays it), lets the processor flush, and commits what is
pending. A batch decoded after an abandoned one is dropped too, never committed past it, until
the next take-over seeks back to the committed offsets.
SIGTERM/SIGINT set a stop flag: the loop finishes its batch, commits and closes; when it stops
because of a failure it does not commit. A second Ctrl+C exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from driftloop.events.producer import DeliveryError, Record, RecordProducer
from schemas.events import DeadLetter, Event, EventDecodeError, FailureKind, decode_event

log = logging.getLogger(__name__)

E_co = TypeVar("E_co", bound=Event, covariant=True)
E = TypeVar("E", bound=Event)
E_contra = TypeVar("E_contra", bound=Event, contravariant=True)

EXIT_AT_ONCE: Final = 130
# Records decoded between two turns of the event loop (a write in flight progresses between).
DECODE_SLICE: Final = 500

RECORDS_IN = Counter(
    "driftloop_consumer_records_in_total",
    "Records read from Kafka, decodable or not.",
    ["consumer", "topic"],
)
RECORDS_OUT = Counter(
    "driftloop_consumer_records_out_total",
    "Rows or messages written to a sink (a duplicate that the sink ignored is not counted).",
    ["consumer", "sink"],
)
DUPLICATES = Counter(
    "driftloop_consumer_duplicates_total",
    "Records a sink already held (replays, duplicate messages), ignored idempotently.",
    ["consumer", "sink"],
)
BATCH_SIZE = Histogram(
    "driftloop_consumer_batch_size",
    "Records per consumed batch.",
    ["consumer"],
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000),
)
WRITE_SECONDS = Histogram(
    "driftloop_consumer_write_seconds",
    "Time to write one batch to a sink.",
    ["consumer", "sink"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAG = Gauge(
    "driftloop_consumer_lag",
    "Records of the assigned partition not committed yet: its end offset minus the group's "
    "committed offset, after every poll and every few seconds while consumption is paused.",
    ["consumer", "topic", "partition"],
)
COMMITTED_OFFSET = Gauge(
    "driftloop_consumer_committed_offset",
    "Last offset committed for the partition (the next offset to read).",
    ["consumer", "topic", "partition"],
)
DEAD_LETTERS = Counter(
    "driftloop_consumer_dead_letters_total",
    "Records sent to the dead-letter topic, by source topic and failure.",
    ["consumer", "topic", "failure"],
)
BACKOFFS = Counter(
    "driftloop_consumer_backoffs_total",
    "Batches retried after a transient sink failure (consumption paused meanwhile).",
    ["consumer"],
)
SINKS_UP = Gauge(
    "driftloop_consumer_sinks_up",
    "1 while the last write succeeded, 0 while the consumer is paused on a failing sink.",
    ["consumer"],
)
READY = Gauge(
    "driftloop_consumer_ready",
    "1 once the consumer has joined its group and is consuming.",
    ["consumer"],
)


@dataclass(frozen=True, slots=True)
class Delivery(Generic[E_co]):
    """A decoded event with the Kafka coordinates it was read from."""

    event: E_co
    topic: str
    partition: int
    offset: int


class Processor(Protocol[E_contra]):
    """The write side of a consumer: what to do with a batch of decoded events."""

    def is_transient(self, error: BaseException) -> bool:
        """Whether ``error`` means a sink is unavailable (retry later) rather than a bug."""
        ...

    async def write(self, deliveries: Sequence[Delivery[E_contra]]) -> None:
        """Write the batch durably (idempotently); called with an empty batch when idle."""
        ...

    async def on_assigned(
        self, consumer: AIOKafkaConsumer, partitions: frozenset[TopicPartition]
    ) -> None:
        """Partitions were assigned: restore state (e.g. seek to a sink's own offsets)."""
        ...

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Partitions are being revoked: flush what depends on them, or drop it."""
        ...


@dataclass(frozen=True, slots=True)
class LoopOptions:
    """How a consumer loop batches and backs off."""

    name: str
    """Consumer name, the ``consumer`` label of its metrics."""
    group: str
    """Kafka consumer group."""
    topics: Mapping[str, tuple[type[Event], ...]]
    """Full topic name -> the events it carries."""
    dead_letter_topics: Mapping[str, str]
    """Full topic name -> its dead-letter topic."""
    max_batch: int = 5000
    poll_timeout_ms: int = 500
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 15.0
    paused_lag_refresh_seconds: float = 5.0
    """While paused on a failing sink, how often the end offsets are asked for (the lag)."""
    keep_key: Callable[[bytes | None], bool] | None = None
    """Records whose key this refuses are skipped before decoding: committed with their batch,
    never decoded, written or dead-lettered (a consumer that reads a sample of a topic, such
    as the shadow-scorer). None: every record is decoded."""


@dataclass(slots=True)
class _Batch(Generic[E]):
    deliveries: list[Delivery[E]] = field(default_factory=list)
    dead_letters: list[tuple[str, DeadLetter]] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


class _AbandonedError(Exception):
    """The batch in flight was given up (revoke or stop during backoff); it is not committed."""


class ConsumerLoop(Generic[E]):
    """One group consumer running process -> write -> commit until stopped."""

    def __init__(
        self,
        options: LoopOptions,
        consumer: AIOKafkaConsumer,
        producer: RecordProducer,
        processor: Processor[E],
    ) -> None:
        self.options = options
        self.consumer = consumer
        self.producer = producer
        self.processor = processor
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._revoking = False
        self._pending: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._taking_over: set[TopicPartition] = set()
        self._paused_lag_due = 0.0
        self._writing: asyncio.Task[_Batch[E] | None] | None = None
        self._failure: Exception | None = None
        self._abandoned = False
        self._accepted = {topic: tuple(events) for topic, events in options.topics.items()}
        SINKS_UP.labels(options.name).set(1)
        READY.labels(options.name).set(0)
        # Counters exist at 0 before their first event: an alert on increase() sees the first
        # dead letter or backoff, and a panel shows 0 rather than no data.
        BACKOFFS.labels(options.name)
        for topic in options.topics:
            for failure in FailureKind:
                DEAD_LETTERS.labels(options.name, topic, failure.value)

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self.stopping.set()

    async def run(self) -> None:
        """Consume until ``stop``; raises (without committing) on a non-transient failure."""
        self.consumer.subscribe(list(self.options.topics), listener=_Rebalance(self))
        try:
            while not self.stopping.is_set():
                records = await self.consumer.getmany(
                    timeout_ms=self.options.poll_timeout_ms, max_records=self.options.max_batch
                )
                if self._failure is not None:
                    raise self._failure  # a write that failed while a revoke waited for it
                async with self._lock:
                    if self._taking_over:
                        # The batch in flight lands before partitions are positioned anew.
                        await self._settle()
                        # Records of a partition fetched before the take-over's seek are dropped;
                        # the seek fetches them again.
                        records = {
                            tp: batch
                            for tp, batch in records.items()
                            if tp not in self._taking_over
                        }
                        try:
                            await self._with_backoff(self._take_over)
                        except _AbandonedError:
                            continue
                        # Every partition is positioned at its committed offset again.
                        self._abandoned = False
                        READY.labels(self.options.name).set(1)
                    # Decoding this batch overlaps the write of the previous one; the writes
                    # (and their commits) stay one at a time and in order.
                    assigned = self.consumer.assignment()
                    batch = await self._decode(
                        {tp: items for tp, items in records.items() if tp in assigned}
                    )
                    await self._land()
                    if self._abandoned:
                        # A batch before this one was given up uncommitted: writing and
                        # committing this one would commit past it. Nothing more is written
                        # until a take-over seeks back to the committed offsets.
                        continue
                    self._writing = asyncio.create_task(self._write(batch))
                    # The landed batch's commit goes to the broker while this one is written:
                    # the round trip overlaps the sink's work. Commits stay in batch order
                    # (the next one waits for this one, under the lock).
                    await self._commit_pending()
                    self._record_lag()
            async with self._lock:
                await self._settle()
                if self._failure is not None:
                    raise self._failure
                await self._commit_pending()
        finally:
            READY.labels(self.options.name).set(0)
            if self._writing is not None:
                self._writing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._writing
                self._writing = None

    async def _take_over(self) -> None:
        # aiokafka activates an assignment (and may fetch from it) before it calls the
        # rebalance listener, so the listener only pauses the new partitions; here, between
        # batches, they are positioned explicitly and handed to the processor, then resumed.
        partitions = frozenset(self._taking_over & self.consumer.assignment())
        for tp in partitions:
            committed = await self.consumer.committed(tp)
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
                self._committed[tp] = committed
        await self.processor.on_assigned(self.consumer, partitions)
        self._taking_over.clear()
        self.consumer.resume(*partitions)

    async def _write(self, batch: _Batch[E]) -> _Batch[E] | None:
        """Write a batch, backing off while a sink is down; None when it was abandoned."""
        try:
            await self._with_backoff(partial(self._write_batch, batch))
        except _AbandonedError:
            log.warning("%s: batch abandoned uncommitted; it will be replayed", self.options.name)
            return None
        return batch

    async def _settle(self) -> None:
        """Wait for the batch in flight, then commit its offsets (raises what the write raised)."""
        await self._land()
        await self._commit_pending()
        self._record_lag()

    async def _land(self) -> None:
        """Wait for the batch in flight and queue its offsets for the next commit."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        batch = await writing
        if batch is None:
            self._abandoned = True
            return
        self._pending.update(batch.offsets)

    async def _decode(self, records: Mapping[TopicPartition, list[Any]]) -> _Batch[E]:
        batch: _Batch[E] = _Batch()
        name = self.options.name
        decoded = 0
        for tp, items in records.items():
            if not items:
                continue
            RECORDS_IN.labels(name, tp.topic).inc(len(items))
            batch.offsets[tp] = items[-1].offset + 1
            accepted = self._accepted[tp.topic]
            keep_key = self.options.keep_key
            for record in items:
                if keep_key is not None and not keep_key(record.key):
                    continue
                decoded += 1
                if not decoded % DECODE_SLICE:
                    # The write in flight moves on meanwhile: decoding a whole batch in one go
                    # stalled its COPY for the ~100 ms the batch took.
                    await asyncio.sleep(0)
                try:
                    event = decode_event(record.value or b"", accepted)
                except EventDecodeError as error:
                    batch.dead_letters.append(
                        (tp.topic, self._dead_letter(record, error.kind, error.reason))
                    )
                    continue
                batch.deliveries.append(Delivery(event, tp.topic, tp.partition, record.offset))  # type: ignore[arg-type]
        if batch.offsets:
            BATCH_SIZE.labels(name).observe(len(batch.deliveries) + len(batch.dead_letters))
        return batch

    def _dead_letter(self, record: Any, failure: FailureKind, reason: str) -> DeadLetter:
        return DeadLetter(
            original_value=record.value or b"",
            original_key=record.key,
            failure=failure,
            reason=reason or failure.value,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            consumer_group=self.options.group,
        )

    async def _write_batch(self, batch: _Batch[E]) -> None:
        # Dead letters are acknowledged before the write's offsets are committed, and a replay
        # sends them again: the DLQ is at least once too (replay de-duplicates by source offset).
        await self.processor.write(batch.deliveries)
        if batch.dead_letters:
            await self.producer.send(
                Record(
                    self.options.dead_letter_topics[topic],
                    letter.partition_key(),
                    letter.to_bytes(),
                )
                for topic, letter in batch.dead_letters
            )
            for topic, letter in batch.dead_letters:
                DEAD_LETTERS.labels(self.options.name, topic, letter.failure.value).inc()
            batch.dead_letters.clear()

    async def _with_backoff(self, operation: Callable[[], Awaitable[None]]) -> None:
        delay = self.options.backoff_initial_seconds
        paused = False
        try:
            while True:
                try:
                    await operation()
                except Exception as error:
                    if not (
                        self.processor.is_transient(error)
                        or isinstance(error, KafkaError | DeliveryError)
                    ):
                        raise
                    SINKS_UP.labels(self.options.name).set(0)
                    BACKOFFS.labels(self.options.name).inc()
                    log.warning(
                        "%s: sink unavailable (%s: %s); consumption paused, retry in %.1fs",
                        self.options.name,
                        type(error).__name__,
                        error,
                        delay,
                    )
                    if not paused:
                        self.consumer.pause(*self.consumer.assignment())
                        paused = True
                        self._paused_lag_due = (
                            time.monotonic() + self.options.paused_lag_refresh_seconds
                        )
                    await self._wait_paused(delay)
                    delay = min(delay * 2, self.options.backoff_max_seconds)
                    continue
                SINKS_UP.labels(self.options.name).set(1)
                return
        finally:
            if paused:
                self.consumer.resume(*(self.consumer.assignment() - self._taking_over))

    async def _wait_paused(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.stopping.is_set() or self._revoking:
                raise _AbandonedError
            if time.monotonic() >= self._paused_lag_due:
                self._paused_lag_due = time.monotonic() + self.options.paused_lag_refresh_seconds
                await self._record_paused_lag()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Polling paused partitions returns nothing but proves liveness to the group.
            await self.consumer.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))

    async def _commit_pending(self) -> None:
        if not self._pending:
            return
        offsets = dict(self._pending)
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as error:
            # The group rebalanced under us: the new owner replays from the last commit and
            # the writes are idempotent, so nothing is lost or duplicated downstream.
            log.warning("%s: commit refused after a rebalance (%s)", self.options.name, error)
            self._pending.clear()
            return
        self._pending.clear()
        self._committed.update(offsets)
        for tp, offset in offsets.items():
            COMMITTED_OFFSET.labels(self.options.name, tp.topic, str(tp.partition)).set(offset)

    def _record_lag(self) -> None:
        # Every assigned partition, with records in this batch or not: the high watermark of
        # the last fetch, which covers idle partitions too, against the committed offset.
        for tp in self.consumer.assignment():
            committed = self._committed.get(tp)
            highwater = self.consumer.highwater(tp)
            if committed is not None and highwater is not None:
                self._set_lag(tp, highwater - committed)

    async def _record_paused_lag(self) -> None:
        # Paused partitions are not fetched, so their high watermark stands still while the
        # log grows: ask the brokers for the end offsets instead.
        partitions = [tp for tp in self.consumer.assignment() if tp in self._committed]
        if not partitions:
            return
        try:
            ends = await self.consumer.end_offsets(partitions)
        except KafkaError as error:
            log.debug("%s: end offsets unavailable (%s)", self.options.name, error)
            return
        for tp, end in ends.items():
            committed = self._committed.get(tp)
            if committed is not None:
                self._set_lag(tp, end - committed)

    def _set_lag(self, tp: TopicPartition, records: int) -> None:
        LAG.labels(self.options.name, tp.topic, str(tp.partition)).set(max(records, 0))

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        # A partition now owned by another member reports its lag there, not here.
        for tp in partitions:
            self._committed.pop(tp, None)
            for gauge in (LAG, COMMITTED_OFFSET):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.options.name, tp.topic, str(tp.partition))

    def _assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self.consumer.pause(*partitions)
        self._taking_over |= partitions
        READY.labels(self.options.name).set(0)

    async def _revoke(self, partitions: frozenset[TopicPartition]) -> None:
        self._revoking = True
        try:
            async with self._lock:
                self._taking_over -= partitions
                try:
                    await self._settle()
                except Exception as error:  # noqa: BLE001 - handed to the loop, re-raised there
                    # The loop raises it at its next turn, without committing anything more.
                    self._failure = error
                    return
                await self._commit_pending()
                await self.processor.on_revoked(partitions)
                self._forget(partitions)
        finally:
            self._revoking = False


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumerLoop[Any]) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._loop._revoke(frozenset(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = frozenset(assigned)
        log.info("%s: assigned %s", self._loop.options.name, sorted(partitions))
        self._loop._assigned(partitions)


def install_stop_signals(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT call ``stop`` once; a second signal exits the process at once."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def handle(signum: int) -> None:
        if received:
            log.warning("second signal: exiting at once, uncommitted records will be replayed")
            os._exit(EXIT_AT_ONCE)
        received.append(signum)
        log.info("signal %s: finishing the batch, committing and stopping", signum)
        stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)
