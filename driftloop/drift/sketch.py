"""Mergeable window sketches: a window's distribution in fixed bins, at a few numbers per bin.

A ``SketchLayout`` is taken from a model version's reference dataset once, when the version is
calibrated (``driftloop.drift.baseline``):

- a numeric column gets bins cut at the reference's quantiles (at most ``bins`` of them, fewer
  when the reference has fewer distinct values, plus two open tails), and its reference
  standard deviation, the norm of Evidently's normed Wasserstein distance;
- a categorical column gets one slot per category (the declared ones, then any other value the
  reference holds).

A ``WindowSketch`` holds, per numeric bin, the count, sum, minimum and maximum of the values
that fell in it, and per category its count; missing values are counted apart. Two sketches of
the same layout merge by adding counts and sums and taking the extremes, so sketches built
batch by batch where the rows already are (the feature-logger's write) add up to the sketch
of the whole window, whatever the order, the batching or the number of writers.

Distances are computed from a sketch against the reference:

- ``wasserstein``: Evidently's normed first Wasserstein distance, with every window value moved
  to its bin's mean. Moving a value by at most its bin's spread moves the distance by at most
  that much, so ``|sketch - exact| <= sum(count_b * (max_b - min_b)) / (n * norm)``:
  ``ColumnDistance.bound`` is that figure for each window, and it is 0 where every bin holds a
  single value (discrete features);
- ``jensenshannon`` and ``psi`` of categories: exact, from the counts (as Evidently computes
  them: missing values left out, natural logarithm, PSI's empty cells filled as Evidently does);
- ``jensenshannon`` and ``psi`` of a numeric column: on the reference-quantile bins (Evidently
  bins numeric columns its own way, so these are not compared with its figures).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.spatial import distance

from schemas.features import FeatureKind

ColumnKind = Literal["numeric", "categorical"]

NUMERIC_TESTS: Final = frozenset({"wasserstein", "jensenshannon", "psi"})
CATEGORICAL_TESTS: Final = frozenset({"jensenshannon", "psi"})

DEFAULT_BINS: Final = 100
"""Numeric bins cut from the reference's quantiles (each holds ~1% of the reference)."""

_MIN_NORM: Final = 0.001  # Evidently's floor of the reference std in the normed Wasserstein


class _Layout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ColumnLayout(_Layout):
    """How one column is binned."""

    name: str
    kind: ColumnKind
    edges: tuple[float, ...] = ()
    """Numeric: interior bin edges, strictly increasing; value v falls in bin
    ``searchsorted(edges, v, side="right")``, so there are ``len(edges) + 1`` bins."""
    norm: float = Field(default=1.0, gt=0)
    """Numeric: the reference's standard deviation (at least 0.001), as Evidently norms it."""
    categories: tuple[int | str, ...] = ()
    """Categorical: one slot per value, in order; a value not listed counts in a last slot."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind == "numeric":
            if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
                raise ValueError(f"edges of {self.name} must increase strictly")
        elif not self.categories:
            raise ValueError(f"categorical column {self.name} needs categories")
        return self

    @property
    def slots(self) -> int:
        """Bins of a numeric column; categories plus the "other" slot of a categorical one."""
        return len(self.edges) + 1 if self.kind == "numeric" else len(self.categories) + 1


class SketchLayout(_Layout):
    """The columns a model version's windows are sketched on, and their bins."""

    columns: tuple[ColumnLayout, ...]

    def column(self, name: str) -> ColumnLayout:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @classmethod
    def from_reference(
        cls,
        reference: Mapping[str, NDArray[np.float64] | NDArray[np.object_]],
        kinds: Mapping[str, FeatureKind],
        *,
        declared_categories: Mapping[str, Sequence[int | str]] | None = None,
        bins: int = DEFAULT_BINS,
    ) -> SketchLayout:
        """Bins of each column from the reference's values (numeric: float64 with NaN)."""
        declared = declared_categories or {}
        columns = []
        for name, kind in kinds.items():
            values = reference[name]
            if kind is FeatureKind.NUMERIC:
                numbers = np.asarray(values, dtype=np.float64)
                numbers = numbers[~np.isnan(numbers)]
                columns.append(
                    ColumnLayout(
                        name=name,
                        kind="numeric",
                        edges=_quantile_edges(numbers, bins),
                        norm=_norm(numbers),
                    )
                )
            else:
                listed = list(declared.get(name, ()))
                seen = set(listed)
                for value in _present(values):
                    if value not in seen:
                        listed.append(value)
                        seen.add(value)
                columns.append(
                    ColumnLayout(name=name, kind="categorical", categories=tuple(listed))
                )
        return cls(columns=tuple(columns))


def _norm(values: NDArray[np.float64]) -> float:
    """Evidently's norm, the standard deviation (at least 0.001), kept finite: the std of
    values near 1e308 (valid for an unbounded feature) overflows unless worked out scaled."""
    if not values.size:
        return 1.0
    scale = max(float(np.max(np.abs(values))), 1.0)
    with np.errstate(over="ignore"):
        spread = float(np.std(values / scale)) * scale
    return min(max(spread, _MIN_NORM), sys.float_info.max)


def _quantile_edges(values: NDArray[np.float64], bins: int) -> tuple[float, ...]:
    """Interior edges at the reference's quantiles, on its distinct values.

    Edges sit on distinct reference values, so each bin starts at a value the reference holds:
    a discrete feature with fewer distinct values than bins gets one bin per value, and its
    sketch is exact.
    """
    distinct = np.unique(values)
    if distinct.size <= 1:
        return tuple(float(v) for v in distinct)
    if distinct.size <= bins:
        return tuple(float(v) for v in distinct[1:])
    cuts = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf")
    # Snap each cut to the smallest distinct value above it, so no bin splits a repeated value.
    positions = np.searchsorted(distinct, cuts, side="right")
    positions = np.unique(positions[(positions > 0) & (positions < distinct.size)])
    return tuple(float(v) for v in distinct[positions])


def _present(values: NDArray[np.float64] | NDArray[np.object_]) -> list[int | str]:
    out: list[int | str] = []
    for value in np.asarray(values, dtype=object):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        out.append(int(value) if isinstance(value, float | np.integer) else value)
    return sorted(set(out), key=lambda v: (type(v).__name__, v))


_NONE: Final = np.empty(0)


@dataclass(slots=True)
class ColumnSketch:
    """One column of a window: counts per slot (and, numeric, sum, min, max per bin), nulls.

    A categorical column's ``sums``, ``lows`` and ``highs`` are empty.
    """

    counts: NDArray[np.float64]
    nulls: float = 0.0
    sums: NDArray[np.float64] = field(default_factory=lambda: _NONE)
    lows: NDArray[np.float64] = field(default_factory=lambda: _NONE)
    highs: NDArray[np.float64] = field(default_factory=lambda: _NONE)

    @property
    def rows(self) -> float:
        """Values present (missing ones not counted)."""
        return float(self.counts.sum())


@dataclass(slots=True)
class WindowSketch:
    """A window's columns in the layout's bins; ``rows`` counts every row, missing values too."""

    layout: SketchLayout
    rows: int
    columns: dict[str, ColumnSketch]

    @classmethod
    def empty(cls, layout: SketchLayout) -> WindowSketch:
        columns = {}
        for column in layout.columns:
            slots = column.slots
            if column.kind == "numeric":
                columns[column.name] = ColumnSketch(
                    counts=np.zeros(slots),
                    sums=np.zeros(slots),
                    lows=np.full(slots, np.inf),
                    highs=np.full(slots, -np.inf),
                )
            else:
                columns[column.name] = ColumnSketch(counts=np.zeros(slots))
        return cls(layout, 0, columns)

    @classmethod
    def of(
        cls,
        layout: SketchLayout,
        values: Mapping[str, NDArray[np.float64] | NDArray[np.object_] | Sequence[object]],
    ) -> WindowSketch:
        """The sketch of rows given column by column (numeric: float64 with NaN for missing)."""
        sketch = cls.empty(layout)
        rows = -1
        for column in layout.columns:
            raw = values[column.name]
            size = len(raw)
            if rows not in (-1, size):
                raise ValueError("every column needs the same number of rows")
            rows = size
            target = sketch.columns[column.name]
            if column.kind == "numeric":
                _add_numeric(target, column, np.asarray(raw, dtype=np.float64))
            else:
                _add_categorical(target, column, raw)
        sketch.rows = max(rows, 0)
        return sketch

    def merge(self, other: WindowSketch) -> WindowSketch:
        """The sketch of both windows' rows (a new sketch; both stay as they are)."""
        if other.layout != self.layout:
            raise ValueError("sketches of different layouts do not merge")
        columns = {}
        for name, mine in self.columns.items():
            theirs = other.columns[name]
            columns[name] = ColumnSketch(
                counts=mine.counts + theirs.counts,
                nulls=mine.nulls + theirs.nulls,
                sums=mine.sums + theirs.sums,
                lows=np.minimum(mine.lows, theirs.lows),
                highs=np.maximum(mine.highs, theirs.highs),
            )
        return WindowSketch(self.layout, self.rows + other.rows, columns)

    def to_vector(self) -> NDArray[np.float64]:
        """A flat float64 vector (the layout fixes its order): rows, then each column's parts."""
        parts: list[NDArray[np.float64]] = [np.array([float(self.rows)])]
        for column in self.layout.columns:
            sketch = self.columns[column.name]
            parts.append(np.array([sketch.nulls]))
            parts.append(sketch.counts)
            if column.kind == "numeric":
                parts.extend((sketch.sums, sketch.lows, sketch.highs))
        return np.concatenate(parts)

    @classmethod
    def from_vector(cls, layout: SketchLayout, vector: NDArray[np.float64]) -> WindowSketch:
        """The inverse of ``to_vector``."""
        expected = vector_size(layout)
        if vector.shape != (expected,):
            raise ValueError(f"a sketch of this layout has {expected} numbers, not {vector.shape}")
        position = 1
        columns = {}

        def take(size: int) -> NDArray[np.float64]:
            nonlocal position
            part = vector[position : position + size].copy()
            position += size
            return part

        for column in layout.columns:
            nulls = float(take(1)[0])
            counts = take(column.slots)
            if column.kind == "numeric":
                sums, lows, highs = (take(column.slots) for _ in range(3))
                columns[column.name] = ColumnSketch(counts, nulls, sums, lows, highs)
            else:
                columns[column.name] = ColumnSketch(counts, nulls)
        return cls(layout, int(vector[0]), columns)

    def to_bytes(self) -> bytes:
        """``to_vector`` as little-endian float64 bytes (the ``drift_sketches`` column)."""
        return self.to_vector().astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, layout: SketchLayout, data: bytes) -> WindowSketch:
        return cls.from_vector(layout, np.frombuffer(data, dtype="<f8").astype(np.float64))


def vector_size(layout: SketchLayout) -> int:
    """Numbers in a sketch vector of this layout."""
    return 1 + sum(
        1 + column.slots * (4 if column.kind == "numeric" else 1) for column in layout.columns
    )


def _add_numeric(target: ColumnSketch, layout: ColumnLayout, values: NDArray[np.float64]) -> None:
    missing = np.isnan(values)
    target.nulls += float(missing.sum())
    present = values[~missing]
    if present.size == 0:
        return
    slots = np.searchsorted(np.asarray(layout.edges), present, side="right")
    target.counts += np.bincount(slots, minlength=layout.slots)
    target.sums += np.bincount(slots, weights=present, minlength=layout.slots)
    np.minimum.at(target.lows, slots, present)
    np.maximum.at(target.highs, slots, present)


def _add_categorical(
    target: ColumnSketch,
    layout: ColumnLayout,
    values: NDArray[np.float64] | NDArray[np.object_] | Sequence[object],
) -> None:
    # Values are categories as the wire carries them, or None when missing (readers of frames
    # normalise pandas' NaN and float-coded ints first: ``categorical_values``).
    codes: dict[object, int] = {category: code for code, category in enumerate(layout.categories)}
    codes[None] = -1
    other = len(layout.categories)
    slots = np.fromiter((codes.get(value, other) for value in values), np.int64, len(values))
    present = slots[slots >= 0]
    target.nulls += float(len(slots) - len(present))
    target.counts += np.bincount(present, minlength=layout.slots)


def categorical_values(values: Sequence[object] | NDArray[np.object_]) -> NDArray[np.object_]:
    """Values read back from a frame as the wire carries them: NaN as None, 3.0 as 3."""
    out = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):  # NaN
            out[index] = None
        elif isinstance(value, np.integer) or (
            isinstance(value, float | np.floating) and float(value).is_integer()
        ):
            out[index] = int(value)
        else:
            out[index] = value
    return out


@dataclass(frozen=True, slots=True)
class ColumnDistance:
    """A column's distance from the reference, and how far it may be from the exact one."""

    name: str
    stat_test: str
    score: float
    bound: float
    """Largest possible difference from the test run on the window's raw values (0: exact)."""
    rows: int
    """Values present in the window's column."""


@dataclass(frozen=True, slots=True)
class ReferenceColumn:
    """A reference column, prepared once per version for every window's distances."""

    layout: ColumnLayout
    values: NDArray[np.float64]
    """Numeric: the present reference values, sorted."""
    counts: NDArray[np.float64]
    """Counts per slot (bins or categories) of the present reference values."""
    prefix: NDArray[np.float64] = field(default_factory=lambda: _NONE)
    """Numeric: ``prefix[i]`` is the sum of the ``i`` smallest values."""

    def wasserstein(self, atoms: NDArray[np.float64], weights: NDArray[np.float64]) -> float:
        """First Wasserstein distance between the reference and weighted ``atoms``.

        In one dimension it is the L1 distance between the quantile functions. The atoms'
        quantile function is a step per atom, and the reference's integral against a constant
        over any quantile range comes from prefix sums, so the cost is O(atoms x log(rows)),
        whatever the reference's size: calibrating on a million reference rows stays cheap.
        Equal to ``scipy.stats.wasserstein_distance`` (tested). Values near the float range's
        edge (valid for an unbounded feature) are worked out scaled down, then scaled back.
        """
        order = np.argsort(atoms, kind="stable")
        atoms, weights = atoms[order], weights[order]
        ends = np.cumsum(weights) / weights.sum()
        ends[-1] = 1.0
        starts = np.concatenate(([0.0], ends[:-1]))
        scale = _scale(self.values, atoms)
        if scale == 1.0:
            values, prefix = self.values, self.prefix
        else:
            values = self.values / scale
            prefix = np.concatenate(([0.0], np.cumsum(values)))
            atoms = atoms / scale
        total = np.sum(
            _quantile_integral(values, prefix, ends, atoms)
            - _quantile_integral(values, prefix, starts, atoms)
        )
        with np.errstate(over="ignore"):
            return float(total * scale)

    def wasserstein_excluding(
        self,
        excluded: NDArray[np.int64],
        atoms: NDArray[np.float64],
        weights: NDArray[np.float64],
    ) -> float:
        """First Wasserstein distance between weighted ``atoms`` and the reference without the
        values at sorted positions ``excluded``: a sample against the rest of the reference.

        Both distribution functions are steps, so the integral of their difference is exact
        on the merged breakpoints; O(rows) a call.
        """
        values = self.values
        size = len(values)
        kept = size - len(excluded)
        if kept <= 0:
            return float("nan")
        taken = np.zeros(size)
        taken[excluded] = 1.0
        taken_before = np.concatenate(([0.0], np.cumsum(taken)))  # taken among the first k
        order = np.argsort(atoms, kind="stable")
        atoms, weights = atoms[order], weights[order]
        cumulative = np.concatenate(([0.0], np.cumsum(weights) / weights.sum()))
        grid = np.union1d(values, atoms)
        below = np.searchsorted(values, grid, side="right")  # reference values <= x
        rest = (below - taken_before[below]) / kept
        sample = cumulative[np.searchsorted(atoms, grid, side="right")]
        scale = _scale(grid)
        total = np.sum(np.abs(rest[:-1] - sample[:-1]) * np.diff(grid / scale))
        with np.errstate(over="ignore"):
            return float(total * scale)


_SAFE: Final = 1e100
"""Beyond this magnitude, products and sums of values may overflow: distances are scaled."""


def _scale(*arrays: NDArray[np.float64]) -> float:
    largest = max((float(np.max(np.abs(a))) for a in arrays if len(a)), default=0.0)
    return largest if largest > _SAFE else 1.0


def _quantile_integral(
    values: NDArray[np.float64],
    prefix: NDArray[np.float64],
    upto: NDArray[np.float64],
    level: NDArray[np.float64],
) -> NDArray[np.float64]:
    """For each pair: the integral over quantiles [0, upto] of |Q(values) - level|."""
    size = len(values)
    position = upto * size
    whole = np.minimum(np.floor(position).astype(np.int64), size)
    part = position - whole
    below = np.minimum(np.searchsorted(values, level, side="left"), whole)
    total = (
        level * below - prefix[below] + (prefix[whole] - prefix[below]) - level * (whole - below)
    )
    last = np.abs(values[np.minimum(whole, size - 1)] - level)
    total = total + np.where(whole < size, part * last, 0.0)
    return np.asarray(total / size, dtype=np.float64)


def reference_columns(
    layout: SketchLayout,
    reference: Mapping[str, NDArray[np.float64] | NDArray[np.object_] | Sequence[object]],
) -> dict[str, ReferenceColumn]:
    """The reference's columns ready for ``distance``."""
    sketch = WindowSketch.of(layout, reference)
    prepared = {}
    for column in layout.columns:
        values = prefix = _NONE
        if column.kind == "numeric":
            numbers = np.asarray(reference[column.name], dtype=np.float64)
            values = np.sort(numbers[~np.isnan(numbers)])
            prefix = np.concatenate(([0.0], np.cumsum(values)))
        prepared[column.name] = ReferenceColumn(
            column, values, sketch.columns[column.name].counts, prefix
        )
    return prepared


def distance_of(reference: ReferenceColumn, window: ColumnSketch, stat_test: str) -> ColumnDistance:
    """The column's distance between the reference and a window's sketch."""
    layout = reference.layout
    rows = int(window.rows)
    score = score_of(
        reference, window.counts, window.sums, stat_test, lows=window.lows, highs=window.highs
    )
    bound = 0.0
    if stat_test == "wasserstein" and rows:
        filled = window.counts > 0
        spread = float(np.sum(window.counts[filled] * (window.highs[filled] - window.lows[filled])))
        bound = spread / rows / layout.norm
    return ColumnDistance(layout.name, stat_test, score, bound, rows)


def _centres(
    sums: NDArray[np.float64],
    counts: NDArray[np.float64],
    lows: NDArray[np.float64] | None,
    highs: NDArray[np.float64] | None,
    filled: NDArray[np.bool_],
) -> NDArray[np.float64]:
    """Each filled bin's mean. Valid values near 1e308 overflow a bin's sum to infinity: the
    mean is then kept inside the bin's own extremes (its error stays within the bound)."""
    with np.errstate(over="ignore", invalid="ignore"):
        centres = sums / counts
        if lows is None or highs is None or not len(lows):
            return np.asarray(np.nan_to_num(centres), dtype=np.float64)
        low, high = lows[filled], highs[filled]
        middle = low / 2 + high / 2
        centres = np.where(np.isfinite(centres), centres, middle)
        return np.asarray(np.clip(centres, low, high), dtype=np.float64)


def score_of(
    reference: ReferenceColumn,
    counts: NDArray[np.float64],
    sums: NDArray[np.float64],
    stat_test: str,
    *,
    excluded: NDArray[np.int64] | None = None,
    lows: NDArray[np.float64] | None = None,
    highs: NDArray[np.float64] | None = None,
) -> float:
    """The distance of a window given by its counts (and, numeric, sums) per slot; NaN when
    either side has no value. ``excluded``: the window's own rows, as sorted positions of the
    reference, are left out of it (calibration's sample against the rest of the reference)."""
    layout = reference.layout
    base = reference.counts if excluded is None else reference.counts - counts
    if counts.sum() == 0 or base.sum() == 0:
        return float("nan")
    if stat_test == "wasserstein":
        if layout.kind != "numeric":
            raise ValueError(f"wasserstein needs a numeric column, {layout.name} is categorical")
        filled = counts > 0
        centres = _centres(sums[filled], counts[filled], lows, highs, filled)
        if excluded is None:
            return reference.wasserstein(centres, counts[filled]) / layout.norm
        return reference.wasserstein_excluding(excluded, centres, counts[filled]) / layout.norm
    if stat_test == "jensenshannon":
        return float(distance.jensenshannon(base, counts))
    if stat_test == "psi":
        return _psi(base, counts)
    raise ValueError(f"unknown stat test {stat_test!r}")


def slots_of(
    layout: ColumnLayout, values: NDArray[np.float64] | NDArray[np.object_]
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]]:
    """Each row's slot (-1 when missing), its value and, numeric, its position among the
    present values sorted (as ``ReferenceColumn.values``): what calibration works out once."""
    if layout.kind == "numeric":
        numbers = np.asarray(values, dtype=np.float64)
        slots = np.searchsorted(np.asarray(layout.edges), numbers, side="right").astype(np.int64)
        missing = np.isnan(numbers)
        slots[missing] = -1
        ranks = np.full(len(numbers), -1, dtype=np.int64)
        present = np.flatnonzero(~missing)
        order = np.argsort(numbers[present], kind="stable")
        ranks[present[order]] = np.arange(len(present))
        return slots, np.nan_to_num(numbers), ranks
    codes: dict[object, int] = {category: code for code, category in enumerate(layout.categories)}
    codes[None] = -1
    other = len(layout.categories)
    slots = np.fromiter((codes.get(value, other) for value in values), np.int64, len(values))
    return slots, np.zeros(len(values)), np.full(len(values), -1, dtype=np.int64)


def _psi(reference: NDArray[np.float64], current: NDArray[np.float64]) -> float:
    # As Evidently's get_binned_data(feel_zeroes=True): shares over the values present, empty
    # cells given a small share so the logarithm stays finite.
    keep = (reference > 0) | (current > 0)
    shares = []
    for counts in (reference[keep], current[keep]):
        share = counts / counts.sum()
        smallest = float(share[share > 0].min())
        share = np.where(share == 0, smallest / 10**6 if smallest <= 0.0001 else 0.0001, share)
        shares.append(share)
    expected, actual = shares
    return float(np.sum((expected - actual) * np.log(expected / actual)))
