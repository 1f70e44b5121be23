"""``driftloop models list``: every declared model, its champion and its last drift verdict.

MLflow and the drift store are imported inside the command (``driftloop --help`` stays light).
A registry or database that cannot be reached leaves its columns as "-" and says why below the
table: the declarations are listed whatever is down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import typer
from rich.table import Table

from driftloop.settings import MlflowSettings, PostgresSettings
from driftloop_tools.cli.common import console, settings_or_exit
from schemas.features import FeatureSpec, declared_feature_specs, load_feature_spec

models_app = typer.Typer(help="Every declared model: champion, promotion metric, last verdict.")


@dataclass(frozen=True, slots=True)
class Champion:
    """A model's champion version and the promotion metric its run logged on its holdout."""

    version: int
    metric_value: float | None


def _champions(tracking_uri: str, specs: list[FeatureSpec]) -> dict[str, Champion | None]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from driftloop.training.trainer import CHAMPION_ALIAS

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    champions: dict[str, Champion | None] = {}
    for spec in specs:
        name = spec.registered_model_name
        try:
            version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        except MlflowException as error:
            if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                champions[name] = None
                continue
            raise
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        value = metrics.get(f"holdout_{spec.promotion_metric.value}")
        champions[name] = Champion(int(version.version), value)
    return champions


async def _verdicts(settings: PostgresSettings, names: list[str]) -> dict[str, str]:
    from driftloop.drift.store import open_drift_store

    # A listing is interactive: a database that is away is reported after a few seconds.
    store = await open_drift_store(settings, "public", give_up_after_seconds=5)
    try:
        verdicts: dict[str, str] = {}
        for name in names:
            runs = await store.recent(name, limit=1)
            if runs:
                run = runs[0]
                share = "" if run.drift_share is None else f", drift share {run.drift_share:.2f}"
                verdicts[name] = (
                    f"{run.outcome} v{run.model_version}{share} ({run.window_end:%Y-%m-%d %H:%M})"
                )
        return verdicts
    finally:
        await store.close()


@models_app.command("list")
def list_models() -> None:
    """Declared models with their task, champion version and its promotion metric on its
    holdout, and the last window the drift-monitor judged."""
    specs = [load_feature_spec(name) for name in declared_feature_specs()]
    names = [spec.registered_model_name for spec in specs]
    notes: list[str] = []
    champions: dict[str, Champion | None] = {}
    verdicts: dict[str, str] = {}
    try:
        champions = _champions(settings_or_exit(MlflowSettings).tracking_uri, specs)
    except Exception as error:  # noqa: BLE001 - the registry being away is shown, not raised
        notes.append(f"MLflow not reached: {error}")
    try:
        verdicts = asyncio.run(_verdicts(settings_or_exit(PostgresSettings), names))
    except Exception as error:  # noqa: BLE001 - the database being away is shown, not raised
        notes.append(f"Postgres not reached: {error}")
    table = Table(title="declared models")
    for column in (
        "model",
        "declaration",
        "task",
        "champion",
        "promotion metric",
        "last drift verdict",
    ):
        table.add_column(column)
    for spec in specs:
        name = spec.registered_model_name
        champion = champions.get(name)
        metric = spec.promotion_metric.value
        value = (
            ""
            if champion is None or champion.metric_value is None
            else f" {champion.metric_value:.4g}"
        )
        table.add_row(
            name,
            spec.name,
            spec.task.value,
            f"v{champion.version}" if champion else "-",
            f"{metric}{value}",
            verdicts.get(name, "-"),
        )
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
