"""``driftloop demo``: the closed loop on real data (``run``), or a bare replay (``replay``).

``run`` is the README's main job: a first champion trained on January-March, then the rest of
2011 replayed through the gateway at an accelerated clock while every stage of the loop is
printed as it happens (windows judged, drift, the Airflow run, the challenger against the
champion, the promotion, the version served), and a summary with the links at the end.

The summary accounts for the loop: the RMSE of the predictions it served over the replay,
against the frozen first champion's and a monthly retrain on all history, both computed in
the same run by the same code on the same rows (``driftloop.evaluation.loop_value``), with the
lifts and the retrains and promotions of each. The replay's clock holds while a retraining is
in flight (``--hold-clock``, the default): at 30 simulated hours a second a one-minute DAG run
is 75 simulated days of traffic served by the drifted champion, where in real time it is less
than one hourly request. Measured offline (``bench/loop_value.py``), serving each promotion 75
days late takes the loop from RMSE 64.9 to 93.3, the demo's 91.5 before this. The clock still
runs while the monitor judges a window and the trigger starts the run (seconds, days of
simulated time); ``--no-hold-clock`` shows the compressed clock deciding instead.

``driftloop_tools.demo.replay`` and the training code are imported inside the commands: they pull in
pandas, MLflow and LightGBM, which every other ``driftloop`` command would otherwise wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx
import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from driftloop.orchestration.airflow import AirflowClient
from driftloop.settings import PostgresSettings, SettingsError, load_settings
from driftloop_tools.stack.settings import StackSettings
from schemas.events import ChallengerShadowed, ModelDecision, ModelRejected, ModelRolledBack
from schemas.features import FeatureSpec, TrainingData, load_feature_spec

if TYPE_CHECKING:
    # The loop watcher reads the drift store, which imports pandas and Evidently (seconds):
    # imported where the demo runs, so `driftloop --help` does not wait for them.
    from driftloop.drift.store import DriftRun
    from driftloop.evaluation.loop_value import Comparison
    from driftloop_tools.demo.loop_watch import LoopChange, LoopEvent, LoopTimeline
    from driftloop_tools.demo.replay import LogCheck, ReplayHour, ReplayStats

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
    from driftloop_tools.demo.replay import (  # deferred: see the module docstring
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
    from driftloop_tools.demo.replay import day_of_year  # deferred: see the module docstring

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


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``driftloop demo run`` replays and how long it waits."""

    stack: StackSettings
    declaration: str
    first_day: int
    last_day: int
    hours_per_second: float
    concurrency: int
    ready_timeout: float
    settle_timeout: float
    hold_clock: bool = True


@dataclass(frozen=True, slots=True)
class SimulatedTime:
    """The replay's clock: real moment ``started`` is simulated ``first``, at a given pace,
    stopped while it was held (``holds``: the replay's real intervals, the last maybe open)."""

    started: datetime
    first: datetime
    hours_per_second: float
    holds: Sequence[tuple[datetime, datetime | None]] = ()

    def at(self, moment: datetime) -> datetime:
        """The simulated moment of a real one."""
        seconds = (moment - self.started).total_seconds()
        for held_from, held_until in self.holds:
            end = moment if held_until is None else min(held_until, moment)
            if end > held_from:
                seconds -= (end - held_from).total_seconds()
        return self.first + timedelta(hours=seconds * self.hours_per_second)


@dataclass(slots=True)
class LoopTally:
    """What the closed-loop demo saw, for the summary."""

    windows: Counter[str] = field(default_factory=Counter)
    drift_events: int = 0
    episodes: set[str] = field(default_factory=set)
    triggers: Counter[str] = field(default_factory=Counter)
    dag_runs: dict[str, str] = field(default_factory=dict)
    decisions: list[str] = field(default_factory=list)
    promoted: list[int] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    first_drifted_report: str | None = None
    in_flight: set[str] = field(default_factory=set)
    simulated: SimulatedTime | None = None
    """Set when the replay starts: windows are shown in simulated time."""
    metric: str = "rmse"
    """The model's promotion metric, shown for each window as the retrain DAG names it."""

    @property
    def retraining(self) -> bool:
        """A triggered run has not finished, or its promoted version is not served yet."""
        promoted_not_served = bool(self.promoted) and self.promoted[-1] not in self.served
        return bool(self.in_flight) or promoted_not_served

    @property
    def retrains(self) -> int:
        """DAG runs the trigger started (accepted episodes)."""
        return sum(n for state, n in self.triggers.items() if state in _ACCEPTED_STATES)


_ACCEPTED_STATES = frozenset({"triggered", "already_triggered"})


def describe(change: LoopChange, tally: LoopTally) -> str:
    """One line for a change of the loop (and the tally updated)."""
    from driftloop_tools.demo.loop_watch import (  # deferred: see the TYPE_CHECKING imports
        DagRunChanged,
        DriftAnnounced,
        ModelDecided,
        TriggerRecorded,
        WindowChecked,
    )

    if isinstance(change, WindowChecked):
        return _window_line(change.run, tally)
    if isinstance(change, DriftAnnounced):
        event = change.event
        tally.drift_events += 1
        new = event.episode_id not in tally.episodes
        tally.episodes.add(event.episode_id)
        if not new:
            return ""  # the episode goes on: its drifted windows say so already
        features = ", ".join(event.drifted_features) or "no feature"
        quality = ", labelled error past its limit" if event.quality_degraded else ""
        return (
            f"[bold red]drift[/bold red] DriftDetected for v{event.model_version}: episode "
            f"{event.episode_id} opened, share {event.drift_share:.2f} ({features}){quality}"
        )
    if isinstance(change, TriggerRecorded):
        entry = change.entry
        tally.triggers[entry.state.value] += 1
        if entry.state.accepted:
            tally.in_flight.add(entry.episode_id)
            return (
                f"[magenta]airflow[/magenta] {entry.state.value}: {entry.dag_id} run "
                f"{entry.dag_run_id}"
            )
        return f"[magenta]trigger[/magenta] {entry.state.value}: {entry.reason or ''}"
    if isinstance(change, DagRunChanged):
        tally.dag_runs[change.run.run_id] = change.run.state
        if change.run.finished:
            tally.in_flight.discard(change.episode_id)
        return f"[magenta]airflow[/magenta] run {change.run.run_id} is {change.run.state}"
    if isinstance(change, ModelDecided):
        return _decision_line(change.event, tally)
    tally.served.append(change.version)
    was = f" (was {change.previous})" if change.previous is not None else ""
    return f"[bold cyan]gateway[/bold cyan] now serves version {change.version}{was}"


def _window_span(run: DriftRun, tally: LoopTally) -> str:
    clock = tally.simulated
    if clock is None:
        return f"{run.window_start:%H:%M:%S}-{run.window_end:%H:%M:%S}"
    start, end = clock.at(run.window_start), clock.at(run.window_end)
    return f"{start:%b %d %Hh}-{end:%b %d %Hh}"


def _window_line(run: DriftRun, tally: LoopTally) -> str:
    tally.windows[run.outcome] += 1
    span = _window_span(run, tally)
    if run.outcome == "refused":
        return f"[yellow]window[/yellow] v{run.model_version} {span} refused: {run.refusal_reason}"
    if run.outcome == "drifted" and tally.first_drifted_report is None:
        tally.first_drifted_report = run.report_uri
    value = (run.quality or {}).get(tally.metric)
    colour = "red" if run.outcome == "drifted" else "green"
    features = f" ({', '.join(run.drifted_features)})" if run.drifted_features else ""
    quality = (
        f", {tally.metric} {value:.4g} on {run.labelled_rows} labels" if value is not None else ""
    )
    if run.quality_degraded and run.quality_limit is not None:
        quality += f" [red](past its limit {run.quality_limit:.4g})[/red]"
    return (
        f"[{colour}]window[/{colour}] v{run.model_version} {span}, {run.window_rows} rows: "
        f"drift share {run.drift_share or 0:.2f}{features}{quality}"
    )


def _decision_line(event: ModelDecision, tally: LoopTally) -> str:
    champion = (
        f"champion v{event.champion_version} {event.metric_name} {event.champion_score:.4g}"
        if event.champion_score is not None
        else "no champion"
    )
    line = (
        f"challenger v{event.model_version} {event.metric_name} {event.challenger_score:.4g} "
        f"vs {champion} on the same holdout"
    )
    if isinstance(event, ModelRejected):
        tally.decisions.append(f"v{event.model_version} rejected")
        return f"[yellow]rejected[/yellow] {line}: {event.reason}"
    if isinstance(event, ChallengerShadowed):
        tally.decisions.append(f"v{event.model_version} in shadow")
        return f"[cyan]shadowed[/cyan] {line}: scored in shadow until live labels decide"
    if isinstance(event, ModelRolledBack):
        # The version champion again is model_version; the demoted one is champion_version.
        tally.decisions.append(f"v{event.champion_version} rolled back to v{event.model_version}")
        return (
            f"[bold red]rolled back[/bold red] v{event.champion_version} -> "
            f"v{event.model_version}: {event.metric_name} {event.champion_score:.4g} served "
            f"against {event.challenger_score:.4g} in shadow on {event.live_rows} labelled rows"
        )
    tally.promoted.append(event.model_version)
    tally.decisions.append(f"v{event.model_version} promoted")
    return f"[bold green]promoted[/bold green] {line}"


async def _print_changes(
    queue: asyncio.Queue[LoopEvent],
    tally: LoopTally,
    timeline: LoopTimeline,
    stats: list[ReplayStats],
    started: float,
    after_change: Callable[[], None] = lambda: None,
) -> None:
    while True:
        item = await queue.get()
        timeline.observe(item)
        line = describe(item.change, tally)
        after_change()
        if not line:
            continue
        clock = stats[0].clock if stats and stats[0].clock else None
        when = f"{clock:%Y-%m-%d}" if clock else "----------"
        console.print(f"[dim]+{item.seen_monotonic - started:6.1f}s sim {when}[/dim] {line}")


async def _wait_for_version(
    client: httpx.AsyncClient, version: int, *, timeout_seconds: float
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            response = await client.get("/models/current")
            if response.status_code == httpx.codes.OK and response.json()["version"] == version:
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the gateway does not serve version {version} after {timeout_seconds:.0f} s"
            )
        await asyncio.sleep(0.5)


async def _settle(tally: LoopTally, *, timeout_seconds: float) -> None:
    """Let a retrain in flight finish (its run, the decision, the swap) before the summary."""
    deadline = time.monotonic() + timeout_seconds
    announced = False
    while time.monotonic() < deadline:
        if not tally.retraining:
            return
        if not announced:
            console.print(
                f"[cyan]demo[/cyan] waiting up to {timeout_seconds:.0f} s for the retraining "
                "in flight"
            )
            announced = True
        await asyncio.sleep(1.0)
    console.print(
        f"[yellow]demo[/yellow] a retraining was still in flight after {timeout_seconds:.0f} s"
    )


async def _closed_loop(options: DemoOptions) -> bool:
    from driftloop.drift.store import open_drift_store
    from driftloop.orchestration.ledger import open_retrain_ledger
    from driftloop.training.bootstrap import bootstrap_model  # deferred: see the module docstring
    from driftloop_tools.cli.model import announce_promotion
    from driftloop_tools.demo.loop_watch import LoopTimeline, LoopWatcher
    from driftloop_tools.demo.replay import Replayer, load_replay_hours, new_replay_id, wait_for_log

    stack = options.stack
    spec = load_feature_spec(options.declaration)
    model = spec.registered_model_name
    started = time.monotonic()
    console.print(f"[cyan]demo[/cyan] training the first {model} model on January-March 2011")
    result = await asyncio.to_thread(
        bootstrap_model, spec, tracking_uri=stack.mlflow.tracking_uri, force=True
    )
    console.print(
        f"[cyan]demo[/cyan] {model} version {result.model.version} is champion: holdout "
        f"{result.scores.describe()} on {result.scores.rows} rows; its reference dataset "
        f"({result.reference_rows} rows) is logged with it"
    )
    await announce_promotion(result, stack.kafka)
    hours = load_replay_hours(spec, first_day=options.first_day, last_day=options.last_day)
    drift_store = await open_drift_store(stack.postgres, give_up_after_seconds=30)
    ledger = await open_retrain_ledger(stack.postgres, give_up_after_seconds=30)
    tally = LoopTally(metric=spec.promotion_metric.value)
    timeline = LoopTimeline()
    holder: list[ReplayStats] = []
    limits = httpx.Limits(max_connections=options.concurrency + 4)
    tasks: list[asyncio.Task[None]] = []
    replayers: list[Replayer] = []

    def hold_clock() -> None:
        # Called after every change the watcher reports: hold while a retraining is in flight.
        if not options.hold_clock or not replayers:
            return
        if tally.retraining:
            replayers[0].hold()
        else:
            replayers[0].release()

    try:
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{stack.gateway_port}", timeout=30, limits=limits
            ) as gateway,
            AirflowClient(stack.airflow, attempts=1) as airflow,
        ):
            watcher = LoopWatcher(model, stack.kafka, drift_store, ledger, airflow, gateway)
            await watcher.baseline()
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(watcher.run(ready), name="watch"))
            tasks.append(
                asyncio.create_task(
                    _print_changes(watcher.queue, tally, timeline, holder, started, hold_clock),
                    name="print",
                )
            )
            await asyncio.wait_for(ready.wait(), timeout=60)
            await _wait_for_version(
                gateway, result.model.version, timeout_seconds=options.ready_timeout
            )
            console.print(
                f"[cyan]demo[/cyan] replaying {len(hours)} hours ({hours[0].moment:%b %d} to "
                f"{hours[-1].moment:%b %d}) at {options.hours_per_second:g} hours/s; each "
                "hour's true count follows through /feedback"
            )
            replayer = Replayer(
                gateway,
                hours,
                replay_id=new_replay_id(),
                hours_per_second=options.hours_per_second,
                concurrency=options.concurrency,
                max_hold_seconds=options.settle_timeout,
            )
            replayers.append(replayer)
            holder.append(replayer.stats)
            tally.simulated = SimulatedTime(
                datetime.now(UTC), hours[0].moment, options.hours_per_second, replayer.stats.holds
            )
            stats = await replayer.run()
            console.print(
                f"[cyan]demo[/cyan] replay done: {stats.predictions} predictions, "
                f"{stats.labels_sent} labels, {stats.error_count} errors"
            )
            await _settle(tally, timeout_seconds=options.settle_timeout)
            check = await wait_for_log(
                stack.postgres, stats.row_ids, stats.labelled_row_ids, timeout_seconds=60
            )
            await asyncio.sleep(1.5)  # the printer shows the last changes polled
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await drift_store.close()
        await ledger.close()
    console.print(
        "[cyan]demo[/cyan] scoring the frozen first champion and a monthly retrain on the "
        "same hours"
    )
    accounting = await asyncio.to_thread(account_for_loop, spec, hours, stats)
    seconds = time.monotonic() - started
    closed = bool(tally.promoted) and tally.promoted[-1] in tally.served
    console.print(_loop_summary(tally, stats, check, seconds, closed=closed))
    console.print(_value_table(accounting, tally, stats))
    if timeline.stages():
        console.print(_timeline_table(timeline))
    await _print_links(stack, model, tally)
    return closed and stats.error_count == 0


def _loop_summary(
    tally: LoopTally, stats: ReplayStats, check: LogCheck, seconds: float, *, closed: bool
) -> Table:
    table = Table(title="closed loop summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("demo time", f"{seconds:.0f} s")
    table.add_row(
        "predictions / labels",
        f"{stats.predictions} served, {check.predictions_logged} logged; {stats.labels_sent} "
        f"labels sent, {check.labels_joined} joined",
    )
    windows = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.windows.items()))
    table.add_row("windows judged", windows or "none")
    table.add_row(
        "drift", f"{tally.drift_events} DriftDetected events, {len(tally.episodes)} episode(s)"
    )
    table.add_row(
        "retrain triggers",
        ", ".join(f"{n} {state}" for state, n in sorted(tally.triggers.items())) or "none",
    )
    table.add_row(
        "DAG runs", ", ".join(f"{run}: {state}" for run, state in tally.dag_runs.items()) or "none"
    )
    table.add_row("decisions", ", ".join(tally.decisions) or "none")
    per_version = ", ".join(f"v{v}: {n}" for v, n in sorted(stats.versions.items()))
    table.add_row("predictions by version", per_version or "-")
    rmse = stats.rmse()
    table.add_row("RMSE (whole replay)", f"{rmse:.1f}" if rmse is not None else "-")
    verdict = (
        f"[green]closed: the gateway serves the promoted version {tally.promoted[-1]}[/green]"
        if closed
        else "[red]not closed: no promoted model reached the gateway[/red]"
    )
    table.add_row("loop", verdict)
    return table


@dataclass(frozen=True, slots=True)
class LoopAccounting:
    """The served predictions against the two baselines, on the same replayed hours."""

    comparison: Comparison
    first: datetime
    last: datetime
    scheduled_retrains: int


def account_for_loop(
    spec: FeatureSpec, hours: Sequence[ReplayHour], stats: ReplayStats
) -> LoopAccounting:
    """Score what the loop served, the frozen first champion and a monthly retrain on all
    history on the replayed hours (``driftloop.evaluation.loop_value``, seconds of CPU)."""
    import numpy as np

    from driftloop.evaluation import loop_value  # deferred: LightGBM, MLflow
    from driftloop.training.retrain import PREDICTED_AT_COLUMN

    history = loop_value.seed_history(spec)
    replay = loop_value.replay_rows(spec, history, hours[0].moment)
    replay = replay[replay[PREDICTED_AT_COLUMN] <= hours[-1].moment].reset_index(drop=True)
    times = replay[PREDICTED_AT_COLUMN]
    # The first champion as bootstrap trained it (the same rows, seed and parameters).
    first = loop_value.first_champion(spec, history)
    moments = loop_value.monthly_moments(
        times.iloc[0].to_pydatetime(), times.iloc[-1].to_pydatetime()
    )
    frozen = loop_value.serve_frozen(spec, replay, first)
    monthly = loop_value.serve_scheduled(
        spec, history, replay, first, moments, data=TrainingData(), name="monthly"
    )
    # An hour the gateway did not answer is left out of all three.
    realised = np.array(
        [stats.served.get(moment.to_pydatetime(), np.nan) for moment in times], dtype=np.float64
    )
    return LoopAccounting(
        comparison=loop_value.compare(spec, replay, realised, frozen, monthly),
        first=times.iloc[0].to_pydatetime(),
        last=times.iloc[-1].to_pydatetime(),
        scheduled_retrains=monthly.retrains,
    )


def _value_table(accounting: LoopAccounting, tally: LoopTally, stats: ReplayStats) -> Table:
    found = accounting.comparison
    metric = found.metric.name.upper()
    span = f"{accounting.first:%b %d} to {accounting.last:%b %d}"
    table = Table(title=f"what the loop is worth: {metric}, {span}, {found.rows} hours")
    table.add_column("served by")
    table.add_column(metric, justify="right")
    table.add_column("loop's lift", justify="right")
    table.add_column("retrains / promotions", justify="right")
    table.add_row(
        "the loop (realised)",
        f"{found.realised:.1f}",
        "",
        f"{tally.retrains} / {len(tally.promoted)}",
    )
    table.add_row(
        "frozen first champion", f"{found.frozen:.1f}", f"{found.lift_over_frozen:+.1%}", "0 / 0"
    )
    table.add_row(
        "monthly retrain, all history",
        f"{found.scheduled:.1f}",
        f"{found.lift_over_scheduled:+.1%}",
        f"{accounting.scheduled_retrains} / {accounting.scheduled_retrains}",
    )
    beats = found.lift_over_scheduled >= 0 and tally.retrains < accounting.scheduled_retrains
    never_worse = found.lift_over_frozen >= 0
    verdict = (
        "[green]at most the monthly baseline with fewer retrains, better than frozen[/green]"
        if beats and never_worse
        else "[yellow]short of the target (at most the monthly baseline's error with fewer "
        "retrains, never worse than frozen)[/yellow]"
    )
    held = (
        f"; the clock held {stats.held_seconds:.0f} s for retrainings" if stats.held_seconds else ""
    )
    table.caption = f"{verdict}{held}"
    return table


def _timeline_table(timeline: LoopTimeline) -> Table:
    table = Table(title="loop timeline, from the first drifted window logged")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in sorted(timeline.stages(), key=lambda stage: stage[1]):
        table.add_row(stage, f"{seconds:.1f}")
    return table


async def _print_links(stack: StackSettings, model: str, tally: LoopTally) -> None:
    # Plain lines, not a table: a URL cut to the terminal's width is no link.
    from driftloop.storage.objectstore import s3_client

    links = [
        ("MLflow model", f"{stack.mlflow.tracking_uri.rstrip('/')}/#/models/{model}"),
        ("Airflow DAG", f"{stack.airflow.url.rstrip('/')}/dags/retrain_model"),
        (
            "Prometheus",
            f"http://127.0.0.1:{stack.prometheus_port}/graph?g0.expr=driftloop_drift_share",
        ),
    ]
    report = tally.first_drifted_report
    if report:
        key = report.removeprefix(f"s3://{stack.s3.data_bucket}/").removesuffix(".json")
        async with s3_client(stack.s3) as s3:
            url = await s3.generate_presigned_url(
                "get_object",
                Params={"Bucket": stack.s3.data_bucket, "Key": f"{key}.html"},
                ExpiresIn=7 * 24 * 3600,
            )
        links += [("first drifted window, JSON", report), ("... its HTML report", url)]
    links += [
        ("windows judged", "uv run python -m consumers.drift_monitor status"),
        ("retrain ledger", "uv run python -m consumers.retrain_trigger status"),
    ]
    console.print("[bold]where to look[/bold]")
    for what, link in links:
        console.print(f"  {what}: {link}", soft_wrap=True, highlight=False)


def _quiet_mlflow() -> None:
    # The demo prints its own lines; MLflow's run URLs, progress bars and telemetry thread
    # only interleave with them.
    for name, value in {
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(logging.ERROR)


@demo_app.command("run")
def run_demo(
    start: str = typer.Option("04-01", help="First replayed day of 2011, MM-DD."),
    until: str = typer.Option("12-31", help="Last replayed day of 2011, MM-DD (inclusive)."),
    hours_per_second: float = typer.Option(30.0, help="Simulated hours per real second."),
    concurrency: int = typer.Option(8, help="Requests in flight at most."),
    declaration: str = typer.Option("bikeshare", help="Feature declaration in schemas/models."),
    ready_timeout: float = typer.Option(90.0, help="Seconds to wait for the gateway's model."),
    settle_timeout: float = typer.Option(
        240.0,
        help="Seconds to wait after the replay for a retraining in flight (and at most to "
        "hold the clock for one).",
    ),
    hold_clock: bool = typer.Option(
        True,
        help="Hold the replay's clock while a retraining is in flight, as real time would "
        "(a one-minute DAG run is 75 simulated days at 30 hours/s).",
    ),
) -> None:
    """The closed loop on real data: first champion, replay, drift, retrain, promotion, swap."""
    from driftloop_tools.demo.replay import day_of_year  # deferred: see the module docstring

    try:
        options = DemoOptions(
            stack=load_settings(StackSettings),
            declaration=declaration,
            first_day=day_of_year(start),
            last_day=day_of_year(until),
            hours_per_second=hours_per_second,
            concurrency=concurrency,
            ready_timeout=ready_timeout,
            settle_timeout=settle_timeout,
            hold_clock=hold_clock,
        )
    except (SettingsError, ValueError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    _quiet_mlflow()
    try:
        closed = asyncio.run(_closed_loop(options))
    except TimeoutError as error:
        console.print(f"[red]demo stopped:[/red] {error}")
        raise typer.Exit(1) from None
    if not closed:
        raise typer.Exit(1)
