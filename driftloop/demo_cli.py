"""``driftloop demo``: replay the rest of 2011 through the gateway and show what happened.

``driftloop.replay`` is imported inside the command: it pulls in pandas, which every other
``driftloop`` command would otherwise wait for.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from driftloop.settings import PostgresSettings, SettingsError, load_settings
from driftloop.stack.settings import StackSettings
from schemas.features import load_feature_spec

if TYPE_CHECKING:
    from driftloop.replay import LogCheck, ReplayStats

demo_app = typer.Typer(help="The demo: replay the seed data through the running platform.")
console = Console()


class ReplayView:
    """The live progress table of a replay (re-rendered by rich on every refresh)."""

    def __init__(self, stats: ReplayStats, started: float) -> None:
        self.stats = stats
        self.started = started

    def __rich__(self) -> RenderableType:
        stats = self.stats
        elapsed = time.monotonic() - self.started
        table = Table(title="replay", show_header=False, min_width=60)
        table.add_column("what")
        table.add_column("value")
        table.add_row("simulated clock", f"{stats.clock:%Y-%m-%d %H:00}" if stats.clock else "-")
        table.add_row(
            "hours replayed",
            f"{stats.hours_sent} / {stats.total_hours} ({stats.hours_sent / elapsed:.0f}/s)"
            if elapsed > 0
            else "0",
        )
        table.add_row("predictions served", str(stats.predictions))
        table.add_row("labels sent", str(stats.labels_sent))
        versions = ", ".join(f"v{version}: {n}" for version, n in sorted(stats.versions.items()))
        table.add_row("model versions", versions or "-")
        last_day = stats.last_day_rmse()
        table.add_row("RMSE last day", f"{last_day:.1f}" if last_day is not None else "-")
        colour = "red" if stats.error_count else "green"
        table.add_row("errors", f"[{colour}]{stats.error_count}[/{colour}]")
        if stats.last_error:
            table.add_row("last error", f"[red]{stats.last_error}[/red]")
        return table


def _summary(stats: ReplayStats, seconds: float, check: LogCheck | None) -> Table:
    table = Table(title="replay summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("hours replayed", f"{stats.hours_sent} in {seconds:.1f} s")
    table.add_row("rate", f"{stats.hours_sent / seconds:.1f} hours/s" if seconds else "-")
    table.add_row("predictions served", str(stats.predictions))
    table.add_row("labels sent", str(stats.labels_sent))
    table.add_row(
        "model versions",
        ", ".join(f"v{version}: {n}" for version, n in sorted(stats.versions.items())) or "-",
    )
    rmse = stats.rmse()
    table.add_row("RMSE (whole replay)", f"{rmse:.1f}" if rmse is not None else "-")
    if check is not None:
        table.add_row(
            "in prediction_log",
            f"{check.predictions_logged} / {len(stats.row_ids)} "
            f"(waited {check.seconds_waited:.1f} s)",
        )
        table.add_row("labels joined", f"{check.labels_joined} / {len(stats.labelled_row_ids)}")
    errors = "; ".join(f"{kind}: {n}" for kind, n in stats.errors.most_common()) or "none"
    table.add_row("errors", f"[red]{errors}[/red]" if stats.error_count else errors)
    return table


async def _replay(
    gateway_url: str,
    api_key: str | None,
    postgres: PostgresSettings,
    *,
    declaration: str,
    first_day: int,
    last_day: int,
    hours_per_second: float,
    concurrency: int,
    ready_timeout: float,
    log_timeout: float,
) -> bool:
    from driftloop.replay import (  # deferred: see the module docstring
        Replayer,
        load_replay_hours,
        new_replay_id,
        wait_for_champion,
        wait_for_log,
    )

    spec = load_feature_spec(declaration)
    hours = load_replay_hours(spec, first_day=first_day, last_day=last_day)
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(
        base_url=gateway_url, headers=headers, timeout=30, limits=limits
    ) as client:
        version = await wait_for_champion(client, timeout_seconds=ready_timeout)
        replay_id = new_replay_id()
        console.print(
            f"[cyan]replay[/cyan] {replay_id}: {len(hours)} hours "
            f"({hours[0].moment:%b %d} to {hours[-1].moment:%b %d}) at {hours_per_second:g} "
            f"hours/s through {gateway_url}; the gateway serves version {version}"
        )
        replayer = Replayer(
            client,
            hours,
            replay_id=replay_id,
            hours_per_second=hours_per_second,
            concurrency=concurrency,
        )
        started = time.monotonic()
        with Live(ReplayView(replayer.stats, started), console=console, refresh_per_second=4):
            stats = await replayer.run()
        seconds = time.monotonic() - started
    # Outside a terminal the live table is printed once, without its final newline.
    console.line()
    console.print(
        f"[cyan]replay[/cyan] waiting for the feature logger (up to {log_timeout:.0f} s)..."
    )
    check = await wait_for_log(
        postgres, stats.row_ids, stats.labelled_row_ids, timeout_seconds=log_timeout
    )
    console.print(_summary(stats, seconds, check))
    complete = check.predictions_logged >= len(stats.row_ids) and check.labels_joined >= len(
        stats.labelled_row_ids
    )
    return complete and stats.error_count == 0


@demo_app.command()
def replay(
    gateway_url: str | None = typer.Option(
        None, help="The gateway's base URL (default: the native stack's, STACK_GATEWAY_PORT)."
    ),
    api_key: str | None = typer.Option(
        None, envvar="DRIFTLOOP_API_KEY", help="X-API-Key, when the gateway requires one."
    ),
    start: str = typer.Option("04-01", help="First replayed day of 2011, MM-DD."),
    until: str = typer.Option("12-31", help="Last replayed day of 2011, MM-DD (inclusive)."),
    hours_per_second: float = typer.Option(50.0, help="Simulated hours per real second."),
    concurrency: int = typer.Option(8, help="Requests in flight at most."),
    declaration: str = typer.Option("bikeshare", help="Feature declaration in schemas/models."),
    ready_timeout: float = typer.Option(90.0, help="Seconds to wait for the gateway's model."),
    log_timeout: float = typer.Option(120.0, help="Seconds to wait for the logged rows."),
) -> None:
    """Replay 2011 from START to UNTIL through /predict and /feedback at an accelerated clock."""
    from driftloop.replay import day_of_year  # deferred: see the module docstring

    try:
        postgres = load_settings(PostgresSettings)
        if gateway_url is None:
            gateway_url = f"http://127.0.0.1:{load_settings(StackSettings).gateway_port}"
        first_day, last_day = day_of_year(start), day_of_year(until)
    except (SettingsError, ValueError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    try:
        succeeded = asyncio.run(
            _replay(
                gateway_url,
                api_key,
                postgres,
                declaration=declaration,
                first_day=first_day,
                last_day=last_day,
                hours_per_second=hours_per_second,
                concurrency=concurrency,
                ready_timeout=ready_timeout,
                log_timeout=log_timeout,
            )
        )
    except TimeoutError as error:
        console.print(f"[red]replay stopped:[/red] {error}")
        raise typer.Exit(1) from None
    if not succeeded:
        console.print("[red]replay finished with errors or rows missing from the log[/red]")
        raise typer.Exit(1)
