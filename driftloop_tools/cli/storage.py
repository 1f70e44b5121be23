"""``driftloop storage``: the data life cycle by hand (the services do the same on timers).

``driftloop storage maintain`` runs one storage maintenance (``driftloop.storage.maintenance``):
label files to Parquet, the next days' partitions of ``prediction_log`` and ``labels`` made and
the days past the hot retention dropped, the Parquet files of closed hours compacted, with the
feature-logger's settings (``FEATURE_LOGGER_*``) and the longest ``retention.hot`` of the model
declarations. Safe beside a running feature-logger: one run of each at a time per schema, and
every step is idempotent.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

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


async def _maintain(retention: timedelta | None, ahead_days: int | None, *, parquet: bool) -> bool:
    import dataclasses

    from consumers.feature_logger import FeatureLoggerSettings
    from driftloop.connect import DependencyUnavailableError
    from driftloop.storage.database import open_migrated_pool
    from driftloop.storage.hot_store import describe
    from driftloop.storage.maintenance import ParquetTarget, maintain_storage
    from driftloop.storage.migrations import MigrationError
    from driftloop.storage.objectstore import s3_client

    settings = load_settings(FeatureLoggerSettings)
    policy = settings.storage_policy()
    if retention is not None:
        policy = dataclasses.replace(policy, hot_retention=retention)
    if ahead_days is not None:
        policy = dataclasses.replace(policy, ahead_days=ahead_days)
    try:
        pool = await open_migrated_pool(
            settings.postgres, settings.db_schema, max_size=2, give_up_after_seconds=10
        )
    except (DependencyUnavailableError, MigrationError) as error:
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        console.print(f"[red]cannot open the platform database: {error}{cause}[/red]")
        return False
    try:
        async with s3_client(settings.s3) as s3:
            target = ParquetTarget(s3, settings.s3.data_bucket) if parquet else None
            report = await maintain_storage(pool, target, policy)
    finally:
        await pool.close()
    console.print(f"schema {settings.db_schema}, hot retention {policy.hot_retention}")
    for line in describe(report.partitions):
        console.print(line)
    if parquet:
        labels = sum(file.rows for file in report.label_files)
        console.print(f"label files written: {len(report.label_files)} ({labels} labels)")
    compacted = report.compaction
    if compacted is not None and compacted.skipped:
        console.print("compaction: another session is compacting; nothing done")
    elif compacted is not None:
        console.print(
            f"compaction: {compacted.files_replaced} files merged into {len(compacted.hours)} "
            f"(one per model-hour), {compacted.garbage_deleted} replaced objects deleted"
        )
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
    parquet: bool = typer.Option(
        True,
        help="Also write the label files and merge each closed model-hour's files into one "
        "(--no-parquet: partitions only; expired labels then leave without a Parquet copy).",
    ),
) -> None:
    """Labels to Parquet, partitions made ahead and expired ones dropped, closed hours compacted."""
    try:
        done = asyncio.run(
            _maintain(_duration(retention) if retention else None, ahead_days, parquet=parquet)
        )
    except SettingsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    if not done:
        raise typer.Exit(1)


async def _sql(statement: str, limit: int) -> bool:
    import duckdb
    import pyarrow as pa

    from consumers.feature_logger import FeatureLoggerSettings
    from driftloop.connect import DependencyUnavailableError
    from driftloop.storage import lake
    from driftloop.storage.database import create_pool

    settings = load_settings(FeatureLoggerSettings)
    try:
        pool = await create_pool(
            settings.postgres, schema=settings.db_schema, max_size=1, give_up_after_seconds=10
        )
    except DependencyUnavailableError as error:
        console.print(f"[red]cannot open the platform database: {error}[/red]")
        return False
    try:
        files = await lake.all_files(pool)
    finally:
        await pool.close()
    filesystem = lake.s3_filesystem(settings.s3)

    def run() -> pa.Table:
        connection = lake.open_lake(filesystem, settings.s3.data_bucket, files)
        try:
            return lake.query(connection, statement)
        finally:
            connection.close()

    try:
        result = await asyncio.to_thread(run)
    except duckdb.Error as error:
        console.print(f"[red]{error}[/red]")
        return False
    table = Table(title=f"{result.num_rows} rows")
    for name in result.column_names:
        table.add_column(name)
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*(str(value) for value in row.values()))
    console.print(table)
    if result.num_rows > limit:
        console.print(f"({result.num_rows - limit} more rows not shown; raise --limit)")
    return True


def sql_command(
    statement: str = typer.Argument(
        help="One SQL statement over the views `features` (every prediction) and `labels`."
    ),
    limit: int = typer.Option(50, min=1, help="Rows printed."),
) -> None:
    """Ad-hoc SQL (DuckDB) over the Parquet layout: views `features` and `labels`."""
    try:
        done = asyncio.run(_sql(statement, limit))
    except SettingsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    if not done:
        raise typer.Exit(1)
