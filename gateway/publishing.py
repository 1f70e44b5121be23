"""Publishing events to Kafka off the request path, with a durable spool while Kafka is away.

``EventPublisher`` is the gateway's publisher, over the platform's one ``EventProducer``
(librdkafka). ``publish`` and ``publish_predictions`` return at once and never raise for
Kafka's sake; ``status`` reports the state and counts (a ``PublisherStatus``) that the metrics
and ``/health/ready`` show. Two modes:

- direct: the spool is empty and a broker answers. Each event is handed to librdkafka, which
  batches, compresses and sends it on its own threads. An event whose delivery fails (not
  acknowledged within the timeout, or purged at shutdown) is written to the spool;
- spooling: the spool holds events, or librdkafka reported every broker down. New events are
  appended to the spool behind the ones already there, so the spool's order is arrival order.

A replay task sends the spool's oldest events in rounds and waits for each round's delivery
reports. It removes a round's events only up to the first one Kafka did not take, and the
publisher goes back to direct mode when the spool is empty. Delivery is at least once: the
events after that one are sent again, even those Kafka took, and the feature logger's writes
are idempotent by request id. Events sent directly and still unacknowledged when the broker went
away are spooled when their timeout expires, so they may follow events that came after them;
each event carries its own key and timestamp, and no key spans two requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Final, NamedTuple, Protocol

from confluent_kafka import KafkaError, KafkaException
from pydantic import BaseModel, ConfigDict

from driftloop.events.producer import (
    DeliveryError,
    EventProducer,
    Keyed,
    RecordProducer,
)
from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings
from schemas.events import Event, PredictionEncoder, PredictionEvent, PredictionSource
from schemas.fields import FeatureValue

log = logging.getLogger(__name__)

# Records replayed per round, acknowledged before the spool lets them go.
_REPLAY_BATCH: Final = 5000
# librdkafka lingers this long to fill a batch per partition: one produce request carries many
# requests' events, at no cost to the request itself (it never waits for Kafka).
_LINGER_MS: Final = 10.0
# How long events bound for the spool gather before one write (one SQLite transaction).
_SPOOL_LINGER_SECONDS: Final = 0.05
_RETRY_SECONDS: Final = 1.0
_MAX_RETRY_SECONDS: Final = 10.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


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
    """Sends events to Kafka through librdkafka; spools and replays them when it cannot."""

    def __init__(
        self,
        settings: KafkaSettings,
        spool: Spool,
        *,
        timeout_seconds: float,
        client_name: str = "gateway",
        predictions: PredictionRecords | None = None,
        producer_factory: Callable[[], RecordProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.predictions = predictions
        self.timeout_seconds = timeout_seconds
        self._producer_factory = producer_factory or partial(
            EventProducer,
            settings,
            client_name,
            # An event unacknowledged within the timeout fails and goes to the durable spool.
            delivery_timeout_seconds=timeout_seconds,
            linger_ms=_LINGER_MS,
        )
        self._producer: RecordProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_spool: list[SpoolRecord] = []
        self._spool_flush: asyncio.TimerHandle | None = None
        # Failed deliveries, taken over from delivery reports in one batch per loop turn.
        self._failures: deque[tuple[Keyed, KafkaError]] = deque()
        self._failures_scheduled = False
        self._spooled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._dropped_warned = False
        # Written by delivery reports only; a new topic's key is added under the lock that
        # ``status`` reads under, so a copy never sees the dict change size.
        self._published: dict[str, int] = {}
        self._published_lock = threading.Lock()
        self._publish_errors: Counter[str] = Counter()
        self._spooled_count = 0
        self._dropped_count = 0

    @property
    def state(self) -> PublisherState:
        """Direct to Kafka, spooling, or stopped."""
        if self._stopping:
            return PublisherState.STOPPED
        return PublisherState.DIRECT if self._direct() else PublisherState.SPOOLING

    def _direct(self) -> bool:
        producer = self._producer
        return (
            producer is not None
            and not producer.brokers_down
            and not self._to_spool
            and not self.spool.depth
        )

    def status(self) -> PublisherStatus:
        """The state, the spool's depth and the counts since start."""
        with self._published_lock:
            published = dict(self._published)
        return PublisherStatus(
            state=self.state,
            spool_depth=self.spool.depth + len(self._to_spool),
            spool_capacity=self.spool.max_records,
            published=published,
            publish_errors=dict(self._publish_errors),
            spooled=self._spooled_count,
            spool_dropped=self._dropped_count,
        )

    def publish(self, topic: str, event: Event) -> None:
        """Hand an event over for ``topic``; returns at once, never raises for Kafka's sake."""
        self._hand_over(encode_record(topic, event))

    def publish_encoded(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Hand over an already encoded event; same promise as ``publish``."""
        self._hand_over(SpoolRecord(topic, key, value))

    def publish_predictions(self, answer: Answer) -> None:
        """Hand over the prediction events of one answer; needs ``predictions`` at construction."""
        if self.predictions is None:
            raise RuntimeError("this publisher was made without PredictionRecords")
        record, occurred_at = self.predictions.record, datetime_of(answer.occurred_at_us)
        model, latency_ms, hand_over = answer.model, answer.latency_ms, self._hand_over
        for request_id, row, prediction in zip(
            answer.request_ids, answer.rows, answer.predictions, strict=True
        ):
            hand_over(record(model, occurred_at, request_id, row, prediction, latency_ms))

    def _hand_over(self, record: SpoolRecord) -> None:
        producer = self._producer
        if producer is not None and self._direct():
            try:
                producer.produce(record, self._delivered)
            except (BufferError, KafkaException) as error:
                self._failed(record.topic, error)
            else:
                return
        self._to_spool.append(record)
        if self._spool_flush is None and self._loop is not None:
            self._spool_flush = self._loop.call_later(_SPOOL_LINGER_SECONDS, self._flush_to_spool)

    def _flush_to_spool(self) -> None:
        self._spool_flush = None
        records, self._to_spool = self._to_spool, []
        self._spool(records)

    def _delivered(self, record: Keyed, error: KafkaError | None) -> None:
        # A delivery report, on the event loop: count, or queue the failure for the spool.
        if error is None:
            topic = record.topic
            if topic in self._published:
                self._published[topic] += 1
            else:
                with self._published_lock:
                    self._published[topic] = self._published.get(topic, 0) + 1
            return
        self._failures.append((record, error))
        if not self._failures_scheduled and self._loop is not None:
            self._failures_scheduled = True
            self._loop.call_soon_threadsafe(self._take_failures)

    def _take_failures(self) -> None:
        self._failures_scheduled = False
        failed: list[SpoolRecord] = []
        while self._failures:
            record, error = self._failures.popleft()
            self._failed(record.topic, error)
            failed.append(SpoolRecord(record.topic, record.key, record.value))
        self._spool(failed)

    def _failed(self, topic: str, error: object) -> None:
        self._publish_errors[topic] += 1
        if self.spool.depth == 0 and not self._to_spool:
            log.warning("Kafka did not take an event for %s (%s); spooling", topic, error)

    async def start(self, *, connect_within_seconds: float) -> None:
        """Wait a while for a broker (spooling meanwhile), then keep replaying in the background."""
        self._loop = asyncio.get_running_loop()
        producer = self._producer = self._producer_factory()
        try:
            await asyncio.to_thread(producer.reachable, connect_within_seconds)
        except KafkaException as error:
            producer.brokers_down = True
            log.warning(
                "Kafka at %s unreachable (%s); spooling", self.settings.bootstrap_servers, error
            )
        self._tasks = [asyncio.create_task(self._maintain(), name="publisher-replay")]

    async def stop(self) -> None:
        """Wait a while for what librdkafka holds, spool the rest, then close."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer, self._producer = self._producer, None
        if producer is not None:
            # Records still undelivered at the timeout are purged and reported failed.
            await producer.close(self.timeout_seconds)
        if self._spool_flush is not None:
            self._spool_flush.cancel()
        self._take_failures()
        self._flush_to_spool()

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
            producer = self._producer
            if producer is None:
                return
            if producer.brokers_down and not self.spool.depth:
                if await self._answers(producer):
                    continue
            elif self.spool.depth:
                if await self._replay_batch(producer):
                    delay = _RETRY_SECONDS
                    continue
            else:
                self._spooled.clear()
                await self._spooled.wait()
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_SECONDS)

    async def _answers(self, producer: RecordProducer) -> bool:
        try:
            await asyncio.to_thread(producer.reachable, self.timeout_seconds)
        except KafkaException:
            return False
        log.info("Kafka at %s answers again", self.settings.bootstrap_servers)
        return True

    async def _replay_batch(self, producer: RecordProducer) -> bool:
        batch = self.spool.peek(_REPLAY_BATCH)
        if not batch:
            return True
        records = [item.record for item in batch]
        refused: set[int] = set()
        try:
            await producer.send(records)
        except DeliveryError as error:
            refused = {id(record) for record, _ in error.failed}
        # Only the delivered prefix leaves the spool, so the spool stays in arrival order;
        # records after it that Kafka took are sent again (delivery is at least once).
        acknowledged = next(
            (place for place, record in enumerate(records) if id(record) in refused), len(records)
        )
        if acknowledged:
            self.spool.acknowledge(batch[acknowledged - 1].position)
            with self._published_lock:
                for record in records[:acknowledged]:
                    self._published[record.topic] = self._published.get(record.topic, 0) + 1
        if acknowledged < len(records):
            self._publish_errors[records[acknowledged].topic] += 1
            log.warning("replaying the spool: Kafka took %d of %d", acknowledged, len(records))
            return False
        producer.brokers_down = False
        if not self.spool.depth:
            log.info("spool replayed; publishing directly again")
        return True


def encode_record(topic: str, event: Event) -> SpoolRecord:
    """The Kafka record of ``event`` for ``topic``: its partition key and its bytes."""
    return SpoolRecord(topic, event.partition_key(), event.to_bytes())
