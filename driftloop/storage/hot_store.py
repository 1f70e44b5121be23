"""The bounded hot store: daily partitions of ``prediction_log`` and ``labels``, made and dropped.

Both tables are range-partitioned by prediction time (migration 0006), one partition per UTC
day named ``<table>_pYYYYMMDD``; a label sits in its prediction's day. Maintenance creates the
partitions of the next days ahead of traffic and drops a day of both tables once the whole
day is older than the hot retention. Partitions are shared by every model, so a day is dropped
when it has left the longest retention declared (``retention.hot`` in the model declarations):
a model's rows stay at least as long as it declares. Older history is read from Parquet.

The writer (``driftloop.storage.prediction_log``) also creates a missing day on demand, so a row
never waits for maintenance. Maintenance runs in the feature-logger on a timer and as
``driftloop storage maintain``; one run at a time per schema (a transaction advisory lock the
others skip), and every step is idempotent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final

import asyncpg

from driftloop.leader import lock_key
from schemas.features import DEFAULT_HOT_RETENTION, FeatureSpec

log = logging.getLogger(__name__)

PARTITIONED_TABLES: Final = ("prediction_log", "labels")
"""Parent tables partitioned by day of prediction time; a day of both is made and dropped as one."""
_PARTITION_NAME: Final = re.compile(r"^(prediction_log|labels)_p(\d{8})$")
ONE_DAY: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What one maintenance run did."""

    horizon: datetime
    """Rows predicted before this instant are outside the hot window."""
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    skipped: bool = False
    """Another session was maintaining the same schema; this run did nothing."""


def partition_day(moment: datetime) -> date:
    """The UTC day whose partition holds a row predicted at ``moment`` (timezone-aware)."""
    if moment.tzinfo is None:
        raise ValueError(f"prediction time {moment} has no timezone")
    return moment.astimezone(UTC).date()


def partition_name(table: str, day: date) -> str:
    """``<table>_pYYYYMMDD``, the name of ``table``'s partition of ``day``."""
    if table not in PARTITIONED_TABLES:
        raise ValueError(f"{table} is not a partitioned table of the hot store")
    return f"{table}_p{day:%Y%m%d}"


def day_of_partition(name: str) -> date | None:
    """The day of a partition named by ``partition_name``; None for any other name."""
    match = _PARTITION_NAME.match(name)
    if match is None:
        return None
    return datetime.strptime(match[2], "%Y%m%d").replace(tzinfo=UTC).date()


def day_start(day: date) -> datetime:
    """Midnight UTC opening ``day``: the inclusive lower bound of its partition."""
    return datetime.combine(day, time(), tzinfo=UTC)


def hot_retention(specs: Iterable[FeatureSpec]) -> timedelta:
    """How long the shared partitions are kept: the longest ``retention.hot`` declared.

    With no declaration, the default (``DEFAULT_HOT_RETENTION``).
    """
    return max((spec.retention.hot for spec in specs), default=DEFAULT_HOT_RETENTION)


def expired_days(days: Iterable[date], *, now: datetime, retention: timedelta) -> list[date]:
    """The days whose every instant is before ``now - retention``: their partitions may go.

    A day ending exactly at the horizon is expired; a day the horizon falls inside is kept, so
    nothing predicted at or after the horizon is ever dropped.
    """
    horizon = now - retention
    return sorted(day for day in set(days) if day_start(day) + ONE_DAY <= horizon)


def days_ahead(*, now: datetime, ahead: int) -> list[date]:
    """Today (UTC) and the ``ahead`` days after it: the partitions maintenance makes ahead."""
    today = partition_day(now)
    return [today + timedelta(days=offset) for offset in range(ahead + 1)]


def _create_partition_sql(table: str, day: date) -> str:
    # Names and bounds are made here from a date, never from input text.
    lower = day_start(day).isoformat()
    upper = (day_start(day) + ONE_DAY).isoformat()
    return (
        f'CREATE TABLE IF NOT EXISTS "{partition_name(table, day)}" PARTITION OF {table} '
        f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
    )


async def _lock(connection: asyncpg.Connection, *, wait: bool) -> bool:
    """The schema's hot-store lock, for the current transaction."""
    schema = await connection.fetchval("SELECT current_schema()")
    key = lock_key(f"driftloop.storage.hot_store.{schema}")
    if wait:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", key)
        return True
    taken: bool = await connection.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)
    return taken


async def existing_days(connection: asyncpg.Connection) -> dict[str, set[date]]:
    """The days each partitioned table has a partition for (in the session's schema)."""
    rows = await connection.fetch(
        """
        SELECT parent.relname AS parent, child.relname AS child
        FROM pg_inherits i
        JOIN pg_class parent ON parent.oid = i.inhparent
        JOIN pg_class child ON child.oid = i.inhrelid
        WHERE parent.relnamespace = current_schema()::regnamespace
          AND parent.relname = ANY($1::text[])
        """,
        list(PARTITIONED_TABLES),
    )
    days: dict[str, set[date]] = {table: set() for table in PARTITIONED_TABLES}
    for row in rows:
        day = day_of_partition(row["child"])
        if day is not None:
            days[row["parent"]].add(day)
    return days


async def ensure_partitions(connection: asyncpg.Connection, days: Iterable[date]) -> list[str]:
    """Create the missing partitions of ``days`` in both tables, in one transaction.

    Safe beside concurrent writers and maintenance: the creation holds the schema's hot-store
    lock, and a day already there is left as it is. Returns the partitions created.
    """
    wanted = sorted(set(days))
    created: list[str] = []
    if not wanted:
        return created
    async with connection.transaction():
        await _lock(connection, wait=True)
        present = await existing_days(connection)
        for table in PARTITIONED_TABLES:
            for day in wanted:
                if day not in present[table]:
                    await connection.execute(_create_partition_sql(table, day))
                    created.append(partition_name(table, day))
    if created:
        log.info("created partitions %s", ", ".join(created))
    return created


DropGuard = Callable[[asyncpg.Connection, date], Awaitable[bool]]
"""Whether an expired day may go now (e.g. its labels are in Parquet); asked with the day's
partitions locked, so nothing can be written to them between the answer and the drop."""


async def maintain(
    connection: asyncpg.Connection,
    *,
    retention: timedelta,
    ahead_days: int = 3,
    now: datetime | None = None,
    may_drop: DropGuard | None = None,
) -> MaintenanceReport:
    """Create today's and the next ``ahead_days`` partitions; drop the days past the horizon.

    With ``may_drop``, an expired day it refuses is kept until a later run. Skips
    (``skipped``) when another session holds the schema's lock: that one is doing it.
    """
    if retention <= timedelta(0):
        raise ValueError(f"the hot retention must be positive, got {retention}")
    if ahead_days < 0:
        raise ValueError(f"ahead_days must be 0 or more, got {ahead_days}")
    moment = now if now is not None else datetime.now(UTC)
    horizon = moment - retention
    async with connection.transaction():
        if not await _lock(connection, wait=False):
            return MaintenanceReport(horizon, skipped=True)
        present = await existing_days(connection)
        created: list[str] = []
        for table in PARTITIONED_TABLES:
            for day in days_ahead(now=moment, ahead=ahead_days):
                if day not in present[table]:
                    await connection.execute(_create_partition_sql(table, day))
                    created.append(partition_name(table, day))
        dropped: list[str] = []
        all_days = present["prediction_log"] | present["labels"]
        for day in expired_days(all_days, now=moment, retention=retention):
            # In the writer's order (predictions, then labels), so the two cannot deadlock.
            tables = [table for table in PARTITIONED_TABLES if day in present[table]]
            for table in tables:
                await connection.execute(
                    f'LOCK TABLE "{partition_name(table, day)}" IN ACCESS EXCLUSIVE MODE'
                )
            if may_drop is not None and not await may_drop(connection, day):
                log.warning("keeping expired day %s: not ready to drop yet", day)
                continue
            for table in tables:
                await connection.execute(f'DROP TABLE "{partition_name(table, day)}"')
                dropped.append(partition_name(table, day))
    report = MaintenanceReport(horizon, tuple(created), tuple(dropped))
    if created or dropped:
        log.info(
            "hot store: created %s; dropped %s (horizon %s)",
            ", ".join(created) or "nothing",
            ", ".join(dropped) or "nothing",
            horizon.isoformat(),
        )
    return report


def describe(report: MaintenanceReport) -> Sequence[str]:
    """Lines for a person: what maintenance did."""
    if report.skipped:
        return ["another session is maintaining this schema; nothing done"]
    return [
        f"horizon: {report.horizon.isoformat()} (older days are dropped)",
        f"created: {', '.join(report.created) or 'nothing'}",
        f"dropped: {', '.join(report.dropped) or 'nothing'}",
    ]
