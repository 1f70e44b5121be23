"""``driftloop batch score``: a CSV or Parquet file scored through Kafka by the batch scorer."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from driftloop.settings import KafkaSettings, load_settings
from driftloop_tools.cli.common import console, usage_errors
from schemas.features import FeatureSpec, FeatureSpecError, load_feature_spec
from schemas.fields import FeatureValue

batch_app = typer.Typer(help="Batch scoring through Kafka (the batch-scorer must be running).")

SUFFIXES = {".csv", ".parquet", ".pq"}


@batch_app.callback()
def batch() -> None:
    """Batch scoring through Kafka (the batch-scorer must be running)."""


def rows_from_records(
    spec: FeatureSpec, records: list[dict[str, Any]]
) -> list[dict[str, FeatureValue]]:
    """Declared features of each record as JSON values: NaN as null, integral floats of int
    features as ints (a CSV column with a gap is read as floats)."""
    rows = []
    for record in records:
        row: dict[str, FeatureValue] = {}
        for feature in spec.features:
            value = record.get(feature.name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                row[feature.name] = None
            elif feature.dtype == "int" and isinstance(value, float) and value.is_integer():
                row[feature.name] = int(value)
            elif hasattr(value, "item"):  # numpy scalar
                row[feature.name] = value.item()
            else:
                row[feature.name] = value
        rows.append(row)
    return rows


def _read(path: Path) -> Any:
    # Imported on use, so `driftloop --help` stays fast.
    import pandas as pd

    if path.suffix == ".csv":
        return pd.read_csv(path)
    return pd.read_parquet(path)


@batch_app.command()
def score(
    input_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV or Parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (.csv or .parquet)."),
    feature_spec: str = typer.Option("bikeshare", help="Feature declaration of the rows."),
    model: str | None = typer.Option(
        None, help="Registered model that scores the rows (default: the scorer's default model)."
    ),
    id_column: str = typer.Option(
        "request_id", help="Column of request ids (generated when the file has none)."
    ),
    wait_seconds: float = typer.Option(600.0, help="Longest wait for all results."),
) -> None:
    """Send every row to scoring.requests, wait for all results, write them beside the rows."""
    from driftloop.serving.batch_client import score_rows

    for path in (input_file, output):
        if path.suffix not in SUFFIXES:
            console.print(f"[red]{path}: expected a .csv or .parquet file[/red]")
            raise typer.Exit(2)
    with usage_errors(FeatureSpecError):
        settings = load_settings(KafkaSettings)
        spec = load_feature_spec(feature_spec)
    frame = _read(input_file)
    batch_id = f"batch-{uuid.uuid4().hex[:16]}"
    if id_column in frame.columns:
        request_ids = [str(value) for value in frame[id_column]]
    else:
        request_ids = [f"{batch_id}-{index}" for index in range(len(frame))]
    rows = rows_from_records(spec, frame.to_dict(orient="records"))
    total = len(rows)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        sent = progress.add_task("sent", total=total)
        answered = progress.add_task("scored", total=total)
        outcome = asyncio.run(
            score_rows(
                settings,
                rows,
                request_ids,
                batch_id=batch_id,
                model_name=model,
                wait_seconds=wait_seconds,
                on_sent=lambda count: progress.advance(sent, count),
                on_result=lambda count: progress.advance(answered, count),
            )
        )
    results = [outcome.results.get(request_id) for request_id in request_ids]
    frame[id_column] = request_ids
    frame["prediction"] = [result.prediction if result else None for result in results]
    frame["error"] = [
        (result.error if result else "no result within the wait") for result in results
    ]
    frame["model_name"] = [result.model_name if result else None for result in results]
    frame["model_version"] = [result.model_version if result else None for result in results]
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".csv":
        frame.to_csv(output, index=False)
    else:
        frame.to_parquet(output, index=False)
    versions = sorted(
        {result.model_version for result in results if result and result.model_version}
    )
    summary = Table(title=f"batch {batch_id}", show_header=False)
    summary.add_row("rows", str(total))
    summary.add_row("scored", str(len(outcome.results) - outcome.errors))
    summary.add_row("invalid rows (error)", str(outcome.errors))
    summary.add_row("no result", str(len(outcome.missing)))
    summary.add_row("repeated results ignored", str(outcome.duplicates))
    summary.add_row("model versions", ", ".join(map(str, versions)) or "-")
    summary.add_row("seconds", f"{outcome.seconds:.1f}")
    summary.add_row("rows/s", f"{total / outcome.seconds:,.0f}" if outcome.seconds else "-")
    summary.add_row("output", str(output))
    console.print(summary)
    if outcome.missing:
        raise typer.Exit(1)
