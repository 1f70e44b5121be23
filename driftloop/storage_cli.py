"""``driftloop storage``: the data life cycle by hand (the services do the same on timers).

``driftloop storage maintain`` makes the next days' partitions of ``prediction_log`` and
``labels``, drops the days past the hot retention (``driftloop.hot_store``) and compacts the
Parquet files of closed hours (``driftloop.compaction``), with the feature-logger's settings
(``FEATURE_LOGGER_*``) and the longest ``retention.hot`` of the model declarations. Safe
beside a running feature-logger: one run of each at a time per schema, every step idempotent.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from driftloop.settings import SettingsError, load_settings

storage_app = typer.Typer(help="Storage life cycle: hot-store partitions, Parquet compaction.")
console = Console()


def _duration(text: str) -> timedelta:
    try:
        duration = TypeAdapter(timedelta).validate_python(text)
    except ValidationError as error:
        raise typer.BadParameter(f"{text!r} is not an ISO-8601 duration (e.g. P14D)") from error
    if duration < timedelta(days=1):
        raise typer.BadParameter(f"{text!r}: the hot retention is at least one day (P1D)")
    return duration


async def _maintain(
    retention: timedelta | None, ahead_days: int | None, *, compaction: bool
) -> bool:
    import asyncpg

    from consumers.feature_logger import FeatureLoggerSettings
    from driftloop.compaction import compact
    from driftloop.database import UNAVAILABLE_ERRORS, open_migrated_pool
    from driftloop.hot_store import describe, hot_retention, maintain
    from driftloop.objectstore import s3_client
    from schemas.features import declared_feature_specs, load_feature_spec

    settings = load_settings(FeatureLoggerSettings)
    chosen = retention or hot_retention(load_feature_spec(n) for n in declared_feature_specs())
    ahead = settings.partitions_ahead_days if ahead_days is None else ahead_days
    try:
        pool = await open_migrated_pool(
            settings.postgres, settings.db_schema, max_size=1, give_up_after_seconds=10
        )
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
        console.print(f"[red]cannot reach Postgres: {error}[/red]")
        return False
    try:
        async with pool.acquire() as connection:
            report = await maintain(connection, retention=chosen, ahead_days=ahead)
        console.print(f"schema {settings.db_schema}, hot retention {chosen}")
        for line in describe(report):
            console.print(line)
        if compaction:
            async with s3_client(settings.s3) as s3:
                compacted = await compact(
                    pool,
                    s3,
                    settings.s3.data_bucket,
                    settle=timedelta(seconds=settings.compaction_settle_seconds),
                )
            if compacted.skipped:
                console.print("compaction: another session is compacting; nothing done")
            else:
                console.print(
                    f"compaction: {compacted.files_replaced} files merged into "
                    f"{len(compacted.hours)} (one per model-hour), "
                    f"{compacted.garbage_deleted} replaced objects deleted"
                )
    finally:
        await pool.close()
    return True


@storage_app.command("maintain")
def maintain_command(
    retention: str | None = typer.Option(
        None,
        help="Hot retention as ISO-8601 (e.g. P14D); default: the longest `retention.hot` "
        "of the model declarations.",
    ),
    ahead_days: int | None = typer.Option(
        None, min=0, max=60, help="Days of partitions to make ahead (default: the setting)."
    ),
    compaction: bool = typer.Option(
        True, help="Also merge the Parquet files of each closed model-hour into one."
    ),
) -> None:
    """Make partitions ahead, drop the days past the hot retention, compact closed hours."""
    try:
        done = asyncio.run(
            _maintain(
                _duration(retention) if retention else None, ahead_days, compaction=compaction
            )
        )
    except SettingsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    if not done:
        raise typer.Exit(1)
