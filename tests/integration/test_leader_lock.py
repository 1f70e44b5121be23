"""The leader lock on the real Postgres: one holder at a time, and a standby takes over when the
holder's session dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
import pytest

from driftloop.events import kafka
from driftloop.leader import SESSION_KEEPALIVES, LeaderLock, LeadershipLostError, run_as_leader
from driftloop.settings import KafkaSettings, PostgresSettings
from schemas.topics import Topic
from tests.integration.consumer_support import ConsumerProcess, eventually, free_port, metric

pytestmark = pytest.mark.integration

HOLDERS_SQL = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1
"""


async def _equals(value: Awaitable[float | None], expected: float) -> bool:
    return await value == expected


def _lock(settings: PostgresSettings, name: str) -> LeaderLock:
    return LeaderLock(settings, name, retry_seconds=0.05, check_seconds=0.5)


async def test_two_holders_never_both_hold(
    postgres_settings: PostgresSettings, unique: str
) -> None:
    name = f"test-leader/{unique}"
    observer = await asyncpg.connect(postgres_settings.dsn())
    active = 0
    overlaps: list[int] = []
    turns = {"a": 0, "b": 0}

    async def contender(label: str, deadline: float) -> None:
        nonlocal active
        while time.monotonic() < deadline:
            lock = _lock(postgres_settings, name)

            async def work() -> None:
                nonlocal active
                active += 1
                overlaps.append(active)
                # Postgres itself: exactly one session of this lock name holds it.
                holders = await observer.fetchval(HOLDERS_SQL, f"driftloop-leader:{name}")
                overlaps.append(holders)
                await asyncio.sleep(0.05)
                active -= 1
                turns[label] += 1

            await run_as_leader(lock, work)
            await asyncio.sleep(0)  # let the other contender's poll see the free lock

    try:
        deadline = time.monotonic() + 6
        await asyncio.gather(contender("a", deadline), contender("b", deadline))
    finally:
        await observer.close()
    assert overlaps, "nobody ever held the lock"
    assert max(overlaps) == 1, overlaps
    assert turns["a"] > 0, turns
    assert turns["b"] > 0, turns


async def test_standby_takes_over_when_the_holder_session_dies(
    postgres_settings: PostgresSettings, unique: str
) -> None:
    name = f"test-leader/{unique}"
    holder, standby = _lock(postgres_settings, name), _lock(postgres_settings, name)
    holder_working = asyncio.Event()
    holder_stopped = asyncio.Event()

    async def holder_work() -> None:
        holder_working.set()
        try:
            await asyncio.Event().wait()
        finally:
            holder_stopped.set()

    holding = asyncio.create_task(run_as_leader(holder, holder_work))
    await asyncio.wait_for(holder_working.wait(), timeout=30)
    # The server would notice a vanished host through these keepalives on the lock's session.
    session = holder._connection
    assert session is not None
    for setting, value in SESSION_KEEPALIVES.items():
        assert await session.fetchval(f"SHOW {setting}") == value, setting
    assert not await standby.try_acquire()
    waiting = asyncio.create_task(standby.acquire())
    await asyncio.sleep(0.3)
    assert not waiting.done()

    # The holder's process dies as far as Postgres can tell: its session is terminated.
    admin = await asyncpg.connect(postgres_settings.dsn())
    try:
        terminated = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid IN (SELECT pid FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted)",
            f"driftloop-leader:{name}",
        )
        assert terminated == 1

        await asyncio.wait_for(waiting, timeout=30)
        assert standby.held
        # The old holder notices within its check interval and stops working.
        with pytest.raises(LeadershipLostError):
            await asyncio.wait_for(holding, timeout=30)
        assert holder_stopped.is_set()
        assert not holder.held

        async def one_holder() -> bool:
            count = await admin.fetchval(HOLDERS_SQL, f"driftloop-leader:{name}")
            return bool(count == 1)

        await eventually(one_holder, within=10, what="exactly the standby holding the lock")
    finally:
        await standby.release()
        await admin.close()


async def test_two_retrain_triggers_one_works_and_the_standby_takes_over(
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    unique: str,
    tmp_path: Path,
) -> None:
    """The wiring in consumers.service: two real service processes on one schema."""
    topics = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await kafka.create_topics(topics, [Topic.DRIFT_EVENTS])
    lock = f"consumers.retrain_trigger/{unique}"
    environment = {
        "KAFKA_TOPIC_PREFIX": topics.topic_prefix,
        "RETRAIN_TRIGGER_GROUP": f"{unique}-retrain-trigger",
        "RETRAIN_TRIGGER_DB_SCHEMA": unique,
        "RETRAIN_TRIGGER_MODELS": f"model-{unique}",
    }
    ports = [free_port(), free_port()]
    replicas = [
        ConsumerProcess(
            "consumers.retrain_trigger",
            {**environment, "RETRAIN_TRIGGER_METRICS_PORT": str(port)},
            tmp_path / f"replica-{index}.log",
        ).start()
        for index, port in enumerate(ports)
    ]
    try:

        async def leaders() -> list[float | None]:
            return [await metric(port, "driftloop_leader", lock=lock) for port in ports]

        async def one_leads() -> bool:
            assert all(replica.alive() for replica in replicas), [r.log() for r in replicas]
            return sorted(await leaders(), key=str) == [0.0, 1.0]

        await eventually(one_leads, within=120, what="one leader and one standby")
        # It stays that way: the standby keeps waiting while the leader lives.
        await asyncio.sleep(2)
        assert sorted(await leaders(), key=str) == [0.0, 1.0]
        holder = (await leaders()).index(1.0)
        standby = 1 - holder
        # Only the holder consumes: the standby has not even built its Kafka consumer.
        ready = "driftloop_consumer_ready"
        await eventually(
            lambda: _equals(metric(ports[holder], ready, consumer="retrain-trigger"), 1.0),
            within=60,
            what="the leader to consume",
        )
        assert await metric(ports[standby], ready, consumer="retrain-trigger") is None

        replicas[holder].kill()  # SIGKILL: Postgres ends its session, and the lock with it

        async def standby_leads() -> bool:
            return await metric(ports[standby], "driftloop_leader", lock=lock) == 1.0

        await eventually(standby_leads, within=60, what="the standby to take over")
        await eventually(
            lambda: _equals(metric(ports[standby], ready, consumer="retrain-trigger"), 1.0),
            within=60,
            what="the new leader to consume",
        )
        log = replicas[standby].log()
        assert log.index("waiting to take over") < log.index(f"holding {lock}")
        assert replicas[standby].terminate() == 0, replicas[standby].log()
    finally:
        for replica in replicas:
            replica.close()
        connection = await asyncpg.connect(postgres_settings.dsn())
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        finally:
            await connection.close()
