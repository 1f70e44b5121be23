"""Publishing events to Kafka off the request path, with a durable spool while Kafka is away.

``EventPublisher`` is the one publisher. By default it runs in the gateway's relay process
(``gateway.relay``), which feeds it what the gateway's event loop writes to a pipe;
``GATEWAY_PUBLISHER_PROCESS=false`` runs it in that event loop. Either way the gateway sees a
``Publisher``: ``publish`` and ``publish_predictions`` return at once, and ``status`` reports
the state and counts (a ``PublisherStatus``) that the metrics and ``/health/ready`` show.

``publish`` only appends to an in-memory queue: the request never waits for the broker. A
sender task serialises the queued events and hands them to aiokafka, one linger's worth at a
time. Two modes:

- direct: the producer is up and the spool is empty; events go to Kafka, and an event whose
  delivery fails (no acknowledgement within the timeout) is written to the spool;
- spooling: the producer is down or the spool holds events; new events are appended to the
  spool behind them, so the spool's order is arrival order.

A replay task sends the spool's oldest events in rounds, in record batches by partition as
the direct path does. It removes a round's events only up to the first one whose batch Kafka
did not acknowledge, and it goes back to direct mode when the spool is empty. Delivery is at
least once: the events after that one are sent again, even those Kafka took, and the feature
logger's writes are idempotent by request id. Events sent directly and still unacknowledged
when the broker went away are spooled when their timeout expires, so they may follow events
that came after them; each event carries its own key and timestamp, and no key spans two
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Final, NamedTuple, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict

from driftloop.events import kafka
from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings
from schemas.events import Event, PredictionEncoder, PredictionEvent, PredictionSource
from schemas.fields import FeatureValue

log = logging.getLogger(__name__)

# Records replayed per round: a few produce requests' worth, acknowledged before the spool
# lets them go.
_REPLAY_BATCH: Final = 5000
# How long the sender lets events gather before it packs them into record batches and hands
# them over, one batch per partition in one produce request. Each produce request costs the
# gateway's event loop about a millisecond of aiokafka's pure-Python protocol work and
# sender-task wake-ups whatever its size: at 8,000 events/s, lingering 10 ms (and sending
# again at once whatever arrived meanwhile) made 200 requests a second and publishing cost
# 17 us an event; lingering 50 ms makes 20, and 5 us. The request never waits for it; an
# event reaches Kafka up to 50 ms later, and a graceful stop still hands everything over.
_LINGER_SECONDS: Final = 0.05
# A linger's events of one partition fit one record batch: aiokafka's default, 16 KiB (~45
# prediction events), split them over several requests. Half the broker's default
# message.max.bytes, so even an incompressible batch is taken.
_MAX_BATCH_BYTES: Final = 512 * 1024
_RETRY_SECONDS: Final = 1.0
_MAX_RETRY_SECONDS: Final = 10.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class _UnsentError(Exception):
    """Kafka refused a batch: the records not handed over, to be spooled."""

    def __init__(self, error: KafkaError, unsent: list[SpoolRecord]) -> None:
        super().__init__(str(error))
        self.error = error
        self.unsent = unsent


class PublisherState(StrEnum):
    """Where events go now."""

    DIRECT = "direct"
    SPOOLING = "spooling"
    STOPPED = "stopped"


class PublisherStatus(BaseModel):
    """Where a publisher sends events now, and what became of them since it started."""

    model_config = ConfigDict(frozen=True)

    state: PublisherState
    spool_depth: int = 0
    spool_capacity: int = 0
    published: dict[str, int] = {}
    """Events Kafka acknowledged, by topic."""
    publish_errors: dict[str, int] = {}
    """Sends Kafka did not acknowledge in time (their events went to the spool), by topic."""
    spooled: int = 0
    spool_dropped: int = 0
    """Events lost because the spool was full."""

    @property
    def spool_full(self) -> bool:
        """Whether a new event would be dropped."""
        return self.spool_capacity > 0 and self.spool_depth >= self.spool_capacity

    def after(self, earlier: PublisherStatus) -> PublisherStatus:
        """This status with the counts of an earlier publisher's (a relay before) added."""
        return self.model_copy(
            update={
                "published": _sum(earlier.published, self.published),
                "publish_errors": _sum(earlier.publish_errors, self.publish_errors),
                "spooled": earlier.spooled + self.spooled,
                "spool_dropped": earlier.spool_dropped + self.spool_dropped,
            }
        )


def _sum(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:
    total = dict(first)
    for key, count in second.items():
        total[key] = total.get(key, 0) + count
    return total


class ModelKey(NamedTuple):
    """The model version that answered, as its prediction events name it."""

    name: str
    version: int
    run_id: str


class Answer(NamedTuple):
    """One answer's predictions, as the scorer hands them to a publisher."""

    model: ModelKey
    occurred_at_us: int
    """When it was answered: microseconds since the Unix epoch."""
    latency_ms: float
    request_ids: Sequence[str]
    rows: Sequence[Mapping[str, FeatureValue]]
    predictions: Sequence[float]


class PredictionRecords:
    """Prediction events from one source as Kafka records: keyed by request id, one topic.

    The fields naming the model are encoded once per model version (``PredictionEvent.encoder``);
    the rows were checked by the feature declaration and the model's output is a float, so
    nothing is validated again (the unit tests decode what it writes, strictly).
    """

    def __init__(self, topic: str, source: PredictionSource) -> None:
        self.topic = topic
        self.source = source
        self._encoders: dict[ModelKey, PredictionEncoder] = {}

    def record(
        self,
        model: ModelKey,
        occurred_at: datetime,
        request_id: str,
        features: Mapping[str, FeatureValue] | Any,
        prediction: float,
        latency_ms: float,
    ) -> SpoolRecord:
        """The record of one answered row; ``features`` may be an ``orjson.Fragment``."""
        encode = self._encoders.get(model) or self._encoder(model)
        value = encode(
            occurred_at=occurred_at,
            request_id=request_id,
            features=features,
            prediction=prediction,
            latency_ms=latency_ms,
        )
        return SpoolRecord(self.topic, request_id.encode(), value)

    def _encoder(self, model: ModelKey) -> PredictionEncoder:
        encoder = self._encoders[model] = PredictionEvent.encoder(
            model_name=model.name,
            model_version=model.version,
            run_id=model.run_id,
            source=self.source,
        )
        return encoder


def datetime_of(microseconds: int) -> datetime:
    """The UTC time ``microseconds`` after the Unix epoch, exactly."""
    return _EPOCH + timedelta(microseconds=microseconds)


class Publisher(Protocol):
    """What the gateway publishes through: in its own event loop or from a relay process."""

    def publish(self, topic: str, event: Event) -> None:
        """Queue an event for ``topic``; returns at once, never raises for Kafka's sake."""

    def publish_predictions(self, answer: Answer) -> None:
        """Queue the prediction events of one answer (the hot path); same promise."""

    async def start(self, *, connect_within_seconds: float) -> None:
        """Begin publishing: Kafka or the spool take events from here on."""

    async def stop(self) -> None:
        """Hand every queued event to Kafka or the spool, then close."""

    def status(self) -> PublisherStatus:
        """The state and counts now."""


class EventPublisher:
    """Sends events to Kafka in the background; spools and replays them when it cannot."""

    def __init__(
        self,
        settings: KafkaSettings,
        spool: Spool,
        *,
        timeout_seconds: float,
        client_name: str = "gateway",
        predictions: PredictionRecords | None = None,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.predictions = predictions
        self.timeout_seconds = timeout_seconds
        timeout_ms = int(timeout_seconds * 1000)
        self._producer_factory = producer_factory or partial(
            kafka.producer,
            settings,
            client_name,
            # A batch unacknowledged within the timeout fails and goes to the durable spool.
            request_timeout_ms=timeout_ms,
            # The sender lingers before packing whole record batches; aiokafka lingering on
            # them again would only delay them and wake its sender once more per batch.
            linger_ms=0,
            max_batch_size=_MAX_BATCH_BYTES,
        )
        self._producer: AIOKafkaProducer | None = None
        self._queue: deque[SpoolRecord | tuple[str, Event]] = deque()
        self._queued = asyncio.Event()
        self._spooled = asyncio.Event()
        self._in_flight: dict[int, tuple[list[SpoolRecord], asyncio.Future[object]]] = {}
        self._partitioner: kafka.KeyPartitioner | None = None
        self._next_token = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._dropped_warned = False
        self._published: Counter[str] = Counter()
        self._publish_errors: Counter[str] = Counter()
        self._spooled_count = 0
        self._dropped_count = 0

    @property
    def state(self) -> PublisherState:
        """Direct to Kafka, spooling, or stopped."""
        if self._stopping:
            return PublisherState.STOPPED
        if self._producer is None or self.spool.depth:
            return PublisherState.SPOOLING
        return PublisherState.DIRECT

    def status(self) -> PublisherStatus:
        """The state, the spool's depth and the counts since start."""
        return PublisherStatus(
            state=self.state,
            spool_depth=self.spool.depth,
            spool_capacity=self.spool.max_records,
            published=dict(self._published),
            publish_errors=dict(self._publish_errors),
            spooled=self._spooled_count,
            spool_dropped=self._dropped_count,
        )

    def publish(self, topic: str, event: Event) -> None:
        """Queue an event for ``topic``; returns at once, never raises for Kafka's sake."""
        self._queue.append((topic, event))
        if not self._queued.is_set():
            self._queued.set()

    def publish_encoded(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue an already encoded event (the relay's way); same promise as ``publish``."""
        self._queue.append(SpoolRecord(topic, key, value))
        if not self._queued.is_set():
            self._queued.set()

    def publish_predictions(self, answer: Answer) -> None:
        """Queue the prediction events of one answer; needs ``predictions`` at construction."""
        if self.predictions is None:
            raise RuntimeError("this publisher was made without PredictionRecords")
        record, occurred_at = self.predictions.record, datetime_of(answer.occurred_at_us)
        model, latency_ms = answer.model, answer.latency_ms
        for request_id, row, prediction in zip(
            answer.request_ids, answer.rows, answer.predictions, strict=True
        ):
            self._queue.append(record(model, occurred_at, request_id, row, prediction, latency_ms))
        if not self._queued.is_set():
            self._queued.set()

    async def start(self, *, connect_within_seconds: float) -> None:
        """Try to connect for a while (spooling meanwhile), then keep sending in the background."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connect(), connect_within_seconds)
        self._tasks = [
            asyncio.create_task(self._send_queued(), name="publisher-send"),
            asyncio.create_task(self._maintain(), name="publisher-replay"),
        ]

    async def stop(self) -> None:
        """Hand over what is queued, wait a while for acknowledgements, spool the rest."""
        self._stopping = True
        await self._drain_queue()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.flush(), self.timeout_seconds)
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(producer.stop(), self.timeout_seconds)
        # Unacknowledged events are kept: sent again after the restart (at least once).
        self._spool_unacknowledged()

    def _spool_unacknowledged(self) -> None:
        leftovers = [
            record
            for records, future in self._in_flight.values()
            if not _acknowledged(future)
            for record in records
        ]
        self._in_flight.clear()
        self._spool(leftovers)

    async def _drain_queue(self) -> None:
        while self._queue:
            await self._send_batch()

    async def _send_queued(self) -> None:
        while True:
            await self._queued.wait()
            await asyncio.sleep(_LINGER_SECONDS)
            self._queued.clear()
            # One batch per linger: events queued while it is handed over wait for the next
            # linger instead of leaving at once in a batch of their own.
            await self._send_batch()

    async def _send_batch(self) -> None:
        batch = [
            item if isinstance(item, SpoolRecord) else encode_record(*item)
            for item in self._drain()
        ]
        producer = self._producer
        if producer is None or self.spool.depth:
            self._spool(batch)
            return
        try:
            groups = list((await self._partitioner_of(producer).group(batch)).items())
        except KafkaError as error:
            self._kafka_failed(batch[0].topic, error)
            self._spool(batch)
            return
        for index, ((topic, partition), records) in enumerate(groups):
            try:
                await self._send_partition(producer, topic, partition, records)
            except _UnsentError as failure:
                self._kafka_failed(topic, failure.error)
                later = [record for _, group in groups[index + 1 :] for record in group]
                self._spool([*failure.unsent, *later])
                return

    def _partitioner_of(self, producer: AIOKafkaProducer) -> kafka.KeyPartitioner:
        if self._partitioner is None:
            self._partitioner = kafka.KeyPartitioner(producer)
        return self._partitioner

    async def _send_partition(
        self, producer: AIOKafkaProducer, topic: str, partition: int, records: list[SpoolRecord]
    ) -> None:
        sent = 0
        for builder, in_batch in kafka.record_batches(producer, records):
            try:
                await self._submit(producer, builder, topic, partition, in_batch)
            except KafkaError as error:
                raise _UnsentError(error, records[sent:]) from error
            sent += len(in_batch)

    async def _submit(
        self,
        producer: AIOKafkaProducer,
        builder: object,
        topic: str,
        partition: int,
        records: list[SpoolRecord],
    ) -> None:
        future = await producer.send_batch(builder, topic, partition=partition)
        token = self._next_token
        self._next_token += 1
        self._in_flight[token] = (records, future)
        future.add_done_callback(partial(self._delivered, token))

    def _drain(self) -> list[SpoolRecord | tuple[str, Event]]:
        items = list(self._queue)
        self._queue.clear()
        return items

    def _delivered(self, token: int, future: asyncio.Future[object]) -> None:
        entry = self._in_flight.pop(token, None)
        if entry is None:  # already spooled by stop() or _disconnect()
            return
        records = entry[0]
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is None:
            self._published[records[0].topic] += len(records)
            return
        self._kafka_failed(records[0].topic, error)
        self._spool(records)

    def _kafka_failed(self, topic: str, error: BaseException) -> None:
        self._publish_errors[topic] += 1
        if self.spool.depth == 0:
            log.warning("Kafka did not take an event for %s (%r); spooling", topic, error)

    def _spool(self, records: list[SpoolRecord]) -> None:
        if not records:
            return
        refused = self.spool.extend(records)
        self._spooled_count += len(records) - refused
        if refused:
            self._dropped_count += refused
            if not self._dropped_warned:
                log.error(
                    "spool %s is full (%d records): %d events dropped",
                    self.spool.path,
                    self.spool.max_records,
                    refused,
                )
                self._dropped_warned = True
        self._spooled.set()

    async def _maintain(self) -> None:
        delay = _RETRY_SECONDS
        while True:
            if self._producer is None:
                await self._connect()
            elif self.spool.depth:
                if await self._replay_batch():
                    delay = _RETRY_SECONDS
                    continue
                await self._disconnect()
            else:
                self._spooled.clear()
                await self._spooled.wait()
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_SECONDS)

    async def _connect(self) -> None:
        while self._producer is None:
            producer = self._producer_factory()
            try:
                await producer.start()
            except asyncio.CancelledError:
                # start() gave up on waiting (the gateway serves meanwhile): close this attempt.
                with contextlib.suppress(KafkaError, OSError):
                    await producer.stop()
                raise
            except (KafkaError, OSError) as error:
                log.warning("Kafka at %s unreachable (%r)", self.settings.bootstrap_servers, error)
                with contextlib.suppress(KafkaError, OSError):
                    await producer.stop()
                await asyncio.sleep(_RETRY_SECONDS)
            else:
                self._producer, self._partitioner = producer, None
                log.info("Kafka producer connected to %s", self.settings.bootstrap_servers)

    async def _disconnect(self) -> None:
        # A fresh producer after a failed replay: its connections and metadata start clean,
        # and new events are spooled meanwhile anyway.
        producer, self._producer = self._producer, None
        self._partitioner = None
        if producer is not None:
            with contextlib.suppress(TimeoutError, KafkaError, OSError):
                await asyncio.wait_for(producer.stop(), self.timeout_seconds)
        # Every event still in flight went to the producer just stopped; keep them.
        self._spool_unacknowledged()

    async def _replay_batch(self) -> bool:
        producer = self._producer
        batch = self.spool.peek(_REPLAY_BATCH)
        if producer is None or not batch:
            return True
        # Sent as the direct path sends: grouped by the same partitioner (a replayed event
        # lands where it would have), in whole record batches, each group in spool order.
        placed = [_Placed(*item.record, place) for place, item in enumerate(batch)]
        futures: list[asyncio.Future[object] | None] = [None] * len(batch)
        try:
            groups = await self._partitioner_of(producer).group(placed)
            for (topic, partition), records in groups.items():
                for builder, in_batch in kafka.record_batches(producer, records):
                    future = await producer.send_batch(builder, topic, partition=partition)
                    for record in in_batch:
                        futures[record.place] = future
        except KafkaError as error:
            log.warning("replaying the spool failed (%r)", error)
        await asyncio.gather(
            *{id(f): f for f in futures if f is not None}.values(), return_exceptions=True
        )
        # Only the acknowledged prefix leaves the spool, so the spool stays in arrival order;
        # records after it that Kafka took are sent again (delivery is at least once).
        acknowledged = 0
        for future in futures:
            if future is None or not _acknowledged(future):
                break
            acknowledged += 1
        if acknowledged:
            self.spool.acknowledge(batch[acknowledged - 1].position)
            for item in batch[:acknowledged]:
                self._published[item.record.topic] += 1
        if acknowledged < len(batch):
            self._publish_errors[batch[acknowledged].record.topic] += 1
            return False
        if not self.spool.depth:
            log.info("spool replayed; publishing directly again")
        return True


class _Placed(NamedTuple):
    """A spooled record with its place in the replayed batch."""

    topic: str
    key: bytes | None
    value: bytes
    place: int


def _acknowledged(future: asyncio.Future[object]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def encode_record(topic: str, event: Event) -> SpoolRecord:
    """The Kafka record of ``event`` for ``topic``: its partition key and its bytes."""
    return SpoolRecord(topic, event.partition_key(), event.to_bytes())
