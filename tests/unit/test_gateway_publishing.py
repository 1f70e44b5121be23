"""The publisher's replay: only the acknowledged prefix leaves the spool, order is kept."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaTimeoutError

from driftloop.settings import KafkaSettings
from driftloop.spool import Spool, SpoolRecord
from gateway.publishing import EventPublisher, PublisherState


class FlakyProducer:
    """Acknowledges the first ``budget`` records sent one by one, then times out."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.acknowledged: list[bytes] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    async def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.budget > 0:
            self.budget -= 1
            self.acknowledged.append(value)
            future.set_result(None)
        else:
            future.set_exception(KafkaTimeoutError())
        return future


def _records(count: int) -> list[SpoolRecord]:
    return [SpoolRecord("predictions", f"k{i}".encode(), f"v{i}".encode()) for i in range(count)]


async def _wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_partial_replay_keeps_the_unacknowledged_tail_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    spool.extend(_records(10))
    producer = FlakyProducer(budget=4)
    publisher = EventPublisher(
        KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        spool,
        timeout_seconds=0.5,
        producer_factory=lambda: producer,
    )
    await publisher.start(connect_within_seconds=1)
    try:
        await _wait_for(lambda: spool.depth == 6)
        assert publisher.state is PublisherState.SPOOLING
        assert [item.record.value for item in spool.peek(10)] == [
            f"v{i}".encode() for i in range(4, 10)
        ]
        producer.budget = 100

        await _wait_for(lambda: spool.depth == 0, seconds=30)

        assert producer.acknowledged == [f"v{i}".encode() for i in range(10)]
    finally:
        await publisher.stop()
        spool.close()
