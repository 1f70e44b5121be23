"""Batched sending: one partitioner for every producer, whole record batches, nothing dropped."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from driftloop.events.kafka import KeyPartitioner, Message, send_batched

pytestmark = pytest.mark.unit


class SmallBatch:
    """Holds at most ``capacity`` records, like a full aiokafka batch refusing an append."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: int | None) -> object | None:
        if len(self.records) >= self.capacity or len(value) > 100:
            return None
        self.records.append(value)
        return object()


class Producer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: list[tuple[str, int, list[bytes]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> SmallBatch:
        return SmallBatch(self.capacity)

    async def send_batch(self, batch: SmallBatch, topic: str, *, partition: int) -> Any:
        self.batches.append((topic, partition, batch.records))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_same_key_same_partition_on_every_topic() -> None:
    partitioner = KeyPartitioner(Producer(10))
    keys = [f"request-{index}".encode() for index in range(50)]
    predictions = [await partitioner.partition("predictions", key) for key in keys]
    labels = [await partitioner.partition("labels", key) for key in keys]
    assert predictions == labels
    assert set(predictions) == {0, 1, 2}


async def test_every_message_is_sent_once_in_order_within_its_partition() -> None:
    producer = Producer(capacity=3)
    partitioner = KeyPartitioner(producer)
    messages = [Message("predictions", f"k{i % 4}".encode(), f"v{i}".encode()) for i in range(20)]
    futures = await send_batched(producer, partitioner, messages)
    await asyncio.gather(*futures)

    assert len(futures) == len(producer.batches)
    assert all(len(records) <= 3 for _, _, records in producer.batches)
    sent = [value for _, _, records in producer.batches for value in records]
    assert sorted(sent) == sorted(message.value for message in messages)
    for partition in {partition for _, partition, _ in producer.batches}:
        in_partition = [
            value for _, p, records in producer.batches if p == partition for value in records
        ]
        expected = [
            message.value
            for message in messages
            if await partitioner.partition("predictions", message.key) == partition
        ]
        assert in_partition == expected


async def test_a_message_larger_than_a_batch_is_refused_not_dropped() -> None:
    producer = Producer(capacity=3)
    partitioner = KeyPartitioner(producer)
    with pytest.raises(ValueError, match="exceeds the producer's batch size"):
        await send_batched(
            producer,
            partitioner,
            [Message("predictions", b"k", b"small"), Message("predictions", b"k", b"x" * 200)],
        )
