"""The shadow log: predictions of versions that do not serve, and the labelled rows that compare
them with the served ones (``shadow_predictions``, migration 0007).

The shadow-scorer writes here (idempotent by request id and version: a replayed batch inserts
nothing); the live judge reads the same rows back joined to the prediction log and the labels,
so every comparison is between two versions' predictions of the very same requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

import asyncpg

from driftloop.settings import PostgresSettings
from driftloop.storage.database import open_migrated_pool


class ShadowRole(StrEnum):
    """Why a version that does not serve is scored in shadow."""

    CHALLENGER = "challenger"
    """Under the alias ``challenger``: waiting for live evidence before its promotion."""
    PREVIOUS_CHAMPION = "previous_champion"
    """The version the champion replaced: the counterfactual of the promotion, and its judge."""
    FIRST_CHAMPION = "first_champion"
    """The model's first version, frozen: what leaving the model alone would have given."""


@dataclass(frozen=True, slots=True)
class ShadowPrediction:
    """One request scored by one shadow version."""

    request_id: str
    model_name: str
    model_version: int
    role: ShadowRole
    served_version: int
    """The version that answered the request."""
    predicted_at: datetime
    """The served prediction's time (its event's ``occurred_at``)."""
    prediction: float


@dataclass(frozen=True, slots=True)
class PairedRow:
    """A labelled request with the served prediction and a shadow version's prediction."""

    predicted_at: datetime
    label: float
    served: float
    shadow: float


@dataclass(frozen=True, slots=True)
class WindowRow:
    """A labelled request of a window: who served it, its label, and what each version said.

    ``predictions`` maps a version to its prediction of the request: the served version's
    own, and each shadow version's.
    """

    served_version: int
    label: float
    predictions: dict[int, float]


_INSERT: Final = """
INSERT INTO shadow_predictions
    (request_id, model_version, model_name, role, served_version, predicted_at, prediction)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::int[],
                     $6::timestamptz[], $7::float8[])
ON CONFLICT (request_id, model_version) DO NOTHING
"""

# The first labelled rows a version served that a shadow version also scored, oldest first:
# the rows a rollback (or a shadow promotion) is judged on. Labels join on both primary keys.
_FIRST_PAIRED: Final = """
SELECT p.predicted_at, l.label, p.prediction AS served, s.prediction AS shadow
FROM prediction_log p
JOIN labels l ON l.request_id = p.request_id AND l.predicted_at = p.predicted_at
JOIN shadow_predictions s ON s.request_id = p.request_id AND s.model_version = $3
WHERE p.model_name = $1 AND p.model_version = $2
ORDER BY p.predicted_at, p.request_id
LIMIT $4
"""

# The newest labelled rows of a window (at most $4), each with every shadow prediction of it.
_WINDOW: Final = """
WITH served AS (
    SELECT p.request_id, p.model_version, p.prediction, l.label
    FROM prediction_log p
    JOIN labels l ON l.request_id = p.request_id AND l.predicted_at = p.predicted_at
    WHERE p.model_name = $1 AND p.predicted_at >= $2 AND p.predicted_at < $3
    ORDER BY p.predicted_at DESC
    LIMIT $4
)
SELECT r.request_id, r.model_version AS served_version, r.label, r.prediction,
       s.model_version AS shadow_version, s.prediction AS shadow
FROM served r
LEFT JOIN shadow_predictions s ON s.request_id = r.request_id
"""


def _affected(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


class ShadowLog:
    """Reads and writes ``shadow_predictions`` in one Postgres schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def close(self) -> None:
        await self.pool.close()

    async def write(self, rows: Sequence[ShadowPrediction]) -> int:
        """Insert the rows not logged yet (one statement); the number inserted."""
        if not rows:
            return 0
        status = await self.pool.execute(
            _INSERT,
            [row.request_id for row in rows],
            [row.model_version for row in rows],
            [row.model_name for row in rows],
            [row.role.value for row in rows],
            [row.served_version for row in rows],
            [row.predicted_at for row in rows],
            [row.prediction for row in rows],
        )
        return _affected(status)

    async def first_paired_rows(
        self, model_name: str, served_version: int, shadow_version: int, limit: int
    ) -> list[PairedRow]:
        """The first ``limit`` labelled rows ``served_version`` served that ``shadow_version``
        scored in shadow, oldest first."""
        records = await self.pool.fetch(
            _FIRST_PAIRED, model_name, served_version, shadow_version, limit
        )
        return [
            PairedRow(record["predicted_at"], record["label"], record["served"], record["shadow"])
            for record in records
        ]

    async def window_rows(
        self, model_name: str, start: datetime, end: datetime, *, limit: int
    ) -> list[WindowRow]:
        """The newest ``limit`` labelled rows predicted in ``[start, end)``, each with all its
        predictions (the served one and every shadow version's)."""
        records = await self.pool.fetch(_WINDOW, model_name, start, end, limit)
        rows: dict[str, WindowRow] = {}
        for record in records:
            row = rows.get(record["request_id"])
            if row is None:
                row = WindowRow(
                    record["served_version"],
                    record["label"],
                    {record["served_version"]: record["prediction"]},
                )
                rows[record["request_id"]] = row
            if record["shadow_version"] is not None:
                row.predictions.setdefault(record["shadow_version"], record["shadow"])
        return list(rows.values())

    async def expire(self, model_name: str, retention: timedelta) -> int:
        """Delete the model's shadow rows older than ``retention`` (its hot retention: their
        predictions and labels are gone from Postgres by then); the number deleted."""
        status = await self.pool.execute(
            "DELETE FROM shadow_predictions WHERE model_name = $1 "
            "AND predicted_at < now() - $2::interval",
            model_name,
            retention,
        )
        return _affected(status)


async def open_shadow_log(
    settings: PostgresSettings,
    schema: str = "public",
    *,
    max_size: int = 2,
    give_up_after_seconds: float = 300.0,
) -> ShadowLog:
    """Apply the migrations to ``schema`` and open the shadow log on it."""
    pool = await open_migrated_pool(
        settings, schema, max_size=max_size, give_up_after_seconds=give_up_after_seconds
    )
    return ShadowLog(pool)
