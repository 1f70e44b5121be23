"""A double of ``EventProducer`` for unit tests: records what it is given, or fails like an
absent broker. The real producer, against the real broker, is covered by the integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException

from driftloop.events.producer import Delivered, DeliveryError, Keyed


class FakeRecordProducer:
    """Takes records while ``broker_down`` is false and its ``budget`` of records lasts."""

    def __init__(self, budget: int | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.budget = budget
        self.brokers_down = False
        self._broker_down = False
        self.closed = False

    @property
    def broker_down(self) -> bool:
        return self._broker_down

    @broker_down.setter
    def broker_down(self, down: bool) -> None:
        # librdkafka reports every broker down through its error callback, soon after.
        self._broker_down = down
        if down:
            self.brokers_down = True

    def _takes(self) -> bool:
        if self._broker_down or self.budget == 0:
            return False
        if self.budget is not None:
            self.budget -= 1
        return True

    def produce(self, record: Keyed, on_delivery: Delivered) -> None:
        error = None if self._takes() else KafkaError(KafkaError._MSG_TIMED_OUT)
        if error is None:
            self.sent.append((record.topic, record.key, record.value))
        # Reports arrive later, never inside produce.
        asyncio.get_running_loop().call_soon(on_delivery, record, error)

    async def send(self, records: Iterable[Keyed]) -> None:
        failed: list[tuple[Keyed, KafkaError]] = []
        for record in records:
            if self._takes():
                self.sent.append((record.topic, record.key, record.value))
            else:
                failed.append((record, KafkaError(KafkaError._MSG_TIMED_OUT)))
        await asyncio.sleep(0)
        if failed:
            raise DeliveryError(failed)

    def reachable(self, timeout_seconds: float = 5.0) -> None:
        if self._broker_down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
        self.brokers_down = False

    async def close(self, timeout_seconds: float = 30.0) -> None:
        self.closed = True

    @property
    def values(self) -> list[bytes]:
        return [value for _, _, value in self.sent]
