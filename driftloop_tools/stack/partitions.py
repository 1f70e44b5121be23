"""The partition bound of the stack's consumer replicas.

Replicas of one consumer service share one Kafka consumer group, and a group gives each
partition to one member: a replica beyond the partition count of its topics gets none and sits
idle. ``stack up`` refuses such a setting, before it starts anything (against the partitions
``schemas.topics`` declares) and again once the topics exist (against the broker's, which
may have been created or altered with other counts).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient

from driftloop.settings import KafkaSettings
from driftloop_tools.stack.settings import StackSettings
from schemas.topics import Topic, topic_specs

# What each replicated consumer service reads, as one group.
CONSUMED_TOPICS: Mapping[str, tuple[Topic, ...]] = {
    "feature-logger": (Topic.PREDICTIONS, Topic.LABELS),
    "batch-scorer": (Topic.SCORING_REQUESTS,),
}
SETTING_OF: Mapping[str, str] = {
    "feature-logger": "STACK_FEATURE_LOGGER_REPLICAS",
    "batch-scorer": "STACK_BATCH_SCORER_REPLICAS",
}


class TooManyReplicasError(ValueError):
    """More replicas of a consumer than partitions of a topic it reads."""


def consumer_replicas(settings: StackSettings) -> dict[str, int]:
    return {
        "feature-logger": settings.feature_logger_replicas,
        "batch-scorer": settings.batch_scorer_replicas,
    }


def check_replicas(replicas: Mapping[str, int], partitions: Mapping[Topic, int]) -> None:
    """Refuse a consumer with more replicas than the partitions of any topic it reads."""
    problems = []
    for service, count in replicas.items():
        for topic in CONSUMED_TOPICS[service]:
            available = partitions[topic]
            if count > available:
                problems.append(
                    f"{SETTING_OF[service]}={count}, but {service} reads topic {topic.value}, "
                    f"which has {available} partition(s): replicas beyond {available} would "
                    f"get no partition and sit idle; set it to at most {available}"
                )
    if problems:
        raise TooManyReplicasError("; ".join(problems))


def declared_partitions() -> dict[Topic, int]:
    """The partitions ``schemas.topics`` creates each topic with."""
    by_name = {spec.name: spec.partitions for spec in topic_specs()}
    return {topic: by_name[topic.value] for topic in Topic}


async def broker_partitions(settings: KafkaSettings) -> dict[Topic, int]:
    """The partitions each consumed topic has on the broker, under the settings' prefix."""
    consumed = {topic for topics in CONSUMED_TOPICS.values() for topic in topics}
    names = {settings.topic(topic): topic for topic in consumed}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(sorted(names))
    finally:
        await admin.close()
    counts = {
        names[item["topic"]]: len(item["partitions"])
        for item in described
        if item["topic"] in names and not item["error_code"]
    }
    missing = sorted(name for name, topic in names.items() if topic not in counts)
    if missing:
        raise LookupError(f"the broker does not describe topics {', '.join(missing)}")
    return counts
