"""The drift monitor's core on time windows, against in-memory fakes of the log and the registry.

The fake store keeps logged rows and sketches them as the feature-logger does: with the layout
the monitor published for their version, or not at all when none was published when they were
logged. Sketches, calibration and Evidently run for real on the Bike Sharing data: winter rows
against a winter reference stay clean, summer rows drift.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest

from driftloop.drift.assessment import PREDICTION_COLUMN, DriftAssessment, RefusalReason
from driftloop.drift.baseline import DriftBaseline, calibrate, reference_arrays
from driftloop.drift.episodes import EpisodeState
from driftloop.drift.monitor import CheckResult, DriftMonitor, MonitorOptions
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.reports import ReportDocuments
from driftloop.drift.sketch import SketchLayout, WindowSketch
from driftloop.drift.slices import encode
from driftloop.drift.store import PREDICTED_AT_COLUMN, WindowRecord, WindowSlices
from driftloop.training import trainer
from schemas.events import DriftDetected
from schemas.features import FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit

SPEC = load_feature_spec("bikeshare")
MODEL = "bikeshare"
START = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)  # a multiple of the window since the epoch
WINDOW = timedelta(seconds=150)
ROWS = 150  # one row a second: a full window
POLICY = DriftPolicy(min_rows=100)


def logged(frame: pd.DataFrame, version: int, first: datetime) -> pd.DataFrame:
    """Rows as the log holds them: one a second from ``first``, prediction = the truth."""
    rows = frame[[*SPEC.feature_names, SPEC.target.name]].reset_index(drop=True).copy()
    rows[PREDICTION_COLUMN] = rows[SPEC.target.name].astype("float64")
    rows[PREDICTED_AT_COLUMN] = [first + timedelta(seconds=i) for i in range(len(rows))]
    rows["version"] = version
    return rows


@dataclass
class FakeStore:
    rows: pd.DataFrame
    states: dict[str, EpisodeState] = field(default_factory=dict)
    records: list[WindowRecord] = field(default_factory=list)
    layouts: dict[int, SketchLayout] = field(default_factory=dict)
    unsketched: set[int] = field(default_factory=set)
    """Versions whose rows were logged before their layout was published."""
    dropped: dict[int, datetime] = field(default_factory=dict)
    published: list[int] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)

    def _live(self, version: int) -> pd.DataFrame:
        rows = self.rows[self.rows["version"] == version]
        cut = self.dropped.get(version)
        # A judged window's slices are deleted; rows logged later for it are "late".
        return (
            rows
            if cut is None
            else rows[rows["logged_after_cut"]]
            if "logged_after_cut" in rows
            else rows[rows[PREDICTED_AT_COLUMN] >= cut]
        )

    def _span(self, version: int, start: datetime, end: datetime) -> pd.DataFrame:
        rows = self._live(version)
        moments = rows[PREDICTED_AT_COLUMN]
        return rows[(moments >= start) & (moments < end)]

    async def first_slice(
        self, model_name: str, model_version: int, after: datetime
    ) -> datetime | None:
        rows = self._live(model_version)
        later = rows[rows[PREDICTED_AT_COLUMN] >= after]
        return None if later.empty else later[PREDICTED_AT_COLUMN].min().to_pydatetime()

    async def slices(
        self, model_name: str, model_version: int, start: datetime, end: datetime
    ) -> WindowSlices:
        rows = self._span(model_version, start, end)
        if rows.empty:
            return WindowSlices()
        layout = self.layouts.get(model_version)
        if layout is None or model_version in self.unsketched:
            return WindowSlices(rows=len(rows), unsketched_rows=len(rows))
        halves = [rows.iloc[: len(rows) // 2], rows.iloc[len(rows) // 2 :]]
        sketches = tuple(
            encode(WindowSketch.of(layout, reference_arrays(part, layout))) for part in halves
        )
        return WindowSlices(rows=len(rows), sketches=sketches)

    async def late_rows(self, model_name: str, model_version: int, before: datetime) -> int:
        rows = self._live(model_version)
        return int((rows[PREDICTED_AT_COLUMN] < before).sum())

    async def window(
        self,
        spec: FeatureSpec,
        model_name: str,
        model_version: int,
        *,
        after: datetime,
        before: datetime,
        limit: int,
    ) -> pd.DataFrame:
        return self._span(model_version, after, before).head(limit).drop(columns="version")

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
    ) -> pd.DataFrame:
        span = self._span(model_version, start, end).drop(columns="version")
        return span.sample(n=min(limit, len(span)), random_state=0)

    async def publish_layout(self, model_name: str, model_version: int, layout: str) -> None:
        self.layouts[model_version] = SketchLayout.model_validate_json(layout)
        self.published.append(model_version)

    async def forget_other_versions(self, model_name: str, model_version: int) -> int:
        self.forgotten.append(model_version)
        return 0

    async def state(self, model_name: str) -> EpisodeState | None:
        return self.states.get(model_name)

    async def save_state(self, state: EpisodeState) -> None:
        self.states[state.model_name] = state

    async def record(self, record: WindowRecord, state: EpisodeState) -> bool:
        if any(r.window_end == record.window_end for r in self.records):
            return False
        self.records.append(record)
        self.states[state.model_name] = state
        self.dropped[record.model_version] = record.window_end
        return True


@dataclass
class FakeChampions:
    version: int
    references: dict[int, pd.DataFrame]
    baselines: dict[int, DriftBaseline] = field(default_factory=dict)

    def champion_version(self, model_name: str) -> int | None:
        return self.version

    def newest_version(self, model_name: str) -> int | None:
        return max(self.references)

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        return self.references[version]

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        return SPEC

    def baseline(self, model_name: str, version: int) -> DriftBaseline | None:
        return self.baselines.get(version)


@dataclass
class Rig:
    monitor: DriftMonitor
    store: FakeStore
    champions: FakeChampions
    published: list[DriftDetected]
    reports: dict[str, bytes]
    now: list[datetime]


@pytest.fixture(scope="module")
def seasons() -> dict[str, pd.DataFrame]:
    data = trainer.read_dataset(SPEC)
    return {
        "winter": data[data["mnth"].isin(["Jan", "Feb"])].reset_index(drop=True),
        "summer": data[data["mnth"].isin(["July", "Aug"])].reset_index(drop=True),
    }


def winter_rows(seasons: dict[str, pd.DataFrame], count: int) -> pd.DataFrame:
    return seasons["winter"].iloc[500 : 500 + count]


def rig(
    rows: pd.DataFrame,
    references: dict[int, pd.DataFrame],
    store: FakeStore | None = None,
    **options: object,
) -> Rig:
    store = store or FakeStore(rows)
    champions = FakeChampions(version=1, references=references)
    published: list[DriftDetected] = []
    reports: dict[str, bytes] = {}
    last = rows[PREDICTED_AT_COLUMN].max() if len(rows) else START
    now = [pd.Timestamp(last).to_pydatetime() + timedelta(hours=1)]

    async def publish(event: DriftDetected) -> None:
        published.append(event)

    async def store_report(json_key: str, html_key: str, documents: ReportDocuments) -> str:
        reports[json_key] = documents.json
        if documents.html is not None:
            reports[html_key] = documents.html
        return f"s3://bucket/{json_key}"

    monitor = DriftMonitor(
        store=store,
        champions=champions,
        publish=publish,
        store_report=store_report,
        models=[MODEL],
        policy=POLICY,
        options=replace(
            MonitorOptions(window=WINDOW, champion_refresh=timedelta(0), sample_rows=120),
            **options,  # type: ignore[arg-type]
        ),
        clock=lambda: now[0],
    )
    return Rig(monitor, store, champions, published, reports, now)


def drifted(result: CheckResult | None) -> bool:
    """Whether the check judged a window and found it drifted."""
    assert result is not None
    assert isinstance(result.verdict, DriftAssessment), result.verdict
    return result.verdict.drifted


def reference(frame: pd.DataFrame) -> pd.DataFrame:
    return logged(frame, 0, START - timedelta(days=1)).drop(columns=["version"])


async def test_winter_stays_quiet_and_summer_opens_one_episode(
    seasons: dict[str, pd.DataFrame],
) -> None:
    winter = logged(winter_rows(seasons, ROWS), 1, START)
    summer = logged(seasons["summer"].iloc[: 3 * ROWS], 1, START + WINDOW)
    r = rig(pd.concat([winter, summer], ignore_index=True), {1: reference(seasons["winter"])})

    first = await r.monitor.check(MODEL)
    assert first is not None
    assert (first.window.start, first.window.end) == (START, START + WINDOW)
    assert not drifted(first)
    assert r.published == []
    second = await r.monitor.check(MODEL)
    assert drifted(second)
    assert r.published == []  # one drifted window is not yet drift
    third = await r.monitor.check(MODEL)
    assert third is not None
    assert third.step is not None
    assert third.step.opened
    (event,) = r.published
    assert event.episode_id == third.step.episode_id
    assert {"temp", "atemp"} <= set(event.drifted_features)
    assert event.report_uri in {f"s3://bucket/{key}" for key in r.reports}
    fourth = await r.monitor.check(MODEL)
    assert fourth is not None
    assert [e.episode_id for e in r.published] == [event.episode_id] * 2
    # Windows are consecutive spans of prediction time: each starts where the last ended.
    records = r.store.records
    assert all(a.window_end == b.window_start for a, b in itertools.pairwise(records))
    assert [record.verdict.window_rows for record in records] == [ROWS] * 4
    assert await r.monitor.check(MODEL) is None  # nothing left
    assert r.store.states[MODEL].episode_id == event.episode_id
    assert r.store.published == [1]  # the layout the logger sketches with


async def test_the_verdict_uses_thresholds_calibrated_for_the_window(
    seasons: dict[str, pd.DataFrame],
) -> None:
    summer = logged(seasons["summer"].iloc[:ROWS], 1, START)
    r = rig(summer, {1: reference(seasons["winter"])})
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert isinstance(result.verdict, DriftAssessment)
    baseline = calibrate(SPEC, reference(seasons["winter"]), POLICY)
    for feature in result.verdict.features:
        assert feature.threshold == pytest.approx(baseline.threshold(feature.name, ROWS))
        assert feature.drifted == (feature.score > feature.threshold)
    assert result.report_uri is not None
    report = orjson.loads(r.reports[result.report_uri.removeprefix("s3://bucket/")])
    assert report["thresholds"]["quantile"] == 0.99
    assert report["thresholds"]["sampling"] == "time_blocks"
    assert report["evidently"]["sample_rows"] == 120
    assert report["evidently"]["drift"] is not None


async def test_a_stored_baseline_is_used_when_it_follows_the_policy(
    seasons: dict[str, pd.DataFrame],
) -> None:
    summer = logged(seasons["summer"].iloc[:ROWS], 1, START)
    ref = reference(seasons["winter"])
    r = rig(summer, {1: ref})
    explicit = calibrate(SPEC, ref, POLICY.model_copy(update={"feature_thresholds": {"hum": 9.0}}))
    r.champions.baselines[1] = explicit  # calibrated under another policy: not used
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert isinstance(result.verdict, DriftAssessment)
    hum = next(f for f in result.verdict.features if f.name == "hum")
    assert hum.threshold != 9.0


async def test_an_open_or_unsettled_window_waits(seasons: dict[str, pd.DataFrame]) -> None:
    rows = logged(winter_rows(seasons, ROWS), 1, START)
    r = rig(rows, {1: reference(seasons["winter"])}, settle=timedelta(seconds=30))
    r.now[0] = START + WINDOW - timedelta(seconds=1)  # still open
    assert await r.monitor.check(MODEL) is None
    r.now[0] = START + WINDOW + timedelta(seconds=29)  # closed, not settled
    assert await r.monitor.check(MODEL) is None
    r.now[0] = START + WINDOW + timedelta(seconds=30)
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert result.lag_seconds == 30


async def test_a_thin_window_merges_into_the_next(seasons: dict[str, pd.DataFrame]) -> None:
    thin = logged(winter_rows(seasons, 60), 1, START)
    more = logged(seasons["winter"].iloc[700:760], 1, START + WINDOW + timedelta(seconds=10))
    r = rig(pd.concat([thin, more], ignore_index=True), {1: reference(seasons["winter"])})
    r.now[0] = START + WINDOW + timedelta(seconds=100)  # the second window is still open
    assert await r.monitor.check(MODEL) is None
    r.now[0] = START + 3 * WINDOW
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert (result.window.start, result.window.end) == (START, START + 2 * WINDOW)
    assert result.verdict.window_rows == 120


async def test_too_few_rows_in_all_merged_windows_is_refused_with_the_reason(
    seasons: dict[str, pd.DataFrame],
) -> None:
    thin = logged(winter_rows(seasons, 30), 1, START)
    later = logged(seasons["winter"].iloc[700 : 700 + ROWS], 1, START + 10 * WINDOW)
    r = rig(
        pd.concat([thin, later], ignore_index=True),
        {1: reference(seasons["winter"])},
        max_merged_windows=3,
    )
    refused = await r.monitor.check(MODEL)
    assert refused is not None
    assert refused.verdict.outcome == "refused"
    assert refused.verdict.reason is RefusalReason.TOO_FEW_ROWS
    assert refused.window.end == START + 3 * WINDOW
    assert refused.step is None
    assert r.reports == {}
    assert r.store.states[MODEL].drifted_streak == 0
    judged = await r.monitor.check(MODEL)  # the gap is skipped: the next window with rows
    assert judged is not None
    assert judged.window.start == START + 10 * WINDOW
    assert judged.verdict.window_rows == ROWS


async def test_rows_logged_before_the_layout_are_judged_from_the_log(
    seasons: dict[str, pd.DataFrame],
) -> None:
    summer = logged(seasons["summer"].iloc[:ROWS], 1, START)
    sketched = rig(summer, {1: reference(seasons["winter"])})
    from_log = rig(summer, {1: reference(seasons["winter"])})
    from_log.store.unsketched.add(1)
    a = await sketched.monitor.check(MODEL)
    b = await from_log.monitor.check(MODEL)
    assert a is not None
    assert b is not None
    assert isinstance(a.verdict, DriftAssessment)
    assert isinstance(b.verdict, DriftAssessment)
    assert [f.score for f in a.verdict.features] == pytest.approx(
        [f.score for f in b.verdict.features]
    )
    assert b.verdict.window_rows == ROWS


async def test_rows_arriving_after_their_window_was_judged_are_counted(
    seasons: dict[str, pd.DataFrame],
) -> None:
    first = logged(winter_rows(seasons, ROWS), 1, START)
    r = rig(first, {1: reference(seasons["winter"])})
    judged = await r.monitor.check(MODEL)
    assert judged is not None
    late = logged(seasons["winter"].iloc[0:5], 1, START + timedelta(seconds=3))
    late["logged_after_cut"] = True
    later = logged(seasons["winter"].iloc[900 : 900 + ROWS], 1, START + WINDOW)
    rows = pd.concat([first.assign(logged_after_cut=False), late, later], ignore_index=True)
    rows.loc[rows[PREDICTED_AT_COLUMN] >= START + WINDOW, "logged_after_cut"] = True
    r.store.rows = rows
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert r.store.records[-1].late_rows == 5
    assert result.verdict.window_rows == ROWS


async def test_a_failed_publish_repeats_the_window(seasons: dict[str, pd.DataFrame]) -> None:
    summer = logged(seasons["summer"].iloc[: 2 * ROWS], 1, START)
    r = rig(summer, {1: reference(seasons["winter"])})
    await r.monitor.check(MODEL)
    failures = [RuntimeError("broker away")]
    sent = r.monitor.publish

    async def flaky(event: DriftDetected) -> None:
        if failures:
            raise failures.pop()
        await sent(event)

    r.monitor.publish = flaky
    with pytest.raises(RuntimeError):
        await r.monitor.check(MODEL)
    assert len(r.store.records) == 1  # the failed window was not recorded
    again = await r.monitor.check(MODEL)
    assert again is not None
    assert again.event is not None
    assert r.store.records[-1].window_end == again.window.end
    assert len(r.published) == 1


async def test_a_restarted_monitor_judges_each_window_once(
    seasons: dict[str, pd.DataFrame],
) -> None:
    rows = logged(seasons["summer"].iloc[: 4 * ROWS], 1, START)
    first = rig(rows, {1: reference(seasons["winter"])})
    await first.monitor.check(MODEL)
    await first.monitor.check(MODEL)
    # A new process over the same store (the state and the slices left in Postgres).
    second = rig(rows, {1: reference(seasons["winter"])}, store=first.store)
    while await second.monitor.check(MODEL) is not None:
        pass
    ends = [record.window_end for record in first.store.records]
    assert ends == [START + k * WINDOW for k in range(1, 5)]
    assert sum(record.verdict.window_rows for record in first.store.records) == len(rows)


async def test_a_new_champion_switches_reference_and_episode(
    seasons: dict[str, pd.DataFrame],
) -> None:
    v1 = logged(seasons["summer"].iloc[: 2 * ROWS], 1, START)
    v2 = logged(seasons["summer"].iloc[2 * ROWS : 3 * ROWS], 2, START + 4 * WINDOW)
    references = {1: reference(seasons["winter"]), 2: reference(seasons["summer"])}
    r = rig(pd.concat([v1, v2], ignore_index=True), references)
    await r.monitor.check(MODEL)
    await r.monitor.check(MODEL)
    assert r.store.states[MODEL].episode_id is not None
    assert sorted(set(r.store.published)) == [1, 2]  # the newest version's layout, ahead
    r.champions.version = 2
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert result.model_version == 2
    assert not drifted(result)  # summer against summer
    state = r.store.states[MODEL]
    assert state.model_version == 2
    assert state.episode_id is None
    assert r.store.forgotten == [1, 2]  # each switch drops the slices of other versions


def test_a_window_must_be_whole_slices() -> None:
    with pytest.raises(ValueError, match="multiple"):
        MonitorOptions(window=timedelta(milliseconds=150))
    assert np.isclose(MonitorOptions(window=timedelta(seconds=5.6)).window.total_seconds(), 5.6)  # type: ignore[union-attr]


async def test_valid_extreme_values_are_judged_and_left_out_of_the_evidently_sample(
    seasons: dict[str, pd.DataFrame],
) -> None:
    """Unbounded features accept values near 1e308: sums overflow, Evidently's histograms too."""
    rows = logged(winter_rows(seasons, ROWS), 1, START)
    rows.loc[rows.index[:40], "temp"] = 1.7e308
    rows.loc[rows.index[40:60], "windspeed"] = -1.7e308
    r = rig(rows, {1: reference(seasons["winter"])})
    result = await r.monitor.check(MODEL)
    assert result is not None
    assert isinstance(result.verdict, DriftAssessment)
    scores = {feature.name: feature for feature in result.verdict.features}
    assert scores["temp"].drifted
    assert scores["temp"].score > 1e6
    assert r.store.records[-1].window_end == START + WINDOW
    assert result.report_uri is not None
    report = orjson.loads(r.reports[result.report_uri.removeprefix("s3://bucket/")])
    assert report["assessment"]["drift_share"] == result.verdict.drift_share
    left_out = report["evidently"]["left_out_rows"]
    assert 0 < left_out <= 60
    assert report["evidently"]["sample_rows"] == 120 - left_out
    assert report["evidently"]["drift"] is not None  # Evidently ran on the rest
    assert result.verdict.quality is not None  # labels came with the rows


async def test_a_model_declared_while_running_is_monitored(
    seasons: dict[str, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("driftloop.drift.monitor.DISCOVERY_SECONDS", 0.0)
    rows = logged(seasons["summer"].iloc[: 2 * ROWS], 1, START)
    started = rig(rows, {1: reference(seasons["winter"])})
    assert list(started.monitor.models) == [MODEL]
    stopping = asyncio.Event()

    def declared() -> list[str]:
        # Declared since the start; the run stops after the round that asked.
        stopping.set()
        return [MODEL, "churn"]

    started.monitor.declared = declared
    await started.monitor.run(stopping, poll_seconds=0.01)
    assert list(started.monitor.models) == [MODEL, "churn"]
    assert started.monitor.watch("churn") is False


async def test_html_is_kept_where_drift_starts_and_the_episode_opens_not_for_every_window(
    seasons: dict[str, pd.DataFrame],
) -> None:
    winter = logged(winter_rows(seasons, ROWS), 1, START)
    summer = logged(seasons["summer"].iloc[: 4 * ROWS], 1, START + WINDOW)
    r = rig(
        pd.concat([winter, summer], ignore_index=True),
        {1: reference(seasons["winter"])},
        clean_html_share=0.0,
    )
    results = []
    while (result := await r.monitor.check(MODEL)) is not None:
        results.append(result)
    assert [drifted(result) for result in results] == [False, True, True, True, True]
    assert results[2].step is not None
    assert results[2].step.opened
    with_html = [
        result.window.end
        for result in results
        if result.report_uri is not None
        and result.report_uri.removeprefix("s3://bucket/").replace(".json", ".html.gz") in r.reports
    ]
    # The first drifted window and the one that opened the episode; not the clean one, nor the
    # drifted windows that went on inside the open episode.
    assert with_html == [results[1].window.end, results[2].window.end]
    (event, *_) = r.published
    assert event.report_uri == results[2].report_uri
