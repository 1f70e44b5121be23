"""Watching the closed loop from outside: what the demo prints and the loop benchmark times.

One ``LoopWatcher`` follows a model through every stage and reports each change once, as a
typed ``LoopEvent`` on a queue, stamped with the time it was seen:

- windows judged by the drift monitor (``drift_runs``, polled);
- ``DriftDetected`` on ``drift.events`` and ``ModelPromoted``/``ModelRejected`` on
  ``model.events`` (read without a consumer group, from the end at start);
- the retrain-trigger's decisions (``retrain_triggers``, polled) and the state of each DAG run
  it started (Airflow's REST API, polled: fresher than the ledger's own refresh);
- the version the gateway serves (``GET /models/current``, polled).

It only reads: watching changes nothing in the platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import httpx
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from driftloop.drift.store import DriftRun, DriftStore
from driftloop.events import kafka
from driftloop.orchestration.airflow import AirflowClient, AirflowError, DagRun
from driftloop.orchestration.ledger import LedgerEntry, RetrainLedger
from driftloop.settings import KafkaSettings
from driftloop.storage.database import UNAVAILABLE_ERRORS
from schemas.events import (
    DriftDetected,
    EventDecodeError,
    ModelDecision,
    ModelPromoted,
    decode_event,
    decode_model_event,
)
from schemas.topics import Topic

log = logging.getLogger(__name__)

POLL_SECONDS: Final = 1.0
# Any of these only means "not now": the next poll asks again.
_POLL_ERRORS: Final[tuple[type[BaseException], ...]] = (
    httpx.HTTPError,
    AirflowError,
    *UNAVAILABLE_ERRORS,
)


@dataclass(frozen=True, slots=True)
class WindowChecked:
    run: DriftRun


@dataclass(frozen=True, slots=True)
class DriftAnnounced:
    event: DriftDetected


@dataclass(frozen=True, slots=True)
class TriggerRecorded:
    entry: LedgerEntry


@dataclass(frozen=True, slots=True)
class DagRunChanged:
    episode_id: str
    run: DagRun


@dataclass(frozen=True, slots=True)
class ModelDecided:
    event: ModelDecision


@dataclass(frozen=True, slots=True)
class ServingChanged:
    version: int
    previous: int | None


LoopChange = (
    WindowChecked | DriftAnnounced | TriggerRecorded | DagRunChanged | ModelDecided | ServingChanged
)


@dataclass(frozen=True, slots=True)
class LoopEvent:
    """A change seen, and when (``time.monotonic()`` and wall clock)."""

    change: LoopChange
    seen_monotonic: float
    seen_at: datetime


@dataclass(slots=True)
class LoopWatcher:
    """Follows one model's loop; ``run`` puts every change on ``queue`` until cancelled."""

    model_name: str
    kafka_settings: KafkaSettings
    drift_store: DriftStore
    ledger: RetrainLedger
    airflow: AirflowClient
    gateway: httpx.AsyncClient
    queue: asyncio.Queue[LoopEvent] = field(default_factory=asyncio.Queue)
    _seen_runs: set[tuple[int, datetime]] = field(default_factory=set)
    _ledger: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    _dag_runs: dict[str, str] = field(default_factory=dict)
    _serving: int | None = None

    async def baseline(self) -> None:
        """Remember what exists now, so only later changes are reported."""
        for run in await self.drift_store.recent(self.model_name, limit=1000):
            self._seen_runs.add((run.model_version, run.window_end))
        for entry in await self.ledger.recent(1000):
            self._ledger[entry.episode_id] = (entry.state.value, entry.dag_run_state)
            if entry.dag_run_state:
                self._dag_runs[entry.episode_id] = entry.dag_run_state
        self._serving = await self._gateway_version()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Watch until cancelled; ``ready`` is set once the Kafka readers are positioned."""
        positioned = ready or asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_topics(positioned))
            group.create_task(self._poll(self._poll_windows))
            group.create_task(self._poll(self._poll_ledger))
            group.create_task(self._poll(self._poll_gateway))

    def _emit(self, change: LoopChange) -> None:
        self.queue.put_nowait(LoopEvent(change, time.monotonic(), datetime.now().astimezone()))

    async def _poll(self, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except _POLL_ERRORS as error:
                log.debug("watch poll failed: %s", error)
            await asyncio.sleep(POLL_SECONDS)

    async def _poll_windows(self) -> None:
        runs = await self.drift_store.recent(self.model_name, limit=50)
        for run in sorted(runs, key=lambda run: run.checked_at):
            key = (run.model_version, run.window_end)
            if key not in self._seen_runs:
                self._seen_runs.add(key)
                self._emit(WindowChecked(run))

    async def _poll_ledger(self) -> None:
        for entry in reversed(await self.ledger.recent(50)):
            if entry.model_name != self.model_name:
                continue
            known = self._ledger.get(entry.episode_id)
            if known is None or known[0] != entry.state.value:
                self._ledger[entry.episode_id] = (entry.state.value, entry.dag_run_state)
                self._emit(TriggerRecorded(entry))
            if entry.state.accepted and self._dag_runs.get(entry.episode_id) not in {
                "success",
                "failed",
            }:
                run = await self.airflow.get_dag_run(entry.dag_id, entry.dag_run_id)
                if self._dag_runs.get(entry.episode_id) != run.state:
                    self._dag_runs[entry.episode_id] = run.state
                    self._emit(DagRunChanged(entry.episode_id, run))

    async def _poll_gateway(self) -> None:
        version = await self._gateway_version()
        if version is not None and version != self._serving:
            previous, self._serving = self._serving, version
            self._emit(ServingChanged(version, previous))

    async def _gateway_version(self) -> int | None:
        response = await self.gateway.get("/models/current")
        if response.status_code != httpx.codes.OK:
            return None
        return int(response.json()["version"])

    async def _follow_topics(self, positioned: asyncio.Event) -> None:
        drift_topic = self.kafka_settings.topic(Topic.DRIFT_EVENTS)
        model_topic = self.kafka_settings.topic(Topic.MODEL_EVENTS)
        while True:
            consumer = kafka.consumer(
                self.kafka_settings,
                "loop-watch",
                drift_topic,
                model_topic,
                group_id=None,
                auto_offset_reset="latest",
            )
            try:
                await consumer.start()
                for topic in (drift_topic, model_topic):
                    for partition in consumer.partitions_for_topic(topic) or ():
                        await consumer.position(TopicPartition(topic, partition))
                positioned.set()
                async for message in consumer:
                    self._on_message(message.topic, message.value or b"", drift_topic)
            except (KafkaError, OSError) as error:
                log.warning("following the loop's topics failed (%r); retrying", error)
            finally:
                with contextlib.suppress(KafkaError, OSError):
                    await consumer.stop()
            await asyncio.sleep(POLL_SECONDS)

    def _on_message(self, topic: str, value: bytes, drift_topic: str) -> None:
        try:
            if topic == drift_topic:
                drift = decode_event(value, (DriftDetected,))
                if drift.model_name == self.model_name:
                    self._emit(DriftAnnounced(drift))
                return
            decision = decode_model_event(value)
        except EventDecodeError as error:
            log.warning("unreadable message on %s: %s", topic, error)
            return
        if decision.model_name == self.model_name:
            self._emit(ModelDecided(decision))


@dataclass(slots=True)
class LoopTimeline:
    """When each stage of the first closed loop happened (wall clock), from the events seen.

    The loop starts when the first drifted window of the champion that gets replaced has been
    logged (its ``window_end``: the last row's ``predicted_at``, logged within the feature
    logger's batch interval of it) and ends when the gateway serves the promoted version. An
    earlier isolated drifted window of the same version only makes the figure larger.
    """

    first_drifted_window_end: dict[int, datetime] = field(default_factory=dict)
    drift_published: dict[int, datetime] = field(default_factory=dict)
    trigger_accepted: datetime | None = None
    dag_running: datetime | None = None
    dag_finished: datetime | None = None
    promoted: ModelDecision | None = None
    promoted_at: datetime | None = None
    served_at: dict[int, datetime] = field(default_factory=dict)

    def observe(self, item: LoopEvent) -> None:
        change, seen = item.change, item.seen_at
        if isinstance(change, WindowChecked) and change.run.outcome == "drifted":
            self.first_drifted_window_end.setdefault(
                change.run.model_version, change.run.window_end
            )
        elif isinstance(change, DriftAnnounced):
            self.drift_published.setdefault(change.event.model_version, seen)
        elif isinstance(change, TriggerRecorded) and change.entry.state.accepted:
            self.trigger_accepted = self.trigger_accepted or seen
        elif isinstance(change, DagRunChanged):
            if change.run.state == "running" and self.dag_running is None:
                self.dag_running = seen
            if change.run.finished and self.dag_finished is None:
                self.dag_finished = seen
        elif (
            isinstance(change, ModelDecided)
            and isinstance(change.event, ModelPromoted)
            and self.promoted is None
        ):
            self.promoted, self.promoted_at = change.event, seen
        elif isinstance(change, ServingChanged):
            self.served_at.setdefault(change.version, seen)

    def stages(self) -> list[tuple[str, float]]:
        """Seconds from the first drifted window's end to each stage reached, in order."""
        if self.promoted is None or self.promoted.champion_version is None:
            return []
        start = self.first_drifted_window_end.get(self.promoted.champion_version)
        if start is None:
            return []
        moments = [
            ("drift event published", self.drift_published.get(self.promoted.champion_version)),
            ("retrain triggered in Airflow", self.trigger_accepted),
            ("DAG run running", self.dag_running),
            ("DAG run finished", self.dag_finished),
            ("ModelPromoted published", self.promoted_at),
            ("gateway serves the new champion", self.served_at.get(self.promoted.model_version)),
        ]
        return [(name, (moment - start).total_seconds()) for name, moment in moments if moment]

    def loop_seconds(self) -> float | None:
        """First drifted window logged -> the gateway serves the promoted version."""
        stages = dict(self.stages())
        return stages.get("gateway serves the new champion")
