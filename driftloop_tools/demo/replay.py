"""The demo replay: the seed data's later months sent through the gateway at an accelerated clock.

Each hour of data is one ``POST /predict`` with a one-row list (the list form gives the row id
``<request id>:0`` the label is sent back under), with ``X-Request-ID`` naming the replay and
the hour. Hours are sent when the accelerated clock reaches them, so gaps in the data (hours
with no row) pass as time too. An hour's true value is sent to ``POST /feedback`` once the
clock has passed the end of that hour, as a real label would arrive. Every non-2xx answer and
transport failure is counted by kind and shown; nothing is retried silently.

The clock can be held (``Replayer.hold``): while the closed-loop demo has a retraining in
flight, no hour is sent and no label falls due, and the clock resumes where it stopped. At 30
simulated hours a second a DAG run of a minute would otherwise be 75 simulated days of traffic
served by the drifted champion; in real time the same minute is under one hourly request. The
served predictions are kept by hour (``ReplayStats.served``) so the demo can score the loop
against the baselines on the same rows.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg
import httpx
import pandas as pd

from driftloop.seed_data import seed_data_path
from driftloop.settings import PostgresSettings
from schemas.features import FeatureSpec
from schemas.fields import FeatureValue

YEAR: Final = 2011
YEAR_START: Final = datetime(YEAR, 1, 1, tzinfo=UTC)
ONE_HOUR: Final = timedelta(hours=1)
ONE_DAY: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class ReplayHour:
    """One hour of the seed data: when it was, the feature row, the true target."""

    day: int
    hour: int
    moment: datetime
    row: dict[str, FeatureValue]
    label: float


@dataclass(frozen=True, slots=True)
class DueLabel:
    """A true value waiting for its hour to pass before it is sent back."""

    due: datetime
    row_id: str
    label: float


@dataclass(slots=True)
class ReplayStats:
    """What the replay has done so far: the progress display and the summary read it."""

    total_hours: int
    hours_sent: int = 0
    predictions: int = 0
    labels_sent: int = 0
    clock: datetime | None = None
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    versions: Counter[int] = field(default_factory=Counter)
    row_ids: list[str] = field(default_factory=list)
    labelled_row_ids: list[str] = field(default_factory=list)
    squared_errors: float = 0.0
    recent: deque[tuple[datetime, float]] = field(default_factory=deque)
    served: dict[datetime, float] = field(default_factory=dict)
    """The prediction served for each replayed hour."""
    held_seconds: float = 0.0
    """Real seconds the clock was held (retrainings in flight)."""
    holds_timed_out: int = 0
    """Holds released by the replayer's own limit rather than by the loop."""
    holds: list[tuple[datetime, datetime | None]] = field(default_factory=list)
    """Real (UTC) intervals the clock was held; the last is open while it holds."""

    def record_error(self, kind: str, detail: str) -> None:
        """Count one failed call by kind and keep its detail for the display."""
        self.errors[kind] += 1
        self.last_error = f"{kind}: {detail[:200]}"

    def record_prediction(self, moment: datetime, prediction: float, truth: float) -> None:
        """Keep a served prediction's squared error (overall, and for the last day)."""
        squared = (prediction - truth) ** 2
        self.squared_errors += squared
        self.recent.append((moment, squared))
        self.served[moment] = prediction

    def last_day_rmse(self) -> float | None:
        """RMSE over the 24 replayed hours before the latest answered one."""
        if not self.recent:
            return None
        latest = max(moment for moment, _ in self.recent)
        while self.recent and self.recent[0][0] <= latest - ONE_DAY:
            self.recent.popleft()
        window = [squared for moment, squared in self.recent if moment > latest - ONE_DAY]
        return math.sqrt(sum(window) / len(window))

    def rmse(self) -> float | None:
        """RMSE of every served prediction against the truth."""
        return math.sqrt(self.squared_errors / self.predictions) if self.predictions else None

    @property
    def error_count(self) -> int:
        """Failed calls of every kind."""
        return sum(self.errors.values())


def day_of_year(month_day: str) -> int:
    """Day of the year 2011 (1 = Jan 1) of ``MM-DD``."""
    try:
        month, day = (int(part) for part in month_day.split("-"))
        return date(YEAR, month, day).timetuple().tm_yday
    except ValueError as error:
        raise ValueError(f"{month_day!r} is not a day of {YEAR} written MM-DD") from error


def replay_hours(
    spec: FeatureSpec, frame: pd.DataFrame, *, first_day: int, last_day: int
) -> list[ReplayHour]:
    """The hours from ``first_day`` to ``last_day`` (days of the year, inclusive) in time order."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    if first_day > last_day:
        raise ValueError("the replay ends before it starts")
    day_column, hour_column = spec.dataset.order_by
    chosen = frame[(frame[day_column] >= first_day) & (frame[day_column] <= last_day)]
    ordered = chosen.sort_values([day_column, hour_column], kind="stable")
    hours = []
    for record in ordered.to_dict(orient="records"):
        day, hour = int(record[day_column]), int(record[hour_column])
        hours.append(
            ReplayHour(
                day=day,
                hour=hour,
                moment=YEAR_START + timedelta(days=day - 1, hours=hour),
                row={name: _plain(record[name]) for name in spec.feature_names},
                label=float(record[spec.target.name]),
            )
        )
    return hours


def load_replay_hours(spec: FeatureSpec, *, first_day: int, last_day: int) -> list[ReplayHour]:
    """The replayed hours of the declaration's seed data."""
    if spec.dataset is None:
        raise ValueError(f"feature declaration {spec.name} ships no dataset")
    # Read here rather than with driftloop.training.trainer.read_dataset: that module imports MLflow
    # and LightGBM, which the replay does not need (and which take seconds to import).
    frame = pd.read_csv(seed_data_path(spec.dataset.path))
    return replay_hours(spec, frame, first_day=first_day, last_day=last_day)


def hour_request_id(replay_id: str, hour: ReplayHour) -> str:
    """``X-Request-ID`` of one replayed hour: the replay, the day of the year and the hour."""
    return f"{replay_id}-d{hour.day:03d}h{hour.hour:02d}"


def new_replay_id() -> str:
    """A replay id that sorts by start time and does not repeat."""
    return f"replay-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def take_due(waiting: list[DueLabel], clock: datetime) -> list[DueLabel]:
    """Remove and return the labels whose hour has passed at ``clock``."""
    due = [label for label in waiting if label.due <= clock]
    waiting[:] = [label for label in waiting if label.due > clock]
    return due


class Replayer:
    """Sends hours through /predict on the accelerated clock and their labels to /feedback."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        hours: Sequence[ReplayHour],
        *,
        replay_id: str,
        hours_per_second: float,
        concurrency: int = 8,
        max_hold_seconds: float | None = None,
    ) -> None:
        if hours_per_second <= 0:
            raise ValueError("the clock must run forward")
        self.client = client
        self.hours = hours
        self.replay_id = replay_id
        self.hours_per_second = hours_per_second
        self.stats = ReplayStats(total_hours=len(hours))
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting: list[DueLabel] = []
        # Set: the clock runs; cleared by hold(), set again by release().
        self._running = asyncio.Event()
        self._running.set()
        # A hold nobody releases (a watcher that missed the run's end) must not stop the demo.
        self.max_hold_seconds = max_hold_seconds

    def hold(self) -> None:
        """Stop the clock before the next hour (a retraining is in flight)."""
        self._running.clear()

    def release(self) -> None:
        """Let the clock run on from where it was held."""
        self._running.set()

    async def _wait_while_held(self) -> float:
        # The real seconds held: the schedule of the remaining hours moves by as much.
        if self._running.is_set():
            return 0.0
        loop = asyncio.get_running_loop()
        held_at = loop.time()
        # The wall clock too: the demo maps the logged rows' times back to simulated time.
        self.stats.holds.append((datetime.now(UTC), None))
        try:
            await asyncio.wait_for(self._running.wait(), timeout=self.max_hold_seconds)
        except TimeoutError:
            self.stats.holds_timed_out += 1
            self._running.set()
        self.stats.holds[-1] = (self.stats.holds[-1][0], datetime.now(UTC))
        held = loop.time() - held_at
        self.stats.held_seconds += held
        return held

    async def run(self) -> ReplayStats:
        """Replay every hour, then send the labels still due; the stats of the whole run."""
        if not self.hours:
            return self.stats
        loop = asyncio.get_running_loop()
        started = loop.time()
        origin = self.hours[0].moment
        async with asyncio.TaskGroup() as group:
            for hour in self.hours:
                offset = (hour.moment - origin) / ONE_HOUR / self.hours_per_second
                await asyncio.sleep(max(0.0, started + offset - loop.time()))
                started += await self._wait_while_held()
                self.stats.clock = hour.moment
                await self._send_labels(take_due(self._waiting, hour.moment))
                # Backpressure: a slow gateway slows the replay instead of piling up requests.
                await self._slots.acquire()
                group.create_task(self._predict(hour))
        end = self.hours[-1].moment + ONE_HOUR
        offset = (end - origin) / ONE_HOUR / self.hours_per_second
        await asyncio.sleep(max(0.0, started + offset - loop.time()))
        self.stats.clock = end
        await self._send_labels(take_due(self._waiting, end))
        return self.stats

    async def _predict(self, hour: ReplayHour) -> None:
        request_id = hour_request_id(self.replay_id, hour)
        try:
            response = await self.client.post(
                "/predict", json=[hour.row], headers={"X-Request-ID": request_id}
            )
        except httpx.HTTPError as error:
            self.stats.record_error(f"predict {type(error).__name__}", str(error))
            return
        finally:
            self._slots.release()
            self.stats.hours_sent += 1
        if response.status_code != httpx.codes.OK:
            self.stats.record_error(f"predict {response.status_code}", response.text)
            return
        body: dict[str, Any] = response.json()
        (answer,) = body["predictions"]
        self.stats.predictions += 1
        self.stats.versions[int(body["model_version"])] += 1
        self.stats.row_ids.append(answer["request_id"])
        self.stats.record_prediction(hour.moment, float(answer["prediction"]), hour.label)
        self._waiting.append(DueLabel(hour.moment + ONE_HOUR, answer["request_id"], hour.label))

    async def _send_labels(self, labels: Sequence[DueLabel]) -> None:
        if not labels:
            return
        body = [{"request_id": label.row_id, "label": label.label} for label in labels]
        try:
            response = await self.client.post("/feedback", json=body)
        except httpx.HTTPError as error:
            self.stats.record_error(f"feedback {type(error).__name__}", str(error))
            return
        if response.status_code != httpx.codes.ACCEPTED:
            self.stats.record_error(f"feedback {response.status_code}", response.text)
            return
        self.stats.labels_sent += len(labels)
        self.stats.labelled_row_ids.extend(label.row_id for label in labels)


async def wait_for_champion(client: httpx.AsyncClient, *, timeout_seconds: float) -> int:
    """Poll the gateway's readiness until it serves a model; that model's version."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    last = "no answer"
    while True:
        try:
            response = await client.get("/health/ready")
            body = response.json()
            if response.status_code == httpx.codes.OK and body.get("model"):
                return int(body["model"]["version"])
            last = str(body.get("reason") or response.status_code)
        except (httpx.HTTPError, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
        if loop.time() >= deadline:
            raise TimeoutError(f"the gateway serves no model after {timeout_seconds:.0f} s: {last}")
        await asyncio.sleep(1.0)


@dataclass(frozen=True, slots=True)
class LogCheck:
    """How many of the replay's rows the feature logger wrote, and of its labels."""

    predictions_logged: int
    labels_joined: int
    seconds_waited: float


async def wait_for_log(
    settings: PostgresSettings,
    row_ids: Sequence[str],
    labelled_row_ids: Sequence[str],
    *,
    timeout_seconds: float,
    schema: str = "public",
) -> LogCheck:
    """Poll ``prediction_log`` and ``labels`` until they hold every replayed row, or time out."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    connection = await asyncpg.connect(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password.get_secret_value(),
        database=settings.db,
        server_settings={"search_path": schema},
    )
    try:
        while True:
            logged = await connection.fetchval(
                "SELECT count(*) FROM prediction_log WHERE request_id = ANY($1::text[])",
                list(row_ids),
            )
            joined = await connection.fetchval(
                "SELECT count(*) FROM labels WHERE request_id = ANY($1::text[])",
                list(labelled_row_ids),
            )
            waited = loop.time() - started
            complete = logged >= len(row_ids) and joined >= len(labelled_row_ids)
            if complete or waited >= timeout_seconds:
                return LogCheck(int(logged), int(joined), waited)
            await asyncio.sleep(1.0)
    finally:
        await connection.close()


def _plain(value: Any) -> FeatureValue:
    # Rows go out as JSON and the gateway's row model is strict: numpy scalars become Python
    # ones, and a missing value is null rather than NaN (which JSON cannot carry).
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or isinstance(value, (int, float, str)):
        return value
    raise TypeError(f"cannot send {value!r} as a feature value")
