"""``driftloop drift check``: judge a long window (days, weeks) of a model version on demand.

Judges the window as the monitor judges its own: the verdict from the window's sketch (every
row counted), built inside DuckDB over the feature-logger's Parquet files
(``driftloop.drift.parquet_windows``; ``--engine pandas`` loads the files whole and sketches them
in Python, the reference path), against the version's reference and drift baseline from MLflow
with the thresholds calibrated for the window's size under the monitor's policy
(``DRIFT_MONITOR_POLICY``); Evidently runs on a uniform sample of at most
``DRIFT_MONITOR_REPORT_SAMPLE_ROWS`` rows for the report and the quality on labelled rows. It
prints the verdict and stores the JSON and HTML report under ``drift-reports/long/``. It
publishes nothing: episodes and retraining belong to the monitor's own windows. The drift
modules are imported inside the command: they pull in Evidently, MLflow and pandas, which every
other ``driftloop`` command would otherwise wait for.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta

import typer
from rich.table import Table

from driftloop.settings import load_settings
from driftloop_tools.cli.common import console, usage_errors

drift_app = typer.Typer(help="Drift: judge a long window of logged traffic on demand.")

LONG_REPORT_PREFIX = "drift-reports/long/"


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r} is not an ISO-8601 time") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def _check(
    model: str, version: int | None, start: datetime, end: datetime, engine: str
) -> bool:
    from consumers.drift_monitor import DriftMonitorSettings
    from driftloop.drift.assessment import WindowBounds
    from driftloop.drift.baseline import calibrate, prepare
    from driftloop.drift.monitor import judge_window
    from driftloop.drift.parquet_windows import (
        load_parquet_window,
        sketch_duckdb_window,
        sketch_frame,
    )
    from driftloop.drift.reference import RegistryChampions
    from driftloop.drift.reports import put_report, report_keys
    from driftloop.storage import lake
    from driftloop.storage.database import create_pool
    from driftloop.storage.objectstore import s3_client

    settings = load_settings(DriftMonitorSettings)
    champions = RegistryChampions(settings.mlflow.tracking_uri)
    chosen = version or await asyncio.to_thread(champions.champion_version, model)
    if chosen is None:
        console.print(f"[red]{model} has no champion; name a --version[/red]")
        return False
    spec = await asyncio.to_thread(champions.feature_spec, model, chosen)
    reference = await asyncio.to_thread(champions.reference, model, chosen)
    baseline = await asyncio.to_thread(champions.baseline, model, chosen)
    if baseline is None or not baseline.follows(settings.policy):
        baseline = await asyncio.to_thread(calibrate, spec, reference, settings.policy)
    prepared = await asyncio.to_thread(prepare, baseline, reference)
    sample_rows = settings.report_sample_rows
    pool = await create_pool(
        settings.postgres, schema=settings.db_schema, max_size=2, give_up_after_seconds=10
    )
    try:
        async with s3_client(settings.s3) as s3:
            if engine == "duckdb":
                window_rows = await sketch_duckdb_window(
                    pool,
                    lake.s3_filesystem(settings.s3),
                    settings.s3.data_bucket,
                    spec,
                    baseline.layout,
                    model,
                    chosen,
                    start=start,
                    end=end,
                    sample_rows=sample_rows,
                )
            else:
                frame = await load_parquet_window(
                    pool, s3, settings.s3.data_bucket, spec, model, chosen, start=start, end=end
                )
                window_rows = await asyncio.to_thread(
                    functools.partial(sketch_frame, baseline.layout, frame, sample_rows=sample_rows)
                )
            rows = window_rows.sketch.rows
            console.print(
                f"[cyan]drift[/cyan] {model} v{chosen}: {rows} rows from Parquet ({engine}) "
                "between "
                f"{start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC, sketched whole, "
                f"{len(window_rows.sample)} sampled for the report; reference "
                f"{len(reference)} rows"
            )
            if rows < settings.policy.min_rows:
                console.print(
                    f"[yellow]refused[/yellow] (too_few_rows): {rows} rows, fewer than the "
                    f"minimum {settings.policy.min_rows}"
                )
                return False
            window = WindowBounds(start=start, end=end)
            assessment, documents, _ = await asyncio.to_thread(
                functools.partial(
                    judge_window,
                    spec,
                    reference,
                    prepared,
                    window_rows.sketch,
                    window_rows.sample,
                    settings.policy,
                    model_name=model,
                    model_version=chosen,
                    window=window,
                    clean_html_share=1.0,  # asked for by a person: always with its HTML
                )
            )
            keys = report_keys(model, chosen, end, prefix=LONG_REPORT_PREFIX)
            uri = await put_report(s3, settings.s3.data_bucket, keys, documents)
    finally:
        await pool.close()
    table = Table(title=f"{model} v{chosen}: drift share {assessment.drift_share:.2f}")
    table.add_column("column")
    table.add_column("test")
    table.add_column("score", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("drifted")
    for feature in (*assessment.features, *filter(None, [assessment.prediction])):
        table.add_row(
            feature.name,
            feature.stat_test,
            f"{feature.score:.3f}",
            f"{feature.threshold:g}",
            "[red]yes[/red]" if feature.drifted else "no",
        )
    console.print(table)
    if assessment.quality is not None:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in assessment.quality.metrics.items())
        console.print(f"quality on {assessment.labelled_rows} labelled rows: {figures}")
    console.print(f"report: {uri} (HTML beside it)")
    return True


@drift_app.command()
def check(
    model: str = typer.Option("bikeshare", help="Registered model."),
    version: int | None = typer.Option(None, help="Model version (default: the champion)."),
    since: str | None = typer.Option(None, help="Window start, ISO-8601 (default: 7 days ago)."),
    until: str | None = typer.Option(None, help="Window end, ISO-8601 (default: now)."),
    engine: str = typer.Option(
        "duckdb",
        help="duckdb: sketch the window in DuckDB, sample it, labels from the Parquet label "
        "files; pandas: load every file, labels from Postgres, sketch in Python (the reference "
        "path).",
    ),
) -> None:
    """Judge a long window of a model version from the Parquet log; store and print the report."""
    end = _moment(until) if until else datetime.now(UTC)
    start = _moment(since) if since else end - timedelta(days=7)
    if start >= end:
        raise typer.BadParameter("--since must be before --until")
    if engine not in {"duckdb", "pandas"}:
        raise typer.BadParameter(f"--engine is duckdb or pandas, not {engine!r}")
    with usage_errors():
        judged = asyncio.run(_check(model, version, start, end, engine))
    if not judged:
        raise typer.Exit(1)
