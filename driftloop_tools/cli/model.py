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

from driftloop.events.producer import DeliveryError, EventProducer
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop_tools.cli.common import console, settings_or_exit
from schemas.features import FeatureSpecError, load_feature_spec
from schemas.topics import Topic

if TYPE_CHECKING:
    from driftloop.training.bootstrap import BootstrapResult

model_app = typer.Typer(help="Models in the MLflow registry: the first champion.")


async def announce_promotion(result: BootstrapResult, settings: KafkaSettings) -> None:
    """Publish the ``ModelPromoted`` of a bootstrapped champion (servers load it at once)."""
    from driftloop.training.bootstrap import promotion_event  # deferred: see the module docstring

    producer = EventProducer(settings, "model-bootstrap")
    await producer.start(give_up_after_seconds=20)
    try:
        await producer.send_event(settings.topic(Topic.MODEL_EVENTS), promotion_event(result))
    finally:
        await producer.close()


@model_app.command()
def bootstrap(
    declaration: str = typer.Option(
        "bikeshare", help="Feature declaration: a name in schemas/models, or a YAML file."
    ),
    model_name: str | None = typer.Option(
        None, help="Registered model (default: the declaration's registered_model_name)."
    ),
    since: str | None = typer.Option(
        None,
        help="First moment of the training rows, ISO 8601 (default: the declaration's "
        "training.since; needs a dataset with a time column).",
    ),
    until: str | None = typer.Option(
        None, help="End (exclusive) of the training rows (default: training.until)."
    ),
    force: bool = typer.Option(False, "--force", help="Train and promote even over a champion."),
) -> None:
    """Train the first model on the declaration's seed data, register it and make it champion."""
    from driftloop.training.bootstrap import (  # deferred: see the module docstring
        REFERENCE_ARTIFACT,
        ChampionExistsError,
        bootstrap_model,
    )

    mlflow_settings = settings_or_exit(MlflowSettings)
    kafka_settings = settings_or_exit(KafkaSettings)
    try:
        spec = load_feature_spec(declaration)
    except FeatureSpecError as error:
        console.print(f"[red]model[/red] {error}")
        raise typer.Exit(1) from None
    first = since or spec.training.since or "the first row"
    last = until or spec.training.until or "the last row"
    holdout = (
        f"the last {spec.training.holdout}"
        if spec.dataset is not None and spec.dataset.time is not None
        else f"{spec.training.holdout_fraction:.0%} at random (seed {spec.training.seed})"
    )
    console.print(
        f"[cyan]model[/cyan] training {model_name or spec.registered_model_name} "
        f"({spec.task}) on {first} to {last} (holdout: {holdout})"
    )
    try:
        result = bootstrap_model(
            spec,
            tracking_uri=mlflow_settings.tracking_uri,
            model_name=model_name,
            since=since,
            until=until,
            force=force,
        )
    except ChampionExistsError as error:
        console.print(f"[cyan]model[/cyan] {error}; nothing to do (use --force to train a new one)")
        return
    except ValueError as error:  # a selection or holdout the data cannot give
        console.print(f"[red]model[/red] {error}")
        raise typer.Exit(1) from None
    model = result.model
    console.print(
        f"[cyan]model[/cyan] {model.name} version {model.version} (run {model.run_id}) is "
        f"champion: trained on {result.training_rows} rows in {result.training_seconds:.2f} s, "
        f"holdout {result.scores.describe()} ({result.scores.rows} rows; promotion metric "
        f"{result.promotion_metric}); reference {result.reference_rows} rows at "
        f"runs:/{model.run_id}/{REFERENCE_ARTIFACT}"
    )
    try:
        asyncio.run(announce_promotion(result, kafka_settings))
    except (KafkaError, DeliveryError, OSError, TimeoutError) as error:
        # The alias has moved already; the gateway's alias poll picks it up without the event.
        console.print(f"[yellow]model[/yellow] ModelPromoted not published ({error})")
    else:
        console.print(f"[cyan]model[/cyan] ModelPromoted published to {Topic.MODEL_EVENTS}")
