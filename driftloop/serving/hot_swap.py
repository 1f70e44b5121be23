"""Following ``model.events``: a ``ModelPromoted`` or ``ModelRolledBack`` (the alias moved, forward
or back) triggers a reload of the model it names.

Shared by every process that serves the champion (the gateway, the batch-scorer), so a
promotion reaches all of them within a second; alias polling stays as the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from driftloop.events import kafka
from driftloop.settings import KafkaSettings
from schemas.events import (
    EventDecodeError,
    ModelDecision,
    ModelPromoted,
    ModelRolledBack,
    decode_model_event,
)
from schemas.topics import Topic

log = logging.getLogger(__name__)

RELOAD_REASON = "model_event"


class FollowerState(StrEnum):
    """Whether promotions reach this process now."""

    OFF = "off"
    CONNECTING = "connecting"
    FOLLOWING = "following"


class ModelEventFollower:
    """Reads every model event (no consumer group: every serving instance needs each one)."""

    def __init__(
        self,
        settings: KafkaSettings,
        on_promoted: Callable[[str], Awaitable[None]],
        *,
        reader: str,
        retry_seconds: float = 2.0,
        on_decision: Callable[[ModelDecision], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_promoted = on_promoted
        self.reader = reader
        self.retry_seconds = retry_seconds
        self.on_decision = on_decision
        self.topic = settings.topic(Topic.MODEL_EVENTS)
        self.state = FollowerState.OFF

    async def run(self) -> None:
        """Follow the topic until cancelled, reconnecting after any Kafka failure."""
        while True:
            self.state = FollowerState.CONNECTING
            # Without a group nothing is committed: a process that was away catches up by
            # resolving the alias at start and by polling, not by replaying old events.
            consumer = kafka.consumer(
                self.settings,
                f"{self.reader}-model-events",
                self.topic,
                group_id=None,
                auto_offset_reset="latest",
            )
            try:
                await consumer.start()
                # Resolve the end offsets now, so a promotion published from here on is seen.
                for partition in consumer.partitions_for_topic(self.topic) or ():
                    await consumer.position(TopicPartition(self.topic, partition))
                self.state = FollowerState.FOLLOWING
                async for message in consumer:
                    await self._handle(message.value)
            except (KafkaError, OSError) as error:
                log.warning("following %s failed (%r); retrying", self.topic, error)
            finally:
                self.state = FollowerState.CONNECTING
                with contextlib.suppress(KafkaError, OSError):
                    await consumer.stop()
            await asyncio.sleep(self.retry_seconds)

    async def _handle(self, value: bytes | None) -> None:
        try:
            event = decode_model_event(value or b"")
        except EventDecodeError as error:
            # Dead-lettering is the job of the topic's group consumers; a reader without a
            # group would write one copy per serving instance.
            log.warning("ignoring an unreadable message on %s: %s", self.topic, error)
            return
        if self.on_decision is not None:
            # Every model's decisions, promotions and rejections: what the metrics count.
            self.on_decision(event)
        if isinstance(event, ModelPromoted | ModelRolledBack):
            # A rollback moves the alias like a promotion does: the same reload swaps back.
            log.info(
                "model %s version %d %s",
                event.model_name,
                event.model_version,
                "promoted" if isinstance(event, ModelPromoted) else "restored by a rollback",
            )
            await self.on_promoted(event.model_name)
