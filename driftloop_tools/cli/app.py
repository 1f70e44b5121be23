"""The ``driftloop`` command line."""

from __future__ import annotations

import typer
from rich.table import Table

from driftloop_tools.cli.alerts import alerts_app
from driftloop_tools.cli.batch import batch_app
from driftloop_tools.cli.common import console, settings_or_exit
from driftloop_tools.cli.dlq import dlq_app
from driftloop_tools.cli.drift import drift_app
from driftloop_tools.cli.model import model_app
from driftloop_tools.cli.models import models_app
from driftloop_tools.cli.storage import sql_command, storage_app
from driftloop_tools.demo.cli import demo_app
from driftloop_tools.stack import lifecycle
from driftloop_tools.stack.settings import StackSettings

app = typer.Typer(help="driftloop: serve, log, watch for drift, retrain and promote models.")
stack_app = typer.Typer(help="The native stack (no Docker): up, down, status.")
app.add_typer(stack_app, name="stack")
app.add_typer(dlq_app, name="dlq")
app.add_typer(batch_app, name="batch")
app.add_typer(model_app, name="model")
app.add_typer(models_app, name="models")
app.add_typer(demo_app, name="demo")
app.add_typer(drift_app, name="drift")
app.add_typer(alerts_app, name="alerts")
app.add_typer(storage_app, name="storage")
app.command("sql")(sql_command)


def _stack_settings() -> StackSettings:
    return settings_or_exit(StackSettings)


def _say(message: str) -> None:
    console.print(f"[cyan]stack[/cyan] {message}")


def _print_status(status: lifecycle.StackStatus) -> None:
    if not status.supervisor_running:
        console.print("stack is not running (start it with `make up`)")
        return
    programs = Table(title="processes", show_lines=False)
    for column in ("program", "state", "pid", "uptime", "memory"):
        programs.add_column(column, justify="right" if column == "memory" else "left")
    for program in status.programs:
        colour = "green" if program.state == "RUNNING" else "red"
        programs.add_row(
            program.name,
            f"[{colour}]{program.state}[/{colour}]",
            str(program.pid or "-"),
            f"{program.uptime_seconds}s",
            f"{program.resident_bytes / 2**20:,.0f} MiB",
        )
    total = sum(program.resident_bytes for program in status.programs)
    programs.add_section()
    programs.add_row("total", "", "", "", f"{total / 2**20:,.0f} MiB")
    services = Table(title="services")
    for column in ("service", "address", "ready", "detail"):
        services.add_column(column)
    for item in status.readiness:
        mark = "[green]yes[/green]" if item.ready else "[red]no[/red]"
        services.add_row(item.service, item.address, mark, item.detail)
    console.print(programs)
    console.print(services)


@stack_app.command()
def up() -> None:
    """Install what is missing and start the stack; a no-op when it is already healthy."""
    settings = _stack_settings()
    try:
        status = lifecycle.up(settings, _say)
    except Exception as error:  # noqa: BLE001 - shown to the operator with the log to read
        console.print(f"[red]stack up failed:[/red] {error}")
        raise typer.Exit(1) from None
    _print_status(status)
    if not status.healthy:
        raise typer.Exit(1)


@stack_app.command()
def down() -> None:
    """Stop everything the stack started, and nothing else."""
    lifecycle.down(_stack_settings(), _say)


@stack_app.command()
def restart(
    program: str = typer.Argument(help="A program name as `stack status` lists it."),
) -> None:
    """Restart one program of the running stack."""
    try:
        lifecycle.restart(_stack_settings(), program, _say)
    except Exception as error:  # noqa: BLE001 - shown to the operator with the log to read
        console.print(f"[red]restart failed:[/red] {error}")
        raise typer.Exit(1) from None


@stack_app.command()
def status() -> None:
    """Show every process and whether each service answers."""
    current = lifecycle.status(_stack_settings())
    _print_status(current)
    if not current.healthy:
        raise typer.Exit(1)
