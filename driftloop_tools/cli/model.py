"""``driftloop model``: train and register the first champion.

``driftloop.training.bootstrap`` is imported inside the command: it pulls in MLflow and
LightGBM, which every other ``driftloop`` command would otherwise wait for (seconds each on
this machine).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer
from aiokafka.errors import KafkaError
from rich.console import Console

from driftloop.events import kafka
from driftloop.settings import KafkaSettings, MlflowSettings, SettingsError, load_settings
from schemas.features import load_feature_spec
from schemas.topics import Topic

if TYPE_CHECKING:
    from driftloop.training.bootstrap import BootstrapResult

model_app = typer.Typer(help="Models in the MLflow registry: the first champion.")
console = Console()


async def announce_promotion(result: BootstrapResult, settings: KafkaSettings) -> None:
    """Publish the ``ModelPromoted`` of a bootstrapped champion (servers load it at once)."""
    from driftloop.training.bootstrap import promotion_event  # deferred: see the module docstring

    producer = kafka.producer(settings, "model-bootstrap")
    await kafka.start_with_retry(producer, settings, give_up_after_seconds=20)
    try:
        event = promotion_event(result)
        await producer.send_and_wait(
            settings.topic(Topic.MODEL_EVENTS), event.to_bytes(), key=event.partition_key()
        )
    finally:
        await producer.stop()


@model_app.command()
def bootstrap(
    declaration: str = typer.Option("bikeshare", help="Feature declaration in schemas/models."),
    model_name: str | None = typer.Option(
        None, help="Registered model (default: the declaration's registered_model_name)."
    ),
    months: str = typer.Option("Jan,Feb,March", help="Training months, as in `mnth`."),
    holdout_days: int = typer.Option(14, help="Last days of the window held out."),
    force: bool = typer.Option(False, "--force", help="Train and promote even over a champion."),
) -> None:
    """Train the first model on the opening months, register it and make it the champion."""
    from driftloop.training.bootstrap import (  # deferred: see the module docstring
        REFERENCE_ARTIFACT,
        ChampionExistsError,
        bootstrap_model,
    )

    try:
        mlflow_settings = load_settings(MlflowSettings)
        kafka_settings = load_settings(KafkaSettings)
    except SettingsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    spec = load_feature_spec(declaration)
    chosen = [month.strip() for month in months.split(",") if month.strip()]
    console.print(
        f"[cyan]model[/cyan] training {model_name or spec.registered_model_name} on "
        f"{', '.join(chosen)} (holdout: last {holdout_days} days)"
    )
    try:
        result = bootstrap_model(
            spec,
            tracking_uri=mlflow_settings.tracking_uri,
            model_name=model_name,
            months=chosen,
            holdout_days=holdout_days,
            force=force,
        )
    except ChampionExistsError as error:
        console.print(f"[cyan]model[/cyan] {error}; nothing to do (use --force to train a new one)")
        return
    model = result.model
    console.print(
        f"[cyan]model[/cyan] {model.name} version {model.version} (run {model.run_id}) is "
        f"champion: trained on {result.training_rows} rows in {result.training_seconds:.2f} s, "
        f"holdout RMSE {result.scores.rmse:.1f} MAE {result.scores.mae:.1f} "
        f"({result.scores.rows} rows); reference {result.reference_rows} rows at "
        f"runs:/{model.run_id}/{REFERENCE_ARTIFACT}"
    )
    try:
        asyncio.run(announce_promotion(result, kafka_settings))
    except (KafkaError, OSError, TimeoutError) as error:
        # The alias has moved already; the gateway's alias poll picks it up without the event.
        console.print(f"[yellow]model[/yellow] ModelPromoted not published ({error})")
    else:
        console.print(f"[cyan]model[/cyan] ModelPromoted published to {Topic.MODEL_EVENTS}")
