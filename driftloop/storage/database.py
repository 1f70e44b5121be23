"""PostgreSQL connection pools for the platform database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from driftloop.connect import connect_with_retry
from driftloop.settings import PostgresSettings
from driftloop.storage.migrations import SCHEMA_NAME, apply_migrations

# What "Postgres is unreachable or restarting" looks like to asyncpg: retried, never fatal.
UNAVAILABLE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


def _connect_options(settings: PostgresSettings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "password": settings.password.get_secret_value(),
        "database": settings.db,
    }


def _address(settings: PostgresSettings) -> str:
    return f"{settings.host}:{settings.port}/{settings.db}"


async def create_pool(
    settings: PostgresSettings,
    *,
    min_size: int = 1,
    max_size: int = 4,
    schema: str | None = None,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    give_up_after_seconds: float = 300.0,
) -> asyncpg.Pool:
    """A pool on the platform database, retrying with backoff while Postgres is unreachable.

    With ``schema``, every session of the pool works in it (``search_path``).
    """

    async def connect() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            **_connect_options(settings),
            min_size=min_size,
            max_size=max_size,
            server_settings={"search_path": schema} if schema else None,
            init=init,
        )

    return await connect_with_retry(
        "PostgreSQL",
        _address(settings),
        connect,
        give_up_after_seconds=give_up_after_seconds,
        retry_on=UNAVAILABLE_ERRORS,
    )


async def open_migrated_pool(
    settings: PostgresSettings,
    schema: str,
    *,
    max_size: int = 2,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    give_up_after_seconds: float = 300.0,
) -> asyncpg.Pool:
    """Apply the platform's migrations to ``schema``, then open a pool whose sessions work in it."""
    if not SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")

    async def migrate() -> None:
        connection = await asyncpg.connect(**_connect_options(settings))
        try:
            await apply_migrations(connection, schema)
        finally:
            await connection.close()

    await connect_with_retry(
        "PostgreSQL",
        _address(settings),
        migrate,
        give_up_after_seconds=give_up_after_seconds,
        retry_on=UNAVAILABLE_ERRORS,
    )
    return await create_pool(
        settings,
        max_size=max_size,
        schema=schema,
        init=init,
        give_up_after_seconds=give_up_after_seconds,
    )
