"""The publisher's spool: failed deliveries kept; a replay lets go of its delivered prefix only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings
from gateway.publishing import EventPublisher, PublisherState
from tests.unit.fake_kafka import FakeRecordProducer


def _records(count: int) -> list[SpoolRecord]:
    return [SpoolRecord("predictions", f"k{i}".encode(), f"v{i}".encode()) for i in range(count)]


async def _wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_partial_replay_keeps_the_undelivered_tail_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    spool.extend(_records(10))
    # Kafka takes v0-v3, then refuses everything, like a broker that went away.
    producer = FakeRecordProducer(budget=4)
    publisher = _publisher(spool, producer)
    await publisher.start(connect_within_seconds=1)
    try:
        await _wait_for(lambda: spool.depth == 6)
        assert publisher.state is PublisherState.SPOOLING
        assert [item.record.value for item in spool.peek(10)] == [
            f"v{i}".encode() for i in range(4, 10)
        ]
        producer.budget = None

        await _wait_for(lambda: spool.depth == 0, seconds=30)

        assert producer.values == [f"v{i}".encode() for i in range(10)]
        assert publisher.status().published == {"predictions": 10}
        assert publisher.status().state is PublisherState.DIRECT
    finally:
        await publisher.stop()
        spool.close()


async def test_new_events_queue_behind_the_spool_and_failed_deliveries_join_it(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    producer = FakeRecordProducer()
    publisher = _publisher(spool, producer)
    await publisher.start(connect_within_seconds=1)
    try:
        publisher.publish_encoded("predictions", b"k0", b"v0")
        await _wait_for(lambda: publisher.status().published == {"predictions": 1})
        producer.budget = 0  # deliveries fail from here: the failure is spooled
        publisher.publish_encoded("predictions", b"k1", b"v1")
        await _wait_for(lambda: spool.depth == 1)
        assert publisher.state is PublisherState.SPOOLING
        # Spooling: later events go behind it, not to Kafka.
        publisher.publish_encoded("predictions", b"k2", b"v2")
        await _wait_for(lambda: spool.depth == 2)
        producer.budget = None

        await _wait_for(lambda: spool.depth == 0, seconds=30)

        assert producer.values == [b"v0", b"v1", b"v2"]
        # The failed delivery, and any replay round tried while Kafka still refused.
        assert publisher.status().publish_errors["predictions"] >= 1
    finally:
        await publisher.stop()
        spool.close()


async def test_stop_spools_what_kafka_did_not_take(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    producer = FakeRecordProducer(budget=0)
    publisher = _publisher(spool, producer)
    await publisher.start(connect_within_seconds=1)
    for index in range(3):
        publisher.publish_encoded("predictions", f"k{index}".encode(), f"v{index}".encode())
    await publisher.stop()

    assert [item.record.value for item in spool.peek(10)] == [b"v0", b"v1", b"v2"]
    assert producer.closed
    spool.close()


def _publisher(spool: Spool, producer: FakeRecordProducer) -> EventPublisher:
    return EventPublisher(
        KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        spool,
        timeout_seconds=0.5,
        producer_factory=lambda: producer,
    )
