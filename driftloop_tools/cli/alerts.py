"""``driftloop alerts list``: the notifications the alert receiver stored, read back over HTTP."""

from __future__ import annotations

from typing import Annotated

import httpx
import typer
from pydantic import TypeAdapter
from rich.console import Console
from rich.table import Table

from driftloop.alerting.notifications import AlertStatus, StoredAlert
from driftloop.settings import SettingsError, load_settings

alerts_app = typer.Typer(help="Alert notifications delivered to the platform's receiver.")
console = Console()
_STORED_ALERTS = TypeAdapter(list[StoredAlert])


def fetch_alerts(
    url: str,
    *,
    alertname: str | None = None,
    status: AlertStatus | None = None,
    labels: list[str] | None = None,
    limit: int = 100,
) -> list[StoredAlert]:
    """``GET /alerts`` of the receiver at ``url``, newest first."""
    parameters: list[tuple[str, str | int | float | bool | None]] = [("limit", limit)]
    if alertname:
        parameters.append(("alertname", alertname))
    if status is not None:
        parameters.append(("status", status.value))
    parameters += [("label", label) for label in labels or []]
    response = httpx.get(f"{url.rstrip('/')}/alerts", params=parameters, timeout=10)
    response.raise_for_status()
    return _STORED_ALERTS.validate_json(response.content)


def _native_receiver_url() -> str:
    from driftloop_tools.stack.settings import StackSettings

    try:
        stack = load_settings(StackSettings)
    except SettingsError as error:
        console.print(f"[red]{error}[/red]\npass --url to read another receiver")
        raise typer.Exit(2) from None
    return f"http://127.0.0.1:{stack.alert_receiver_port}"


@alerts_app.command("list")
def list_alerts(
    url: Annotated[
        str | None,
        typer.Option(
            envvar="ALERT_RECEIVER_URL",
            help="The receiver (default: the native stack's, on STACK_ALERT_RECEIVER_PORT).",
        ),
    ] = None,
    alertname: Annotated[str | None, typer.Option(help="Only this alert.")] = None,
    status: Annotated[AlertStatus | None, typer.Option(help="firing or resolved.")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="name=value a label must have; repeatable.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The alerts received, newest first."""
    try:
        alerts = fetch_alerts(
            url or _native_receiver_url(),
            alertname=alertname,
            status=status,
            labels=label,
            limit=limit,
        )
    except httpx.HTTPError as error:
        console.print(f"[red]could not read the alert receiver:[/red] {error}")
        raise typer.Exit(1) from None
    table = Table(title=f"{len(alerts)} alerts received, newest first")
    for column in ("received", "status", "alert", "severity", "job", "summary"):
        table.add_column(column)
    for alert in alerts:
        colour = "red" if alert.status is AlertStatus.FIRING else "green"
        table.add_row(
            alert.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            f"[{colour}]{alert.status.value}[/{colour}]",
            alert.alertname,
            alert.severity,
            alert.labels.get("job", ""),
            alert.annotations.get("summary", ""),
        )
    console.print(table)
