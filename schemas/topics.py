"""Kafka topics of the platform: logical names, partitions, and their dead-letter twins."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Topic(StrEnum):
    """Logical topic names; ``KafkaSettings.topic`` adds the deployment's prefix."""

    PREDICTIONS = "predictions"
    LABELS = "labels"
    SCORING_REQUESTS = "scoring.requests"
    SCORING_RESULTS = "scoring.results"
    DRIFT_EVENTS = "drift.events"
    MODEL_EVENTS = "model.events"

    @property
    def dead_letter(self) -> str:
        """The topic that receives this topic's undecodable or invalid messages."""
        return f"{self.value}.dlq"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int


_DAY_MS = 24 * 3600 * 1000
# Data topics carry per-request traffic: 3 partitions let three consumers of a group share them.
# Control topics (drift, model) are low-volume and ordered, so one partition keeps their order.
_PARTITIONS: dict[Topic, int] = {
    Topic.PREDICTIONS: 3,
    Topic.LABELS: 3,
    Topic.SCORING_REQUESTS: 3,
    Topic.SCORING_RESULTS: 3,
    Topic.DRIFT_EVENTS: 1,
    Topic.MODEL_EVENTS: 1,
}


def topic_specs(prefix: str = "") -> list[TopicSpec]:
    """Every topic the platform needs, dead-letter topics included (kept 14 days for replay)."""
    specs: list[TopicSpec] = []
    for topic, partitions in _PARTITIONS.items():
        specs.append(TopicSpec(f"{prefix}{topic.value}", partitions, 7 * _DAY_MS))
        specs.append(TopicSpec(f"{prefix}{topic.dead_letter}", 1, 14 * _DAY_MS))
    return specs
