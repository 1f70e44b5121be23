"""Sketches of logged rows by slice of prediction time: the feature-logger's part of drift.

The feature-logger has every prediction in hand when it writes it, so it sketches the rows
there (``driftloop.drift.sketch``, about 1 µs a row) instead of the monitor reading them back.
Each batch's rows, of those the log took for the first time, are grouped by model, version and
*slice* (``SLICE`` of prediction time, aligned on the epoch), and one ``SliceDelta`` per group
is written in the batch's own transaction: a replayed batch adds neither rows nor sketches, so
a window's merged slices count every logged row exactly once, whatever the crashes, replays or
number of logger replicas.

Slices are fine enough for any window (a window is a whole number of slices), so the logger
knows nothing of windows: a model's window is the monitor's business alone, and can change
without touching the logger. A version whose layout the monitor has not published yet (the
first seconds after a promotion) gets deltas that only count its rows (``unsketched_rows``);
the monitor rebuilds such a window from the log.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import numpy as np
from numpy.typing import NDArray

from driftloop.drift.baseline import PREDICTION_COLUMN
from driftloop.drift.sketch import SketchLayout, WindowSketch
from schemas.events import PredictionEvent

SLICE: Final = timedelta(milliseconds=100)
"""Width of a slice of prediction time; every window is a whole number of slices."""
_SLICE_MICROSECONDS: Final = SLICE // timedelta(microseconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

SLICE_COLUMNS: Final = (
    "model_name",
    "model_version",
    "slice_start",
    "rows",
    "unsketched_rows",
    "sketch",
)


def slice_index(moment: datetime) -> int:
    """The slice a moment falls in, counted from the epoch."""
    # timestamp() is a float within a fraction of a microsecond of the exact count (below 2**53
    # microseconds until the year 2255), so rounding recovers it exactly, 4x faster than
    # timedelta arithmetic.
    return round(moment.timestamp() * 1_000_000) // _SLICE_MICROSECONDS


def slice_moment(index: int) -> datetime:
    """The start of a slice."""
    return _EPOCH + timedelta(microseconds=index * _SLICE_MICROSECONDS)


def align(moment: datetime, span: timedelta) -> datetime:
    """The start of the ``span``-long window (aligned on the epoch) that holds ``moment``."""
    micros = span // timedelta(microseconds=1)
    elapsed = (moment - _EPOCH) // timedelta(microseconds=1)
    return _EPOCH + timedelta(microseconds=(elapsed // micros) * micros)


def check_window(span: timedelta) -> None:
    """Refuse a window that is not a whole number of slices."""
    if span <= timedelta(0) or span % SLICE:
        raise ValueError(f"a window must be a positive multiple of {SLICE}, not {span}")


def encode(sketch: WindowSketch) -> bytes:
    """A sketch as stored: its float64 vector, deflated (mostly zeros for a small batch)."""
    return zlib.compress(sketch.to_bytes(), 1)


def decode(layout: SketchLayout, data: bytes) -> WindowSketch:
    """The inverse of ``encode``; ValueError when it was written in another layout."""
    return WindowSketch.from_bytes(layout, zlib.decompress(data))


@dataclass(frozen=True, slots=True)
class SliceDelta:
    """The rows of one batch first logged in one slice of one model version."""

    model_name: str
    model_version: int
    slice_start: datetime
    rows: int
    unsketched_rows: int
    sketch: bytes | None

    def record(self) -> tuple[object, ...]:
        """The ``drift_sketches`` row, in ``SLICE_COLUMNS`` order."""
        return (
            self.model_name,
            self.model_version,
            self.slice_start,
            self.rows,
            self.unsketched_rows,
            self.sketch,
        )


FetchLayout = Callable[[str, int], Awaitable[str | None]]
"""Reads a version's published layout (JSON), None when there is none."""


class LayoutCache:
    """The published layouts of the versions the logger sees, re-read now and then.

    A layout found is trusted for ``refresh_seconds`` (a monitor calibrating again under a new
    policy republishes it); a missing one is asked for again after ``retry_seconds``, so the
    rows of a version promoted a moment ago are sketched as soon as its layout is published.
    """

    def __init__(
        self,
        fetch: FetchLayout,
        *,
        refresh_seconds: float = 60.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh = refresh_seconds
        self._retry = retry_seconds
        self._clock = clock
        self._known: dict[tuple[str, int], tuple[SketchLayout | None, float]] = {}

    async def prepare(self, versions: Iterable[tuple[str, int]]) -> None:
        """Read the layouts of these versions that are unknown or due again."""
        now = self._clock()
        for key in set(versions):
            known = self._known.get(key)
            if known is not None and now < known[1]:
                continue
            document = await self._fetch(*key)
            layout = None if document is None else SketchLayout.model_validate_json(document)
            due = now + (self._refresh if layout is not None else self._retry)
            self._known[key] = (layout, due)

    def layout(self, model_name: str, model_version: int) -> SketchLayout | None:
        known = self._known.get((model_name, model_version))
        return None if known is None else known[0]


def slice_deltas(events: Sequence[PredictionEvent], layouts: LayoutCache) -> list[SliceDelta]:
    """One delta per model version and slice of ``events`` (rows first logged by this batch)."""
    groups: dict[tuple[str, int, int], list[int]] = {}
    for position, event in enumerate(events):
        key = (event.model_name, event.model_version, slice_index(event.occurred_at))
        groups.setdefault(key, []).append(position)
    deltas = []
    for (model_name, model_version, index), positions in groups.items():
        layout = layouts.layout(model_name, model_version)
        sketch = None
        if layout is not None:
            chosen = [events[position] for position in positions]
            sketch = encode(WindowSketch.of(layout, columns_of(layout, chosen)))
        deltas.append(
            SliceDelta(
                model_name=model_name,
                model_version=model_version,
                slice_start=slice_moment(index),
                rows=len(positions),
                unsketched_rows=0 if sketch is not None else len(positions),
                sketch=sketch,
            )
        )
    return deltas


def columns_of(
    layout: SketchLayout, events: Sequence[PredictionEvent]
) -> dict[str, NDArray[np.float64] | NDArray[np.object_]]:
    """The layout's columns of the events' features (numeric as float64, NaN when missing)."""
    columns: dict[str, NDArray[np.float64] | NDArray[np.object_]] = {}
    for column in layout.columns:
        name = column.name
        if name == PREDICTION_COLUMN:
            columns[name] = np.fromiter(
                (event.prediction for event in events), dtype=np.float64, count=len(events)
            )
        elif column.kind == "numeric":
            # Validated events hold numbers or None here; numpy turns None into NaN.
            columns[name] = np.array(
                [event.features.get(name) for event in events], dtype=np.float64
            )
        else:
            values = np.empty(len(events), dtype=object)
            values[:] = [event.features.get(name) for event in events]
            columns[name] = values
    return columns
