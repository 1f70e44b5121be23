"""The one Kafka producer of every driftloop process: librdkafka, through confluent-kafka.

Batching, compression (zstd), partitioning, retries and the produce protocol all run in
librdkafka's C threads, off the Python event loop; ``produce`` costs a call into C. Keyed
records are partitioned with ``murmur2_random``: murmur2 of the key, as the Java client's
default partitioner does. A label sent by a Java or Kafka Connect producer, keyed by request id,
therefore lands on the partition of its prediction. Records without a key go to a random
partition.

Deliveries are at least once: ``acks=all``, and librdkafka retries until
``delivery_timeout_seconds`` runs out; then the record's delivery fails. Every reader is
idempotent (the prediction log by request id, result readers by request id, the retrain ledger
by episode). librdkafka's idempotent mode is on. It keeps a partition's records in order
across retries, and after a timeout it bumps the producer epoch instead of refusing every later
record, which is how aiokafka failed before.

Delivery reports are polled on the event loop (every 10 ms), where their callbacks run. Two
ways to send:

- ``produce`` with an ``on_delivery`` callback, for the gateway's hot path;
- ``await send(records)``, for services that commit a consumer offset or a ledger row only after
  Kafka took their records. It raises ``DeliveryError`` naming the records Kafka refused.

Usage::

    producer = EventProducer(settings.kafka, "drift-monitor")
    await producer.start()                     # waits (with backoff) until a broker answers
    await producer.send([Record(topic, key, value)])
    await producer.close()                     # flushes what librdkafka still holds
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Final, NamedTuple, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from driftloop.connect import connect_with_retry
from driftloop.settings import KafkaSettings
from schemas.events import Event

log = logging.getLogger(__name__)

_POLL_SECONDS: Final = 0.01
_METADATA_TIMEOUT_SECONDS: Final = 5.0


class Keyed(Protocol):
    """A record ready to send: its topic, key and value bytes."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...


class Record(NamedTuple):
    """One keyed record to send."""

    topic: str
    key: bytes | None
    value: bytes


def event_record(topic: str, event: Event) -> Record:
    """The Kafka record of ``event`` for ``topic``: its partition key and its bytes."""
    return Record(topic, event.partition_key(), event.to_bytes())


Delivered = Callable[[Keyed, "KafkaError | None"], None]
"""What ``produce`` calls with each record's outcome: ``None`` when Kafka took it."""


def _report(on_delivery: Delivered, record: Keyed, error: KafkaError | None, _: Message) -> None:
    on_delivery(record, error)


class DeliveryError(Exception):
    """Kafka did not take some of the records given to ``send``."""

    def __init__(self, failed: list[tuple[Keyed, KafkaError]]) -> None:
        record, error = failed[0]
        super().__init__(
            f"{len(failed)} record(s) not delivered; the first, for {record.topic}: {error.str()}"
        )
        self.failed = failed


class RecordProducer(Protocol):
    """What a publisher needs of a producer (``EventProducer``; a double in unit tests)."""

    brokers_down: bool

    def produce(self, record: Keyed, on_delivery: Delivered) -> None: ...
    async def send(self, records: Iterable[Keyed]) -> None: ...
    def reachable(self, timeout_seconds: float = _METADATA_TIMEOUT_SECONDS) -> None: ...
    async def close(self, timeout_seconds: float = 30.0) -> None: ...


class EventProducer:
    """A librdkafka producer whose delivery reports are polled on the running event loop."""

    def __init__(
        self,
        settings: KafkaSettings,
        client_name: str,
        *,
        delivery_timeout_seconds: float = 30.0,
        linger_ms: float = 5.0,
        config: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = f"{settings.client_id_prefix}-{client_name}"
        options: dict[str, object] = {
            "bootstrap.servers": settings.bootstrap_servers,
            "client.id": self.client_id,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "compression.type": "zstd",
            "linger.ms": linger_ms,
            "message.timeout.ms": max(1, int(delivery_timeout_seconds * 1000)),
            "error_cb": self._client_error,
            # librdkafka's own log lines go through logging (served by poll), not stderr.
            "logger": log,
        }
        options.update(config or {})
        self._producer = Producer(options)
        self._polling: asyncio.Task[None] | None = None
        self.brokers_down = False
        """Whether librdkafka reported every broker unreachable since the last delivery."""

    def _ensure_polling(self) -> None:
        # Delivery reports are served on the event loop, every few milliseconds. A thread of
        # its own would take the GIL for each report and stall the loop (measured: the gateway
        # at 0.56x its throughput without publishing, p99 37 ms).
        if self._polling is None or self._polling.done():
            self._polling = asyncio.get_running_loop().create_task(
                self._poll(), name=f"{self.client_id}-poll"
            )

    async def _poll(self) -> None:
        poll = self._producer.poll
        while True:
            poll(0)
            await asyncio.sleep(_POLL_SECONDS)

    def _client_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        log.log(
            logging.ERROR if error.fatal() else logging.WARNING,
            "Kafka client %s: %s",
            self.client_id,
            error.str(),
        )

    async def start(self, *, give_up_after_seconds: float = 300.0) -> None:
        """Wait, retrying with backoff, until a broker answers a metadata request."""

        self._ensure_polling()

        async def answer() -> None:
            await asyncio.to_thread(self.reachable)

        await connect_with_retry(
            "Kafka",
            self.settings.bootstrap_servers,
            answer,
            give_up_after_seconds=give_up_after_seconds,
            retry_on=(KafkaException, OSError),
        )

    def reachable(self, timeout_seconds: float = _METADATA_TIMEOUT_SECONDS) -> None:
        """Raise ``KafkaException`` unless a broker answers within the timeout (blocks)."""
        self._producer.list_topics(timeout=timeout_seconds)
        self.brokers_down = False

    def produce(self, record: Keyed, on_delivery: Delivered) -> None:
        """Hand one record to librdkafka; ``on_delivery(record, error)`` runs on the event loop.

        Raises ``BufferError`` when librdkafka's queue is full and ``KafkaException`` for a
        record it refuses outright (e.g. larger than ``message.max.bytes``).
        """
        if self._polling is None:
            self._ensure_polling()
        self._producer.produce(
            record.topic,
            record.value,
            record.key,
            on_delivery=partial(_report, on_delivery, record),
        )

    async def send(self, records: Iterable[Keyed]) -> None:
        """Send ``records`` and wait until Kafka took each; raise ``DeliveryError`` otherwise."""
        loop = asyncio.get_running_loop()
        futures: list[tuple[Keyed, asyncio.Future[KafkaError | None]]] = []
        for record in records:
            future: asyncio.Future[KafkaError | None] = loop.create_future()
            settle = partial(_settle, loop, future)
            try:
                self.produce(record, settle)
            except BufferError:
                # librdkafka's queue is full: let it drain (its reports settle earlier futures).
                await self.flush(1.0)
                self.produce(record, settle)
            futures.append((record, future))
        failed = [(record, error) for record, future in futures if (error := await future)]
        if failed:
            raise DeliveryError(failed)

    async def send_event(self, topic: str, event: Event) -> None:
        """Send one event and wait until Kafka took it."""
        await self.send([event_record(topic, event)])

    async def flush(self, timeout_seconds: float) -> int:
        """Wait until librdkafka has delivered (or failed) what it holds; returns what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        left = self._producer.flush(0)
        while left and loop.time() < deadline:
            await asyncio.sleep(_POLL_SECONDS)
            left = self._producer.flush(0)
        return left

    def pending(self) -> int:
        """Records handed over and not yet reported delivered or failed."""
        return len(self._producer)

    async def close(self, timeout_seconds: float = 30.0) -> None:
        """Flush for up to the timeout, fail what is left, stop polling.

        Every delivery report has run when this returns: a record still undelivered is
        reported failed (``_PURGE_QUEUE``), so its sender can keep it (the gateway spools it).
        """
        left = await self.flush(timeout_seconds)
        if left:
            log.warning("%s closed with %d records undelivered", self.client_id, left)
            self._producer.purge()
        self._producer.poll(0)
        if self._polling is not None:
            self._polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._polling


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[KafkaError | None],
    _: Keyed,
    error: KafkaError | None,
) -> None:
    loop.call_soon_threadsafe(_resolve, future, error)


def _resolve(future: asyncio.Future[KafkaError | None], error: KafkaError | None) -> None:
    if not future.done():
        future.set_result(error)
