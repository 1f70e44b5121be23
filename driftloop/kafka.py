"""Kafka clients configured the way every driftloop service needs them."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from driftloop.connect import connect_with_retry
from driftloop.settings import KafkaSettings


def producer(settings: KafkaSettings, client_name: str, **overrides: object) -> AIOKafkaProducer:
    """An idempotent producer: acks from all replicas, no duplicates on its own retries."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": f"{settings.client_id_prefix}-{client_name}",
        "acks": "all",
        "enable_idempotence": True,
        # Small lingering batches many events per request at high rates for ~no latency cost.
        "linger_ms": 5,
        "compression_type": "lz4",
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(
    settings: KafkaSettings, group: str, *topics: str, **overrides: object
) -> AIOKafkaConsumer:
    """A group consumer that never auto-commits: services commit after their writes land."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": f"{settings.client_id_prefix}-{group}",
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def start_with_retry(
    client: AIOKafkaProducer | AIOKafkaConsumer,
    settings: KafkaSettings,
    *,
    give_up_after_seconds: float = 300.0,
) -> None:
    """Start a client, retrying with backoff while the brokers are unreachable."""

    async def start() -> None:
        await client.start()

    await connect_with_retry(
        "Kafka",
        settings.bootstrap_servers,
        start,
        give_up_after_seconds=give_up_after_seconds,
        retry_on=(KafkaConnectionError, OSError),
    )
