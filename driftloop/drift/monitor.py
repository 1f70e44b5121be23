"""The drift monitor's core: judge each new window of a champion's logged rows, act on the verdict.

For every monitored model, on each round:

1. resolve the ``champion`` alias (cached for ``champion_refresh``); a new version switches the
   episode state (``episodes.follow``), the reference dataset and the feature declaration to
   that version's own (both read from its MLflow run);
2. read the next window from the log (``DriftStore.window``): ``window_rows`` rows after the
   last window's end, or fewer (at least the policy's minimum) once the oldest of them is
   ``max_window_age`` old, so low traffic is judged too; rows younger than ``settle`` wait,
   so the feature-logger's partitions catch up before a window is cut behind them;
3. run Evidently (``evaluate_window``, in a worker thread) and store the JSON and HTML report;
4. advance the episode machine; when drift holds, publish ``DriftDetected`` (and wait for the
   broker's ack);
5. write the ``drift_runs`` row and the new state in one transaction, then export the metrics.

A crash between 4 and 5 repeats the window after the restart: the same window end gives the
same episode id, and the retrain-trigger drops the duplicate. Every failure (Postgres, S3,
Kafka, MLflow away) leaves the state where it was and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

import pandas as pd
from prometheus_client import Counter, Gauge, Histogram

from driftloop.drift import episodes
from driftloop.drift.assessment import (
    DriftAssessment,
    WindowBounds,
    WindowEvaluation,
    WindowRefused,
    evaluate_window,
    window_bounds,
)
from driftloop.drift.episodes import EpisodeState, EpisodeStep
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reports import ReportDocuments, render_report, report_keys
from driftloop.drift.store import PREDICTED_AT_COLUMN, WindowRecord
from schemas.events import DriftDetected
from schemas.features import FeatureSpec

log = logging.getLogger(__name__)

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

CHECKS = Counter(
    "driftloop_drift_checks_total",
    "Windows handled by the drift monitor, by outcome (drifted, clean, refused, failed).",
    ["model", "outcome"],
)
DRIFT_SHARE = Gauge(
    "driftloop_drift_share", "Share of monitored features drifted in the last window.", ["model"]
)
FEATURE_SCORE = Gauge(
    "driftloop_drift_feature_score",
    "Stat test distance of each monitored feature in the last window.",
    ["model", "feature"],
)
FEATURE_DRIFTED = Gauge(
    "driftloop_drift_feature_drifted",
    "1 when the feature drifted in the last window, else 0.",
    ["model", "feature"],
)
PREDICTION_SCORE = Gauge(
    "driftloop_drift_prediction_score",
    "Stat test distance of the predictions in the last window.",
    ["model"],
)
EPISODE_OPEN = Gauge(
    "driftloop_drift_episode_open", "1 while a drift episode is open, else 0.", ["model"]
)
EVENTS = Counter("driftloop_drift_events_total", "DriftDetected events published.", ["model"])
QUALITY = Gauge(
    "driftloop_model_quality",
    "Model quality on the labelled rows of the last window (rmse, mae, r2, mean_error, ...).",
    ["model", "metric"],
)
WINDOW_ROWS = Gauge("driftloop_drift_window_rows", "Rows in the last window.", ["model"])
LABELLED_ROWS = Gauge(
    "driftloop_drift_labelled_rows", "Labelled rows in the last window.", ["model"]
)
CHECK_SECONDS = Histogram(
    "driftloop_drift_check_duration_seconds",
    "Time to judge one window: load, Evidently, report upload, publish, record.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
LAST_CHECK = Gauge(
    "driftloop_drift_last_check_timestamp_seconds",
    "Unix time the last window of the model was judged.",
    ["model"],
)
CHAMPION_VERSION = Gauge(
    "driftloop_drift_champion_version", "Champion version whose windows are judged.", ["model"]
)


# Quality series exported per model, so a window without enough labels can withdraw them.
_quality_exported: dict[str, set[str]] = {}


class ChampionSource(Protocol):
    """Where the monitor learns the champion version and that version's reference and spec."""

    def champion_version(self, model_name: str) -> int | None:
        """The version behind the ``champion`` alias, or None when there is none."""
        ...

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        """The reference dataset logged with the version."""
        ...

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        """The feature declaration the version was trained with."""
        ...


class WindowStore(Protocol):
    """Where windows come from and runs go (``driftloop.drift.store.DriftStore``)."""

    async def window(
        self,
        spec: FeatureSpec,
        model_name: str,
        model_version: int,
        *,
        after: datetime,
        before: datetime,
        limit: int,
    ) -> pd.DataFrame: ...

    async def state(self, model_name: str) -> EpisodeState | None: ...

    async def save_state(self, state: EpisodeState) -> None: ...

    async def record(self, record: WindowRecord, state: EpisodeState) -> bool: ...


Publish = Callable[[DriftDetected], Awaitable[None]]
"""Sends one ``DriftDetected`` and returns once the broker acknowledged it."""
StoreReport = Callable[[str, str, ReportDocuments], Awaitable[str]]
"""Stores a report under (json key, html key); returns the JSON's URI."""


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """How windows are cut and how often the monitor looks."""

    window_rows: int = 168
    """Rows in a full window (168: a week of hourly traffic)."""
    max_window_age: timedelta = timedelta(hours=1)
    """A partial window (at least the policy's minimum rows) is judged once its oldest row is
    this old."""
    settle: timedelta = timedelta(seconds=3)
    """Rows younger than this are left for a later window (consumer lag)."""
    champion_refresh: timedelta = timedelta(seconds=5)
    """How long a resolved champion version is trusted before asking MLflow again."""
    report_prefix: str = "drift-reports/"


@dataclass(slots=True)
class _Champion:
    version: int
    spec: FeatureSpec
    reference: pd.DataFrame


@dataclass(slots=True)
class _Watch:
    """What the monitor keeps about one model between rounds."""

    model_name: str
    state: EpisodeState | None = None
    champion: _Champion | None = None
    resolved_at: float = -math.inf
    resolved_version: int | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One window handled: its verdict, the episode step and the event published, if any."""

    model_name: str
    model_version: int
    window: WindowBounds
    verdict: DriftAssessment | WindowRefused
    step: EpisodeStep | None
    event: DriftDetected | None
    report_uri: str | None


@dataclass(slots=True)
class DriftMonitor:
    """Judges windows of the champions of ``models`` and publishes drift that holds."""

    store: WindowStore
    champions: ChampionSource
    publish: Publish
    store_report: StoreReport
    models: Sequence[str]
    policy: DriftPolicy = field(default_factory=DriftPolicy)
    options: MonitorOptions = field(default_factory=MonitorOptions)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _watches: dict[str, _Watch] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.options.window_rows < self.policy.min_rows:
            raise ValueError(
                f"windows of {self.options.window_rows} rows are below the policy's minimum "
                f"of {self.policy.min_rows}: no full window would ever be judged"
            )
        self._watches = {name: _Watch(name) for name in self.models}
        for name in self.models:
            # Series that appear at 0, so increase() sees the first drifted window or event.
            for outcome in ("drifted", "clean", "refused", "failed"):
                CHECKS.labels(name, outcome)
            EVENTS.labels(name)

    async def check(self, model_name: str) -> CheckResult | None:
        """Judge the model's next window when one is due; None when there is nothing to do."""
        watch = self._watches[model_name]
        champion = await self._champion(watch)
        if champion is None or watch.state is None:
            return None
        now = self.clock()
        frame = await self.store.window(
            champion.spec,
            model_name,
            champion.version,
            after=watch.state.last_window_end or EPOCH,
            before=now - self.options.settle,
            limit=self.options.window_rows,
        )
        if not self._due(frame, now):
            return None
        started = time.perf_counter()
        window = window_bounds(frame, PREDICTED_AT_COLUMN)
        judged = await asyncio.to_thread(
            _evaluate, champion, frame, self.policy, model_name, window
        )
        report_uri: str | None = None
        step: EpisodeStep | None = None
        event: DriftDetected | None = None
        if isinstance(judged, WindowRefused):
            verdict: DriftAssessment | WindowRefused = judged
            state = episodes.skip(watch.state, window.end)
        else:
            evaluation, documents = judged
            verdict = evaluation.assessment
            keys = report_keys(
                model_name, champion.version, window.end, prefix=self.options.report_prefix
            )
            report_uri = await self.store_report(keys.json, keys.html, documents)
            step = episodes.advance(
                watch.state, window.end, drifted=verdict.drifted, policy=self.policy
            )
            state = step.state
            if step.drift_holds and step.episode_id is not None:
                event = verdict.to_event(
                    model_name=model_name,
                    model_version=champion.version,
                    window=window,
                    episode_id=step.episode_id,
                    report_uri=report_uri,
                )
                await self.publish(event)
                EVENTS.labels(model_name).inc()
        seconds = time.perf_counter() - started
        await self.store.record(
            WindowRecord(
                model_name=model_name,
                model_version=champion.version,
                window_start=window.start,
                window_end=window.end,
                verdict=verdict,
                step=step,
                report_uri=report_uri,
                event_id=None if event is None else str(event.event_id),
                check_seconds=seconds,
            ),
            state,
        )
        watch.state = state
        result = CheckResult(model_name, champion.version, window, verdict, step, event, report_uri)
        _export(result, state, seconds)
        _log(result)
        return result

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        poll_seconds: float = 2.0,
        backoff_max_seconds: float = 30.0,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        """Check every model until ``stopping``; failures back off, the window is retried."""
        backoff = dict.fromkeys(self.models, 0.0)
        next_try = dict.fromkeys(self.models, 0.0)
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            for name in self.models:
                if stopping.is_set() or loop.time() < next_try[name]:
                    continue
                try:
                    # A backlog (a restart, a burst) is worked off window by window.
                    while not stopping.is_set() and await self.check(name) is not None:
                        pass
                except Exception as error:
                    # The monitor must outlive any single failure; the state did not advance,
                    # so the same window is judged again after the backoff.
                    CHECKS.labels(name, "failed").inc()
                    backoff[name] = min(backoff_max_seconds, max(1.0, backoff[name] * 2))
                    next_try[name] = loop.time() + backoff[name]
                    log.exception("%s: window check failed; retrying in %.0fs", name, backoff[name])
                    if on_error is not None:
                        on_error(name, error)
                else:
                    backoff[name] = 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=poll_seconds)

    def _due(self, frame: pd.DataFrame, now: datetime) -> bool:
        if len(frame) >= self.options.window_rows:
            return True
        if len(frame) < self.policy.min_rows:
            return False
        oldest = pd.Timestamp(frame[PREDICTED_AT_COLUMN].min()).to_pydatetime()
        return bool(now - oldest >= self.options.max_window_age)

    async def _champion(self, watch: _Watch) -> _Champion | None:
        loop = asyncio.get_running_loop()
        refresh = self.options.champion_refresh.total_seconds()
        if watch.champion is None or loop.time() - watch.resolved_at >= refresh:
            version = await asyncio.to_thread(self.champions.champion_version, watch.model_name)
            watch.resolved_at = loop.time()
            if version is None:
                if watch.resolved_version is not None or watch.champion is None:
                    log.warning("%s has no champion: nothing to monitor yet", watch.model_name)
                watch.resolved_version = None
                watch.champion = None
                return None
            watch.resolved_version = version
        if watch.resolved_version is None:
            return None
        if watch.champion is None or watch.champion.version != watch.resolved_version:
            await self._switch(watch, watch.resolved_version)
        return watch.champion

    async def _switch(self, watch: _Watch, version: int) -> None:
        name = watch.model_name
        spec = await asyncio.to_thread(self.champions.feature_spec, name, version)
        reference = await asyncio.to_thread(self.champions.reference, name, version)
        state = watch.state or await self.store.state(name) or episodes.start(name, version)
        followed = episodes.follow(state, version)
        if followed is not state:
            await self.store.save_state(followed)
        watch.state = followed
        watch.champion = _Champion(version, spec, reference)
        CHAMPION_VERSION.labels(name).set(version)
        EPISODE_OPEN.labels(name).set(int(followed.episode_id is not None))
        log.info(
            "%s: monitoring champion version %d against its reference of %d rows",
            name,
            version,
            len(reference),
        )


def _evaluate(
    champion: _Champion,
    frame: pd.DataFrame,
    policy: DriftPolicy,
    model_name: str,
    window: WindowBounds,
) -> WindowRefused | tuple[WindowEvaluation, ReportDocuments]:
    # One worker-thread call: Evidently and the report rendering are both CPU work that must
    # not stall the event loop (metrics endpoint, shutdown signals).
    evaluation = evaluate_window(champion.reference, frame, champion.spec, policy)
    if isinstance(evaluation, WindowRefused):
        return evaluation
    documents = render_report(
        evaluation, model_name=model_name, model_version=champion.version, window=window
    )
    return evaluation, documents


def _export(result: CheckResult, state: EpisodeState, seconds: float) -> None:
    model = result.model_name
    verdict = result.verdict
    CHECK_SECONDS.observe(seconds)
    LAST_CHECK.labels(model).set(time.time())
    WINDOW_ROWS.labels(model).set(verdict.window_rows)
    EPISODE_OPEN.labels(model).set(int(state.episode_id is not None))
    if isinstance(verdict, WindowRefused):
        CHECKS.labels(model, "refused").inc()
        return
    CHECKS.labels(model, "drifted" if verdict.drifted else "clean").inc()
    DRIFT_SHARE.labels(model).set(verdict.drift_share)
    LABELLED_ROWS.labels(model).set(verdict.labelled_rows)
    for feature in verdict.features:
        FEATURE_SCORE.labels(model, feature.name).set(feature.score)
        FEATURE_DRIFTED.labels(model, feature.name).set(int(feature.drifted))
    if verdict.prediction is not None:
        PREDICTION_SCORE.labels(model).set(verdict.prediction.score)
    exported = _quality_exported.setdefault(model, set())
    current = verdict.quality.metrics if verdict.quality is not None else {}
    for metric in exported - current.keys():
        # Too few labels in this window: no quality figure rather than the last window's.
        QUALITY.remove(model, metric)
    for metric, value in current.items():
        QUALITY.labels(model, metric).set(value)
    exported.clear()
    exported.update(current)


def _log(result: CheckResult) -> None:
    verdict = result.verdict
    span = f"{result.window.start:%Y-%m-%d %H:%M:%S}..{result.window.end:%H:%M:%S}"
    if isinstance(verdict, WindowRefused):
        log.warning(
            "%s v%d window %s refused (%s): %s",
            result.model_name,
            result.model_version,
            span,
            verdict.reason.value,
            verdict.detail,
        )
        return
    step = result.step
    log.info(
        "%s v%d window %s: %d rows, drift share %.2f%s%s%s",
        result.model_name,
        result.model_version,
        span,
        verdict.window_rows,
        verdict.drift_share,
        f" ({', '.join(verdict.drifted_features)})" if verdict.drifted_features else "",
        f"; episode {step.episode_id} opened" if step and step.opened else "",
        f"; DriftDetected published ({result.event.event_id})" if result.event else "",
    )
