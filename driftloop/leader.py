"""One working replica of a singleton service, elected with a Postgres session advisory lock.

The drift-monitor and the retrain-trigger keep state that two working copies would race on
(window verdicts, drift episodes, the trigger ledger). They may still run as N replicas: the
replica whose session holds the lock works; the others poll ``pg_try_advisory_lock`` and take
over within ``retry_seconds`` once the holder is gone, because Postgres releases a session
lock when the session ends (process killed, pod deleted, connection cut once the server sees
it). A holder whose session stops answering cannot know whether a standby took over, so it
stops its work at once (``LeadershipLostError``) and the process exits for its supervisor
(supervisord, Kubernetes) to start it again as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
from prometheus_client import Gauge

from driftloop.connect import connect_with_retry
from driftloop.settings import PostgresSettings
from driftloop.storage.database import UNAVAILABLE_ERRORS

T = TypeVar("T")

log = logging.getLogger(__name__)

LEADER = Gauge(
    "driftloop_leader",
    "1 while this process holds its service's leader lock and works, 0 while it waits.",
    ["lock"],
)


# Postgres ends a session when its client's process dies (the kernel closes the socket), but a
# host that vanishes sends nothing: with Linux's defaults the server would keep the session,
# and the lock, for over two hours. Keepalives on this one session end it after about 25 s
# (10 s idle + 3 probes 5 s apart), and unacknowledged writes after 30 s.
SESSION_KEEPALIVES: dict[str, str] = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


class LeadershipLostError(RuntimeError):
    """The session holding the lock ended or stopped answering; another replica may lead now."""


def lock_key(name: str) -> int:
    """The advisory lock key of a name: the first 8 bytes of its SHA-256 as a signed bigint."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class LeaderLock:
    """A named session advisory lock on its own connection (never a pooled one).

    A pooled connection would hand the session, and with it the lock, to other work; this
    connection does nothing but hold the lock and answer the liveness probe.
    """

    def __init__(
        self,
        settings: PostgresSettings,
        name: str,
        *,
        retry_seconds: float = 1.0,
        check_seconds: float = 5.0,
    ) -> None:
        self.settings = settings
        self.name = name
        self.key = lock_key(name)
        self.retry_seconds = retry_seconds
        self.check_seconds = check_seconds
        self._connection: asyncpg.Connection | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this lock believes it holds the lock (its session answered last time)."""
        return self._held

    async def _connect(self) -> asyncpg.Connection:
        settings = self.settings

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(
                host=settings.host,
                port=settings.port,
                user=settings.user,
                password=settings.password.get_secret_value(),
                database=settings.db,
                server_settings={
                    "application_name": f"driftloop-leader:{self.name}"[:63],
                    **SESSION_KEEPALIVES,
                },
            )

        return await connect_with_retry(
            "PostgreSQL",
            f"{settings.host}:{settings.port}/{settings.db}",
            connect,
            retry_on=UNAVAILABLE_ERRORS,
        )

    async def try_acquire(self) -> bool:
        """One attempt: True when this session holds the lock now (re-entrant on the session)."""
        if self._connection is None or self._connection.is_closed():
            self._connection = await self._connect()
        try:
            got = await self._connection.fetchval(
                "SELECT pg_try_advisory_lock($1)", self.key, timeout=self.check_seconds
            )
        except UNAVAILABLE_ERRORS:
            await self._close()
            return False
        self._held = bool(got)
        return self._held

    async def acquire(self) -> None:
        """Wait until this process holds the lock."""
        LEADER.labels(self.name).set(0)
        waiting = False
        while not await self.try_acquire():
            if not waiting:
                log.info("another replica holds %s; waiting to take over", self.name)
                waiting = True
            await asyncio.sleep(self.retry_seconds)
        log.info("holding %s (advisory lock %d): this replica works", self.name, self.key)
        LEADER.labels(self.name).set(1)

    async def lost(self) -> None:
        """Return when the lock is lost: its session ended or did not answer in time."""
        while True:
            await asyncio.sleep(self.check_seconds)
            connection = self._connection
            if connection is None or connection.is_closed():
                break
            try:
                await connection.fetchval("SELECT 1", timeout=self.check_seconds)
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
                log.error("lost %s: its session failed (%s)", self.name, error)  # noqa: TRY400
                break
        self._held = False
        LEADER.labels(self.name).set(0)

    async def release(self) -> None:
        """Give the lock up (a standby takes over at once) and close the session."""
        connection = self._connection
        if connection is not None and not connection.is_closed() and self._held:
            with contextlib.suppress(*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
                await connection.fetchval(
                    "SELECT pg_advisory_unlock($1)", self.key, timeout=self.check_seconds
                )
        self._held = False
        LEADER.labels(self.name).set(0)
        await self._close()

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
                await connection.close(timeout=self.check_seconds)

    async def __aenter__(self) -> Self:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.release()


async def run_as_leader(lock: LeaderLock, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Wait for the lock, then run ``work()`` while holding it; cancel it when the lock is lost.

    ``work`` is a factory so that nothing of the service starts (consumers, producers, signal
    handlers) before this replica leads.
    """
    async with lock:
        working = asyncio.ensure_future(work())
        watching = asyncio.ensure_future(lock.lost())
        try:
            done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            working.cancel()
            await asyncio.gather(working, watching, return_exceptions=True)
        if watching in done:
            raise LeadershipLostError(f"lost the leader lock {lock.name}; stopped working")
        return working.result()
