"""The drift monitor's core: judge each closed time window of a champion's traffic, act on it.

For every monitored model, on each round:

1. resolve the ``champion`` alias (cached for ``champion_refresh``); a new version switches the
   episode state (``episodes.follow``), the reference, the declaration and the drift baseline
   (its sketch layout and calibrated thresholds, ``driftloop.drift.baseline``) to that
   version's own, and publishes the layout so the feature-logger sketches its rows; the newest
   registered version's layout is published ahead too, so a promotion finds it there;
2. take the next window: a span of prediction time (the declaration's ``monitoring.window``,
   or ``MonitorOptions.window``) after the last one judged, once it has closed and ``settle``
   has passed, so the logger's last rows are in. A window with fewer rows than the policy's
   minimum takes in the next one, up to ``max_merged_windows``; past that it is refused with
   the reason. Windows with no row are skipped;
3. merge the window's slice sketches (written by the feature-logger with the rows: every
   logged row counts, none is read back). A window holding rows logged before the layout was
   published is sketched from the log instead. Distances against the reference and the
   thresholds for the window's row count give the verdict: a cost per window that does not
   grow with its rows;
4. run Evidently (in a worker thread) on a bounded uniform sample of the window against the
   reference, for the human report and the quality on the labelled rows, and store the report;
5. advance the episode machine; when drift holds, publish ``DriftDetected`` (and wait for the
   broker's ack);
6. write the ``drift_runs`` row, the new state and the deletion of the window's slices in one
   transaction, then export the metrics.

A crash before 6 judges the same window again after the restart, with the same slices: the
same window end gives the same episode id, and the retrain-trigger drops a duplicate event.
Every failure (Postgres, S3, Kafka, MLflow away) leaves the state where it was and is retried
with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

import pandas as pd
from prometheus_client import Counter, Gauge, Histogram

from driftloop.drift import episodes
from driftloop.drift.assessment import (
    PREDICTION_COLUMN,
    DriftAssessment,
    FeatureDrift,
    QualityAssessment,
    RefusalReason,
    WindowBounds,
    WindowEvaluation,
    WindowRefused,
    evaluate_window,
    labelled_quality,
)
from driftloop.drift.baseline import (
    DriftBaseline,
    PreparedBaseline,
    calibrate,
    prepare,
    reference_arrays,
)
from driftloop.drift.episodes import EpisodeState, EpisodeStep
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reports import ReportDocuments, keeps_html, render_report, report_keys
from driftloop.drift.sketch import ColumnDistance, WindowSketch
from driftloop.drift.slices import align, check_window, decode, encode
from driftloop.drift.store import WindowRecord, WindowSlices
from schemas.events import DriftDetected
from schemas.features import FeatureKind, FeatureSpec

log = logging.getLogger(__name__)

# How often the declaration folders are read again for models declared since the start.
DISCOVERY_SECONDS: Final = 30.0

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
FEATURE_THRESHOLD = Gauge(
    "driftloop_drift_feature_threshold",
    "Calibrated threshold of each monitored feature for the last window's row count.",
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
    "Model quality on the labelled rows of the last window's sample (rmse, mae, r2, ...).",
    ["model", "metric"],
)
QUALITY_LIMIT = Gauge(
    "driftloop_drift_quality_limit",
    "The champion's limit of its promotion metric at the last window's labelled rows (its "
    "holdout's 0.99 quantile); past it, the window drifts. Absent when quality was not judged.",
    ["model", "metric"],
)
QUALITY_DEGRADED = Gauge(
    "driftloop_drift_quality_degraded",
    "1 when the last window's promotion metric passed the champion's limit, else 0.",
    ["model"],
)
WINDOW_ROWS = Gauge("driftloop_drift_window_rows", "Rows in the last window.", ["model"])
LABELLED_ROWS = Gauge(
    "driftloop_drift_labelled_rows", "Labelled rows in the last window's sample.", ["model"]
)
ROWS_JUDGED = Counter(
    "driftloop_drift_rows_judged_total",
    "Logged rows counted in judged (or refused) windows.",
    ["model"],
)
LATE_ROWS = Counter(
    "driftloop_drift_late_rows_total",
    "Rows logged for windows already judged (after the settle time): counted, then dropped.",
    ["model"],
)
REBUILT = Counter(
    "driftloop_drift_windows_rebuilt_total",
    "Windows sketched from the log because some rows were logged before their layout existed.",
    ["model"],
)
LAG = Gauge(
    "driftloop_drift_monitor_lag_seconds",
    "Seconds from the last judged window's close to its verdict.",
    ["model"],
)
LAG_SECONDS = Histogram(
    "driftloop_drift_monitor_lag_seconds_distribution",
    "Seconds from a window's close to its verdict.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 90, 120, 300, 600, 1800),
)
SAMPLE_AGREEMENT = Gauge(
    "driftloop_drift_sample_agreement",
    "Share of monitored features whose verdict on the report's sample (Evidently) matched the "
    "window's (sketch) in the last window.",
    ["model"],
)
STAGE_SECONDS = Histogram(
    "driftloop_drift_stage_duration_seconds",
    "Time of each stage of a window's judgement: slices (read and merge the sketches), sample "
    "(the uniform sample's query), judge (distances, Evidently on the sample, rendering), "
    "store (report upload and DriftDetected publish).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
REPORT_FAILURES = Counter(
    "driftloop_drift_report_failures_total",
    "Windows whose Evidently report on the sample failed (judged and recorded without it).",
    ["model"],
)
CHECK_SECONDS = Histogram(
    "driftloop_drift_check_duration_seconds",
    "Time to judge one window: sketches, sample, Evidently report, publish, record.",
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
_limit_metric: dict[str, str] = {}
"""Per model, the metric its exported quality limit is labelled with."""


class ChampionSource(Protocol):
    """Where the monitor learns the champion and that version's reference, spec and baseline."""

    def champion_version(self, model_name: str) -> int | None:
        """The version behind the ``champion`` alias, or None when there is none."""
        ...

    def newest_version(self, model_name: str) -> int | None:
        """The highest registered version, or None when there is none."""
        ...

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        """The reference dataset logged with the version."""
        ...

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        """The feature declaration the version was trained with."""
        ...

    def baseline(self, model_name: str, version: int) -> DriftBaseline | None:
        """The drift baseline logged with the version, None when it has none."""
        ...


class WindowStore(Protocol):
    """Where windows come from and runs go (``driftloop.drift.store.DriftStore``)."""

    async def first_slice(
        self, model_name: str, model_version: int, after: datetime
    ) -> datetime | None: ...

    async def slices(
        self, model_name: str, model_version: int, start: datetime, end: datetime
    ) -> WindowSlices: ...

    async def late_rows(self, model_name: str, model_version: int, before: datetime) -> int: ...

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

    async def sample(
        self,
        spec: FeatureSpec,
        model_name: str,
        model_version: int,
        *,
        start: datetime,
        end: datetime,
        rows: int,
        limit: int,
    ) -> pd.DataFrame: ...

    async def publish_layout(self, model_name: str, model_version: int, layout: str) -> None: ...

    async def forget_other_versions(self, model_name: str, model_version: int) -> int: ...

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

    window: timedelta | None = None
    """Span of every model's windows; None: each declaration's ``monitoring.window``."""
    settle: timedelta = timedelta(seconds=10)
    """How long after a window's close its rows may still be arriving (consumer lag)."""
    max_merged_windows: int = 10
    """A window short of the minimum rows takes in at most this many windows in all."""
    sample_rows: int = 10_000
    """Rows of the uniform sample the Evidently report runs on."""
    champion_refresh: timedelta = timedelta(seconds=5)
    """How long a resolved champion version is trusted before asking MLflow again."""
    report_prefix: str = "drift-reports/"
    clean_html_share: float = 0.05
    """Share of the other windows whose report keeps its HTML. A drifted window that starts a
    drifted streak or opens an episode always does; the drifted windows that go on in an open
    episode are sampled like clean ones, so traffic that stays drifted does not write an HTML
    report per window."""

    def __post_init__(self) -> None:
        if self.window is not None:
            check_window(self.window)
        if self.max_merged_windows < 1 or self.sample_rows < 1:
            raise ValueError("max_merged_windows and sample_rows must be at least 1")


@dataclass(slots=True)
class _Champion:
    version: int
    spec: FeatureSpec
    reference: pd.DataFrame
    baseline: PreparedBaseline
    window: timedelta


@dataclass(slots=True)
class _Watch:
    """What the monitor keeps about one model between rounds."""

    model_name: str
    state: EpisodeState | None = None
    champion: _Champion | None = None
    resolved_at: float = -math.inf
    resolved_version: int | None = None
    published: set[int] = field(default_factory=set)
    """Versions whose layout was published."""
    prepared: dict[int, tuple[FeatureSpec, pd.DataFrame, PreparedBaseline]] = field(
        default_factory=dict
    )
    """The newest version's spec, reference and baseline, ready for when it is promoted."""


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
    lag_seconds: float


@dataclass(slots=True)
class DriftMonitor:
    """Judges time windows of the champions of ``models`` and publishes drift that holds."""

    store: WindowStore
    champions: ChampionSource
    publish: Publish
    store_report: StoreReport
    models: Sequence[str]
    policy: DriftPolicy = field(default_factory=DriftPolicy)
    declared: Callable[[], Sequence[str]] | None = None
    """The models to monitor, asked again while running so a model declared since the start
    is watched too (None: ``models`` only)."""
    options: MonitorOptions = field(default_factory=MonitorOptions)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _watches: dict[str, _Watch] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        names, self.models = self.models, []
        for name in names:
            self.watch(name)

    def watch(self, name: str) -> bool:
        """Monitor ``name`` too; False when it is monitored already."""
        if name in self._watches:
            return False
        self._watches[name] = _Watch(name)
        self.models = [*self.models, name]
        # Series that appear at 0, so increase() sees the first drifted window or event.
        for outcome in ("drifted", "clean", "refused", "failed"):
            CHECKS.labels(name, outcome)
        EVENTS.labels(name)
        ROWS_JUDGED.labels(name)
        LATE_ROWS.labels(name)
        REPORT_FAILURES.labels(name)
        return True

    async def _discover(self) -> None:
        if self.declared is None:
            return
        for name in await asyncio.to_thread(self.declared):
            if self.watch(name):
                log.info("monitoring %s too: declared since the start", name)

    async def check(self, model_name: str) -> CheckResult | None:
        """Judge the model's next window when one is due; None when there is nothing to do."""
        watch = self._watches[model_name]
        champion = await self._champion(watch)
        if champion is None or watch.state is None:
            return None
        span = await self._next_window(watch.state, model_name, champion)
        if span is None:
            return None
        start, end, slices = span
        started = time.perf_counter()
        window = WindowBounds(start=start, end=end)
        late = await self.store.late_rows(model_name, champion.version, start)
        report_uri: str | None = None
        step: EpisodeStep | None = None
        event: DriftDetected | None = None
        sketch: WindowSketch | None = None
        sample_rows = 0
        refused = self._refusal(champion, slices.rows)
        verdict: DriftAssessment | WindowRefused
        if refused is not None:
            verdict = refused
            state = episodes.skip(watch.state, end)
        else:
            marked = time.perf_counter()
            sketch = await self._sketch(model_name, champion, window, slices)
            marked = _stage("slices", marked)
            sample = await self.store.sample(
                champion.spec,
                model_name,
                champion.version,
                start=start,
                end=end,
                rows=slices.rows,
                limit=self.options.sample_rows,
            )
            sample_rows = len(sample)
            marked = _stage("sample", marked)
            # Whether this window, if drifted, starts a streak or opens an episode: then its
            # HTML is kept (the report a DriftDetected links to always has one).
            if_drifted = episodes.advance(watch.state, end, drifted=True, policy=self.policy)
            quiet = watch.state is None or (
                watch.state.episode_id is None and watch.state.drifted_streak == 0
            )
            assessment, documents, agreement = await asyncio.to_thread(
                judge_window,
                champion.spec,
                champion.reference,
                champion.baseline,
                sketch,
                sample,
                self.policy,
                model_name=model_name,
                model_version=champion.version,
                window=window,
                clean_html_share=self.options.clean_html_share,
                notable_drift=quiet or if_drifted.opened,
            )
            marked = _stage("judge", marked)
            verdict = assessment
            SAMPLE_AGREEMENT.labels(model_name).set(agreement)
            keys = report_keys(model_name, champion.version, end, prefix=self.options.report_prefix)
            report_uri = await self.store_report(keys.json, keys.html, documents)
            step = episodes.advance(
                watch.state, end, drifted=assessment.drifted, policy=self.policy
            )
            state = step.state
            if step.drift_holds and step.episode_id is not None:
                event = assessment.to_event(
                    model_name=model_name,
                    model_version=champion.version,
                    window=window,
                    episode_id=step.episode_id,
                    report_uri=report_uri,
                )
                await self.publish(event)
                EVENTS.labels(model_name).inc()
            _stage("store", marked)
        seconds = time.perf_counter() - started
        lag = (self.clock() - end).total_seconds()
        await self.store.record(
            WindowRecord(
                model_name=model_name,
                model_version=champion.version,
                window_start=start,
                window_end=end,
                verdict=verdict,
                step=step,
                report_uri=report_uri,
                event_id=None if event is None else str(event.event_id),
                check_seconds=seconds,
                sketch=None if sketch is None else encode(sketch),
                lag_seconds=lag,
                sample_rows=sample_rows,
                late_rows=late,
            ),
            state,
        )
        watch.state = state
        result = CheckResult(
            model_name, champion.version, window, verdict, step, event, report_uri, lag
        )
        ROWS_JUDGED.labels(model_name).inc(slices.rows)
        if late:
            LATE_ROWS.labels(model_name).inc(late)
            log.warning(
                "%s v%d: %d rows arrived after their window was judged (raise the settle time)",
                model_name,
                champion.version,
                late,
            )
        _export(result, state, seconds)
        _log(result)
        return result

    async def _next_window(
        self, state: EpisodeState, model_name: str, champion: _Champion
    ) -> tuple[datetime, datetime, WindowSlices] | None:
        """The next closed, settled window with rows (merged up to the minimum), if any."""
        after = state.last_window_end or EPOCH
        first = await self.store.first_slice(model_name, champion.version, after)
        if first is None:
            return None
        span = champion.window
        start = max(align(first, span), after)
        end = align(start, span) + span
        now = self.clock()
        if end + self.options.settle > now:
            return None
        slices = await self.store.slices(model_name, champion.version, start, end)
        merged = 1
        while slices.rows < self.policy.min_rows and merged < self.options.max_merged_windows:
            if end + span + self.options.settle > now:
                return None  # the next window is still open: wait for it to merge
            slices = slices + await self.store.slices(model_name, champion.version, end, end + span)
            end += span
            merged += 1
        return start, end, slices

    def _refusal(self, champion: _Champion, rows: int) -> WindowRefused | None:
        baseline = champion.baseline.baseline
        reason: tuple[RefusalReason, str] | None = None
        if not baseline.features:
            reason = (RefusalReason.MISSING_COLUMNS, "the declaration monitors no feature")
        elif rows < self.policy.min_rows:
            reason = (
                RefusalReason.TOO_FEW_ROWS,
                f"{rows} rows in {self.options.max_merged_windows} merged windows, fewer than "
                f"the minimum {self.policy.min_rows}",
            )
        elif baseline.reference_rows < self.policy.min_rows:
            reason = (
                RefusalReason.TOO_FEW_REFERENCE_ROWS,
                f"the reference has {baseline.reference_rows} rows, fewer than the minimum "
                f"{self.policy.min_rows}",
            )
        if reason is None:
            return None
        return WindowRefused(
            reason=reason[0],
            detail=reason[1],
            window_rows=rows,
            reference_rows=baseline.reference_rows,
        )

    async def _sketch(
        self, model_name: str, champion: _Champion, window: WindowBounds, slices: WindowSlices
    ) -> WindowSketch:
        layout = champion.baseline.baseline.layout
        sketch = WindowSketch.empty(layout)
        complete = slices.unsketched_rows == 0
        if complete:
            try:
                for data in slices.sketches:
                    sketch = sketch.merge(decode(layout, data))
            except ValueError:
                complete = False  # written in a layout since replaced: rebuild from the log
        if complete and sketch.rows == slices.rows:
            return sketch
        REBUILT.labels(model_name).inc()
        frame = await self.store.window(
            champion.spec,
            model_name,
            champion.version,
            after=window.start,
            before=window.end,
            limit=max(slices.rows, 1) * 2,
        )
        return await asyncio.to_thread(WindowSketch.of, layout, reference_arrays(frame, layout))

    async def run(
        self,
        stopping: asyncio.Event,
        *,
        poll_seconds: float = 2.0,
        backoff_max_seconds: float = 30.0,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        """Check every model until ``stopping``; failures back off, the window is retried."""
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        next_discovery = loop.time() + DISCOVERY_SECONDS
        while not stopping.is_set():
            if loop.time() >= next_discovery:
                next_discovery = loop.time() + DISCOVERY_SECONDS
                await self._discover()
            for name in self.models:
                backoff.setdefault(name, 0.0)
                if stopping.is_set() or loop.time() < next_try.get(name, 0.0):
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
            await self._publish_newest(watch)
        if watch.resolved_version is None:
            return None
        if watch.champion is None or watch.champion.version != watch.resolved_version:
            await self._switch(watch, watch.resolved_version)
        return watch.champion

    async def _publish_newest(self, watch: _Watch) -> None:
        # A challenger is registered before its promotion: its layout published now lets the
        # logger sketch its very first rows once the gateway swaps to it.
        newest = await asyncio.to_thread(self.champions.newest_version, watch.model_name)
        if newest is None or newest in watch.published:
            return
        await self._baseline(watch, newest)

    async def _baseline(
        self, watch: _Watch, version: int
    ) -> tuple[FeatureSpec, pd.DataFrame, PreparedBaseline]:
        ready = watch.prepared.get(version)
        if ready is not None:
            return ready
        name = watch.model_name
        spec = await asyncio.to_thread(self.champions.feature_spec, name, version)
        reference = await asyncio.to_thread(self.champions.reference, name, version)
        baseline = await asyncio.to_thread(self.champions.baseline, name, version)
        if baseline is None or not baseline.follows(self.policy):
            log.info("%s v%d: calibrating thresholds on its reference", name, version)
            baseline = await asyncio.to_thread(calibrate, spec, reference, self.policy)
        prepared = await asyncio.to_thread(prepare, baseline, reference)
        await self.store.publish_layout(name, version, baseline.layout.model_dump_json())
        watch.published.add(version)
        # Kept: the champion's and the newest version's (a challenger about to be promoted).
        keep = {version, *(v for v in (watch.resolved_version,) if v is not None)}
        watch.prepared = {v: ready for v, ready in watch.prepared.items() if v in keep}
        watch.prepared[version] = (spec, reference, prepared)
        return spec, reference, prepared

    async def _switch(self, watch: _Watch, version: int) -> None:
        name = watch.model_name
        spec, reference, prepared = await self._baseline(watch, version)
        window = self.options.window or spec.monitoring.window
        check_window(window)
        state = watch.state or await self.store.state(name) or episodes.start(name, version)
        followed = episodes.follow(state, version)
        if followed is not state:
            await self.store.save_state(followed)
        watch.state = followed
        watch.champion = _Champion(version, spec, reference, prepared, window)
        # Rows the previous champion served after the switch are no longer judged.
        dropped = await self.store.forget_other_versions(name, version)
        if dropped:
            log.info("%s: dropped %d slices of versions no longer monitored", name, dropped)
        CHAMPION_VERSION.labels(name).set(version)
        EPISODE_OPEN.labels(name).set(int(followed.episode_id is not None))
        thresholds = ", ".join(
            f"{column.name} {column.thresholds[0]:.3g}" for column in prepared.baseline.columns
        )
        log.info(
            "%s: monitoring champion version %d in windows of %s against its reference of %d "
            "rows (thresholds at %d rows: %s)",
            name,
            version,
            window,
            len(reference),
            prepared.baseline.sample_rows[0],
            thresholds,
        )


def judge_window(
    spec: FeatureSpec,
    reference: pd.DataFrame,
    prepared: PreparedBaseline,
    sketch: WindowSketch,
    sample: pd.DataFrame,
    policy: DriftPolicy,
    *,
    model_name: str,
    model_version: int,
    window: WindowBounds,
    clean_html_share: float,
    notable_drift: bool = True,
) -> tuple[DriftAssessment, ReportDocuments, float]:
    """A window's verdict from its sketch, Evidently's report and quality on its sample, and
    the share of features whose verdict on the sample agreed: the monitor's windows and the
    long windows of ``driftloop drift check`` alike. A drifted window keeps its HTML when
    ``notable_drift`` (it starts a streak or opens an episode), else it is sampled like a
    clean one."""
    # One worker-thread call: distances, Evidently and the report rendering are CPU work that
    # must not stall the event loop (metrics endpoint, shutdown signals).
    baseline = prepared.baseline
    distances = prepared.distances(sketch)
    rows = sketch.rows
    thresholds = {name: baseline.threshold(name, rows) for name in baseline.layout.names}
    features = feature_drifts(spec, baseline.features, distances, thresholds)
    prediction = (
        _feature_drift(
            PREDICTION_COLUMN,
            FeatureKind.NUMERIC,
            distances[PREDICTION_COLUMN],
            thresholds[PREDICTION_COLUMN],
        )
        if PREDICTION_COLUMN in distances and not math.isnan(distances[PREDICTION_COLUMN].score)
        else None
    )
    share = sum(feature.drifted for feature in features) / len(features)
    # The report's Evidently run uses the same tests and this window's thresholds, on the
    # sample (judged whatever its size); its quality figures come from its labelled rows.
    # Rows with values beyond Evidently's reach (valid for an unbounded feature, near 1e308:
    # its histograms overflow) stay in the verdict, counted by the sketch, but out of this.
    report_rows = _within_reach(sample, baseline)
    sample_policy = policy.model_copy(update={"min_rows": 1})
    on_sample: WindowEvaluation | None = None
    quality, quality_snapshot, labelled = None, None, 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            evaluation = evaluate_window(
                reference, report_rows, spec, sample_policy, thresholds=thresholds
            )
        if isinstance(evaluation, WindowEvaluation):
            on_sample = evaluation
            quality, labelled = evaluation.assessment.quality, evaluation.assessment.labelled_rows
            quality_snapshot = evaluation.quality_snapshot
    except Exception:
        # The report is for people; the verdict stands without its Evidently part, and the
        # quality figures are computed alone.
        REPORT_FAILURES.labels(model_name).inc()
        log.warning(
            "%s v%d: Evidently failed on the window's sample; recorded without it",
            model_name,
            model_version,
            exc_info=True,
        )
        quality, quality_snapshot, labelled = labelled_quality(report_rows, spec, policy)
    limit, degraded = quality_verdict(baseline, quality)
    assessment = DriftAssessment(
        window_rows=rows,
        reference_rows=baseline.reference_rows,
        features=features,
        drift_share=share,
        drift_share_threshold=policy.drift_share_threshold,
        drifted=share >= policy.drift_share_threshold or degraded,
        prediction=prediction,
        labelled_rows=labelled,
        quality=quality,
        quality_metric=None
        if limit is None or baseline.quality is None
        else baseline.quality.metric,
        quality_limit=limit,
        quality_degraded=degraded,
    )
    agreement = 1.0
    if on_sample is not None:
        verdicts = {feature.name: feature.drifted for feature in on_sample.assessment.features}
        agreement = sum(verdicts.get(f.name) == f.drifted for f in features) / len(features)
    documents = render_report(
        WindowEvaluation(
            assessment,
            None if on_sample is None else on_sample.drift_snapshot,
            quality_snapshot,
        ),
        model_name=model_name,
        model_version=model_version,
        window=window,
        baseline=baseline,
        sample_rows=len(report_rows),
        left_out_rows=len(sample) - len(report_rows),
        with_html=keeps_html(
            model_name,
            model_version,
            window.end,
            notable=assessment.drifted and notable_drift,
            clean_share=clean_html_share,
        ),
    )
    return assessment, documents, agreement


def quality_verdict(
    baseline: DriftBaseline, quality: QualityAssessment | None
) -> tuple[float | None, bool]:
    """The version's limit at the window's labelled rows, and whether its promotion metric is
    past it; (None, False) when the window's quality or the version's calibration is missing."""
    calibration = baseline.quality
    if calibration is None or quality is None or calibration.metric not in quality.metrics:
        return None, False
    rows = quality.labelled_rows
    value = quality.metrics[calibration.metric]
    return calibration.threshold(rows), calibration.degraded(value, rows)


_REACH: Final = 1e100
"""Magnitude past which Evidently's histograms and moments overflow."""


def _within_reach(sample: pd.DataFrame, baseline: DriftBaseline) -> pd.DataFrame:
    keep = pd.Series(True, index=sample.index)
    for column in baseline.layout.columns:
        if column.kind == "numeric" and column.name in sample.columns:
            values = pd.to_numeric(sample[column.name], errors="coerce")
            keep &= ~(values.abs() > _REACH)
    return sample[keep]


def feature_drifts(
    spec: FeatureSpec,
    names: Iterable[str],
    distances: Mapping[str, ColumnDistance],
    thresholds: Mapping[str, float],
) -> tuple[FeatureDrift, ...]:
    """The verdict of each feature in ``names``: its distance to the reference against its
    threshold for the window's size. The monitor's rule, and the offline loop's
    (``driftloop.evaluation.loop_value``)."""
    return tuple(
        _feature_drift(name, spec.feature(name).kind, distances[name], thresholds[name])
        for name in names
    )


def _feature_drift(
    name: str, kind: FeatureKind, distance: ColumnDistance, threshold: float
) -> FeatureDrift:
    # A column with no value in the window (all missing) is at distance 0: nothing moved; a
    # distance past the float range (values near 1e308) is the largest float, for JSON.
    score = 0.0 if math.isnan(distance.score) else min(distance.score, sys.float_info.max)
    return FeatureDrift(
        name=name,
        kind=kind,
        stat_test=distance.stat_test,
        threshold=threshold,
        score=score,
        drifted=score > threshold,
        bound=distance.bound,
    )


def _stage(name: str, since: float) -> float:
    now = time.perf_counter()
    STAGE_SECONDS.labels(name).observe(now - since)
    return now


def _export(result: CheckResult, state: EpisodeState, seconds: float) -> None:
    model = result.model_name
    verdict = result.verdict
    CHECK_SECONDS.observe(seconds)
    LAST_CHECK.labels(model).set(time.time())
    LAG.labels(model).set(result.lag_seconds)
    LAG_SECONDS.observe(result.lag_seconds)
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
        FEATURE_THRESHOLD.labels(model, feature.name).set(feature.threshold)
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
    QUALITY_DEGRADED.labels(model).set(int(verdict.quality_degraded))
    previous = _limit_metric.get(model)
    if verdict.quality_limit is None:
        if previous is not None:
            QUALITY_LIMIT.remove(model, previous)
            del _limit_metric[model]
        return
    metric = verdict.quality_metric or "quality"
    if previous is not None and previous != metric:
        QUALITY_LIMIT.remove(model, previous)
    QUALITY_LIMIT.labels(model, metric).set(verdict.quality_limit)
    _limit_metric[model] = metric


def _log(result: CheckResult) -> None:
    verdict = result.verdict
    span = f"{result.window.start:%Y-%m-%d %H:%M:%S.%f}..{result.window.end:%H:%M:%S.%f}"
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
        "%s v%d window %s: %d rows, drift share %.2f%s%s, judged %.1fs after it closed%s%s",
        result.model_name,
        result.model_version,
        span,
        verdict.window_rows,
        verdict.drift_share,
        f" ({', '.join(verdict.drifted_features)})" if verdict.drifted_features else "",
        f", quality past its limit {verdict.quality_limit:.4g}"
        if verdict.quality_degraded and verdict.quality_limit is not None
        else "",
        result.lag_seconds,
        f"; episode {step.episode_id} opened" if step and step.opened else "",
        f"; DriftDetected published ({result.event.event_id})" if result.event else "",
    )
