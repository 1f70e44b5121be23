"""Kafka consumers configured the way every driftloop service needs them, and the topics.

Producing goes through ``driftloop.events.producer.EventProducer`` (librdkafka).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from driftloop.connect import connect_with_retry
from driftloop.settings import KafkaSettings
from schemas.topics import Topic, topic_specs


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
    client: AIOKafkaConsumer,
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


async def create_topics(
    settings: KafkaSettings, topics: Iterable[Topic] | None = None
) -> list[str]:
    """Create the platform's topics under the settings' prefix that do not exist yet.

    ``topics`` limits it to those and their dead-letter twins (a test or a benchmark on its own
    prefix); None creates every one (``stack up``). Partitions and retention come from
    ``schemas.topics``. Returns the names created.
    """
    specs = topic_specs(settings.topic_prefix)
    if topics is not None:
        chosen = list(topics)
        wanted = {settings.topic(topic) for topic in chosen}
        wanted |= {settings.topic(topic.dead_letter) for topic in chosen}
        specs = [spec for spec in specs if spec.name in wanted]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            # Another process may race us; the topics then exist, which is all we want.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            name=spec.name,
                            num_partitions=spec.partitions,
                            replication_factor=1,
                            topic_configs={"retention.ms": str(spec.retention_ms)},
                        )
                        for spec in missing
                    ]
                )
        return [spec.name for spec in missing]
    finally:
        await admin.close()
