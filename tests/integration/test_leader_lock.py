"""The leader lock on the real Postgres: one holder at a time, and a standby takes over when the
holder's session dies."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from driftloop.leader import LeaderLock, LeadershipLostError, run_as_leader
from driftloop.settings import PostgresSettings
from tests.integration.consumer_support import eventually

pytestmark = pytest.mark.integration

HOLDERS_SQL = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1
"""


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
