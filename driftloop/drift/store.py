"""The drift monitor's Postgres side: window sketches and samples read, runs and state written.

A window is a span of prediction time of one model version. Its statistics are the merge of
the slice sketches the feature-logger wrote with the rows (``drift_sketches``); a bounded
uniform sample of its rows, with their labels as they stand, feeds the human report. Each
judged window is one ``drift_runs`` row written in the same transaction as the model's episode
state and the deletion of the window's slices (and of any that arrived late for an earlier
one), so a restart resumes exactly after the last recorded window and judges it once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson
import pandas as pd

from driftloop.drift.assessment import PREDICTION_COLUMN, DriftAssessment, WindowRefused
from driftloop.drift.episodes import EpisodeState, EpisodeStep
from driftloop.settings import PostgresSettings
from driftloop.storage.database import open_migrated_pool
from schemas.features import FeatureSpec

PREDICTED_AT_COLUMN: Final = "predicted_at"
"""Column of a window's timestamps (the gateway's clock when it served the row)."""

_WINDOW = """
SELECT p.predicted_at, p.features::text AS features, p.prediction, l.label
FROM prediction_log p LEFT JOIN labels l USING (request_id)
WHERE p.model_name = $1 AND p.model_version = $2
  AND p.predicted_at >= $3 AND p.predicted_at < $4
ORDER BY p.predicted_at
LIMIT $5
"""
# Uniform without replacement: each row passes a coin of probability $5 (a little above
# limit / rows, so nearly always at least `limit` pass), and the passers are shuffled and cut.
_SAMPLE = """
SELECT p.predicted_at, p.features::text AS features, p.prediction, l.label
FROM prediction_log p LEFT JOIN labels l USING (request_id)
WHERE p.model_name = $1 AND p.model_version = $2
  AND p.predicted_at >= $3 AND p.predicted_at < $4 AND random() < $5
ORDER BY random()
LIMIT $6
"""
_FIRST_SLICE = """
SELECT min(slice_start) FROM drift_sketches
WHERE model_name = $1 AND model_version = $2 AND slice_start >= $3
"""
_SLICES = """
SELECT rows, unsketched_rows, sketch FROM drift_sketches
WHERE model_name = $1 AND model_version = $2 AND slice_start >= $3 AND slice_start < $4
"""
_LATE_ROWS = """
SELECT coalesce(sum(rows), 0) FROM drift_sketches
WHERE model_name = $1 AND model_version = $2 AND slice_start < $3
"""
_DROP_SLICES = """
DELETE FROM drift_sketches WHERE model_name = $1 AND model_version = $2 AND slice_start < $3
"""
_FORGET_OTHER_VERSIONS = """
DELETE FROM drift_sketches WHERE model_name = $1 AND model_version <> $2
"""
_PUBLISH_LAYOUT = """
INSERT INTO drift_baselines (model_name, model_version, layout) VALUES ($1, $2, $3::jsonb)
ON CONFLICT (model_name, model_version) DO UPDATE
SET layout = EXCLUDED.layout, published_at = now()
WHERE drift_baselines.layout <> EXCLUDED.layout
"""
_STATE = "SELECT state::text FROM drift_monitor_state WHERE model_name = $1"
_SAVE_STATE = """
INSERT INTO drift_monitor_state (model_name, state) VALUES ($1, $2::jsonb)
ON CONFLICT (model_name) DO UPDATE SET state = EXCLUDED.state, updated_at = now()
"""
_RECORD_RUN = """
INSERT INTO drift_runs (model_name, model_version, window_start, window_end, outcome,
                        window_rows, reference_rows, labelled_rows, drift_share,
                        drifted_features, prediction_score, feature_scores, quality,
                        refusal_reason, report_uri, episode_id, drift_holds, event_id,
                        check_seconds, sketch, lag_seconds, sample_rows, late_rows,
                        quality_limit, quality_degraded)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13::jsonb, $14, $15, $16,
        $17, $18, $19, $20, $21, $22, $23, $24, $25)
ON CONFLICT (model_name, model_version, window_end) DO NOTHING
"""
_RECENT_RUNS = """
SELECT model_name, model_version, window_start, window_end, outcome, window_rows,
       labelled_rows, drift_share, drifted_features, quality::text AS quality, quality_limit,
       quality_degraded, refusal_reason, report_uri, episode_id, drift_holds, check_seconds,
       checked_at
FROM drift_runs WHERE ($1::text IS NULL OR model_name = $1)
ORDER BY checked_at DESC LIMIT $2
"""


@dataclass(frozen=True, slots=True)
class WindowRecord:
    """What is stored of one window: its verdict, where the report is, what was published."""

    model_name: str
    model_version: int
    window_start: datetime
    window_end: datetime
    verdict: DriftAssessment | WindowRefused
    step: EpisodeStep | None
    """The episode machine's step (None for a refused window, which is not observed)."""
    report_uri: str | None
    event_id: str | None
    check_seconds: float
    sketch: bytes | None = None
    """The window's merged sketch (``driftloop.drift.slices.encode``)."""
    lag_seconds: float | None = None
    """Seconds from the window's close to its verdict."""
    sample_rows: int = 0
    """Rows of the uniform sample the Evidently report ran on."""
    late_rows: int = 0
    """Rows of earlier, already judged windows that arrived since (dropped, counted here)."""


@dataclass(frozen=True, slots=True)
class WindowSlices:
    """A window's slices as stored: rows, rows logged unsketched, and the sketches."""

    rows: int = 0
    unsketched_rows: int = 0
    sketches: tuple[bytes, ...] = ()

    def __add__(self, other: WindowSlices) -> WindowSlices:
        return WindowSlices(
            self.rows + other.rows,
            self.unsketched_rows + other.unsketched_rows,
            self.sketches + other.sketches,
        )


@dataclass(frozen=True, slots=True)
class DriftRun:
    """A ``drift_runs`` row, as the status command and the demo show it."""

    model_name: str
    model_version: int
    window_start: datetime
    window_end: datetime
    outcome: str
    window_rows: int
    labelled_rows: int
    drift_share: float | None
    drifted_features: tuple[str, ...]
    quality: dict[str, float] | None
    refusal_reason: str | None
    report_uri: str | None
    episode_id: str | None
    drift_holds: bool
    check_seconds: float
    checked_at: datetime
    quality_limit: float | None = None
    """The version's limit of its promotion metric at the window's labelled rows."""
    quality_degraded: bool = False
    """The window drifted because its labelled error passed that limit."""


def window_frame(spec: FeatureSpec, rows: Sequence[asyncpg.Record]) -> pd.DataFrame:
    """Logged rows as a frame: ``predicted_at``, the declared features, prediction, target."""
    features = [orjson.loads(row["features"]) for row in rows]
    frame = pd.DataFrame.from_records(features, columns=list(spec.feature_names))
    frame.insert(0, PREDICTED_AT_COLUMN, pd.to_datetime([row["predicted_at"] for row in rows]))
    frame[PREDICTION_COLUMN] = pd.Series([row["prediction"] for row in rows], dtype="float64")
    frame[spec.target.name] = pd.Series(
        [row["label"] for row in rows], dtype="float64", index=frame.index
    )
    return frame


class DriftStore:
    """Windows from ``prediction_log``/``labels``; ``drift_runs`` and ``drift_monitor_state``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def close(self) -> None:
        await self.pool.close()

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
        """The first ``limit`` rows of a model version logged in ``[after, before)``."""
        rows = await self.pool.fetch(_WINDOW, model_name, model_version, after, before, limit)
        return window_frame(spec, rows)

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
        """A uniform sample of at most ``limit`` of the window's ``rows`` rows, labels joined."""
        share = 1.0 if rows <= limit else min(1.0, (limit + 4 * math.sqrt(limit) + 10) / rows)
        found = await self.pool.fetch(_SAMPLE, model_name, model_version, start, end, share, limit)
        return window_frame(spec, found)

    async def first_slice(
        self, model_name: str, model_version: int, after: datetime
    ) -> datetime | None:
        """Start of the first slice of the version logged at or after ``after``."""
        moment: datetime | None = await self.pool.fetchval(
            _FIRST_SLICE, model_name, model_version, after
        )
        return moment

    async def slices(
        self, model_name: str, model_version: int, start: datetime, end: datetime
    ) -> WindowSlices:
        """The slices of ``[start, end)``."""
        found = await self.pool.fetch(_SLICES, model_name, model_version, start, end)
        return WindowSlices(
            rows=sum(row["rows"] for row in found),
            unsketched_rows=sum(row["unsketched_rows"] for row in found),
            sketches=tuple(bytes(row["sketch"]) for row in found if row["sketch"] is not None),
        )

    async def late_rows(self, model_name: str, model_version: int, before: datetime) -> int:
        """Rows sketched for slices before ``before``: windows already judged, arrived late."""
        late: int = await self.pool.fetchval(_LATE_ROWS, model_name, model_version, before)
        return int(late)

    async def forget_other_versions(self, model_name: str, model_version: int) -> int:
        """Drop the slices of every version but ``model_version`` (no longer monitored)."""
        status = await self.pool.execute(_FORGET_OTHER_VERSIONS, model_name, model_version)
        return int(status.rsplit(" ", 1)[-1])

    async def publish_layout(self, model_name: str, model_version: int, layout: str) -> None:
        """Publish a version's sketch layout (JSON) for the feature-logger."""
        await self.pool.execute(_PUBLISH_LAYOUT, model_name, model_version, layout)

    async def state(self, model_name: str) -> EpisodeState | None:
        """The model's episode state as last recorded, if any."""
        document = await self.pool.fetchval(_STATE, model_name)
        return None if document is None else EpisodeState.model_validate_json(document)

    async def save_state(self, state: EpisodeState) -> None:
        """Record the model's episode state on its own (a switch to a new champion version)."""
        await self.pool.execute(_SAVE_STATE, state.model_name, state.model_dump_json())

    async def record(self, record: WindowRecord, state: EpisodeState) -> bool:
        """Write the window's run row and the model's new state together; False if a replay."""
        verdict = record.verdict
        if isinstance(verdict, DriftAssessment):
            labelled, share, drifted = (
                verdict.labelled_rows,
                verdict.drift_share,
                list(verdict.drifted_features),
            )
            refusal = None
        else:
            labelled, share, drifted, refusal = 0, None, [], verdict.reason.value
        async with self.pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                _RECORD_RUN,
                record.model_name,
                record.model_version,
                record.window_start,
                record.window_end,
                _outcome(verdict),
                verdict.window_rows,
                verdict.reference_rows,
                labelled,
                share,
                drifted,
                _prediction_score(verdict),
                orjson.dumps(_feature_scores(verdict)).decode(),
                _quality_document(verdict),
                refusal,
                record.report_uri,
                record.step.episode_id if record.step else None,
                bool(record.step and record.step.drift_holds),
                record.event_id,
                record.check_seconds,
                record.sketch,
                record.lag_seconds,
                record.sample_rows,
                record.late_rows,
                verdict.quality_limit if isinstance(verdict, DriftAssessment) else None,
                isinstance(verdict, DriftAssessment) and verdict.quality_degraded,
            )
            await connection.execute(
                _DROP_SLICES, record.model_name, record.model_version, record.window_end
            )
            await connection.execute(_SAVE_STATE, state.model_name, state.model_dump_json())
        return bool(status.endswith(" 1"))

    async def recent(self, model_name: str | None = None, limit: int = 20) -> list[DriftRun]:
        """The latest runs, newest first (of one model, or of all)."""
        rows = await self.pool.fetch(_RECENT_RUNS, model_name, limit)
        return [_run(row) for row in rows]


def _outcome(verdict: DriftAssessment | WindowRefused) -> str:
    if isinstance(verdict, WindowRefused):
        return "refused"
    return "drifted" if verdict.drifted else "clean"


def _prediction_score(verdict: DriftAssessment | WindowRefused) -> float | None:
    if isinstance(verdict, DriftAssessment) and verdict.prediction is not None:
        return verdict.prediction.score
    return None


def _feature_scores(verdict: DriftAssessment | WindowRefused) -> dict[str, Any]:
    if not isinstance(verdict, DriftAssessment):
        return {}
    return {
        feature.name: {
            "score": feature.score,
            "threshold": feature.threshold,
            "stat_test": feature.stat_test,
            "drifted": feature.drifted,
        }
        for feature in verdict.features
    }


def _quality_document(verdict: DriftAssessment | WindowRefused) -> str | None:
    if isinstance(verdict, DriftAssessment) and verdict.quality is not None:
        return orjson.dumps(verdict.quality.metrics).decode()
    return None


def _run(row: asyncpg.Record) -> DriftRun:
    quality = row["quality"]
    return DriftRun(
        model_name=row["model_name"],
        model_version=row["model_version"],
        window_start=row["window_start"],
        window_end=row["window_end"],
        outcome=row["outcome"],
        window_rows=row["window_rows"],
        labelled_rows=row["labelled_rows"],
        drift_share=row["drift_share"],
        drifted_features=tuple(row["drifted_features"]),
        quality=None if quality is None else orjson.loads(quality),
        refusal_reason=row["refusal_reason"],
        report_uri=row["report_uri"],
        episode_id=row["episode_id"],
        drift_holds=row["drift_holds"],
        check_seconds=row["check_seconds"],
        checked_at=row["checked_at"],
        quality_limit=row["quality_limit"],
        quality_degraded=row["quality_degraded"],
    )


async def open_drift_store(
    settings: PostgresSettings, schema: str = "public", *, give_up_after_seconds: float = 300.0
) -> DriftStore:
    """Apply the migrations to ``schema`` and open a small pool whose sessions work in it."""
    pool = await open_migrated_pool(
        settings, schema, max_size=3, give_up_after_seconds=give_up_after_seconds
    )
    return DriftStore(pool)
