"""PostgreSQL connection pools for the platform database."""

from __future__ import annotations

import asyncpg

from driftloop.connect import connect_with_retry
from driftloop.settings import PostgresSettings


async def create_pool(
    settings: PostgresSettings,
    *,
    min_size: int = 1,
    max_size: int = 4,
    give_up_after_seconds: float = 300.0,
) -> asyncpg.Pool:
    """A pool on the platform database, retrying with backoff while Postgres is unreachable."""

    async def connect() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=settings.password.get_secret_value(),
            database=settings.db,
            min_size=min_size,
            max_size=max_size,
        )

    return await connect_with_retry(
        "PostgreSQL",
        f"{settings.host}:{settings.port}/{settings.db}",
        connect,
        give_up_after_seconds=give_up_after_seconds,
        retry_on=(OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError),
    )
