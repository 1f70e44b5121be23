"""The retrain trigger's decisions and its ledger (``retrain_triggers``, one row per episode).

The decision is a pure function of the drift event, the episode's ledger row and the model's
last accepted trigger, so it is unit-tested without a database. The cooldown runs on
prediction time (event time): a drift event's window end against the window end of the
model's last accepted trigger, never the wall clock when the events happen to be handled. A
replay faster than real time, a backlog the monitor catches up on, or a trigger restarted
after an outage then decide exactly as live traffic would have; in production, where windows
close as the traffic arrives, prediction time is real time. The ledger is written
idempotently: a row that reached ``triggered`` or ``already_triggered`` is final; a
``suppressed_cooldown`` or ``failed`` row is decided again when its episode drifts again
(the cooldown may be over, the missing DAG may have been deployed).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

import asyncpg

from driftloop.settings import PostgresSettings
from driftloop.storage.database import open_migrated_pool
from schemas.events import DriftDetected

# Airflow's default [scheduler] allowed_run_id_pattern, and the run_id column's length.
RUN_ID_ALLOWED: Final = re.compile(r"[^A-Za-z0-9_.~:+-]")
RUN_ID_MAX_LENGTH: Final = 250
RUN_ID_PREFIX: Final = "drift-"


class TriggerState(StrEnum):
    """The ledger state of an episode."""

    TRIGGERED = "triggered"
    """Airflow created the DAG run for this episode."""
    ALREADY_TRIGGERED = "already_triggered"
    """Airflow answered 409: the episode's run existed (a replay, or an earlier attempt)."""
    SUPPRESSED_COOLDOWN = "suppressed_cooldown"
    """Another episode of the model triggered a run within the cooldown."""
    FAILED = "failed"
    """Permanently refused: unknown model, missing DAG, refused conf."""

    @property
    def accepted(self) -> bool:
        """Whether a DAG run exists for the episode (the row is final)."""
        return self in {TriggerState.TRIGGERED, TriggerState.ALREADY_TRIGGERED}


class Decision(StrEnum):
    """What to do with one drift event."""

    TRIGGER = "trigger"
    DUPLICATE = "duplicate"
    SUPPRESS_COOLDOWN = "suppress_cooldown"
    UNKNOWN_MODEL = "unknown_model"


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PriorTrigger:
    """The model's accepted trigger with the latest window (for the cooldown)."""

    episode_id: str
    window_end: datetime
    """End of the drifted window that triggered it, in prediction time."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    episode_id: str
    model_name: str
    dag_id: str
    dag_run_id: str
    state: TriggerState
    reason: str | None
    triggered_at: datetime | None
    dag_run_state: str | None


def dag_run_id_for(episode_id: str) -> str:
    """The Airflow run id of an episode: ``drift-<episode_id>``, stable and collision-free."""
    cleaned = RUN_ID_ALLOWED.sub("_", episode_id)
    run_id = f"{RUN_ID_PREFIX}{cleaned}"
    if cleaned == episode_id and len(run_id) <= RUN_ID_MAX_LENGTH:
        return run_id
    # Replacing characters (or truncating) could map two episodes to one id: a hash of the
    # original keeps them apart while the readable part stays.
    digest = hashlib.sha256(episode_id.encode()).hexdigest()[:16]
    keep = RUN_ID_MAX_LENGTH - len(RUN_ID_PREFIX) - len(digest) - 1
    return f"{RUN_ID_PREFIX}{cleaned[:keep]}-{digest}"


def decide(
    event: DriftDetected,
    *,
    known_models: frozenset[str],
    previous: LedgerEntry | None,
    last_trigger: PriorTrigger | None,
    cooldown: timedelta,
) -> Verdict:
    """Trigger, skip as a duplicate, suppress for the model's cooldown, or refuse the model.

    The cooldown holds while the event's window ends less than ``cooldown`` of prediction time
    after the window that last triggered (an older window, delivered late, is inside it too).
    """
    if previous is not None and previous.state.accepted:
        return Verdict(Decision.DUPLICATE, f"episode already {previous.state.value}")
    if event.model_name not in known_models:
        return Verdict(
            Decision.UNKNOWN_MODEL,
            f"unknown model {event.model_name!r} (known: {', '.join(sorted(known_models))})",
        )
    if (
        last_trigger is not None
        and last_trigger.episode_id != event.episode_id
        and event.window_end < last_trigger.window_end + cooldown
    ):
        until = last_trigger.window_end + cooldown
        return Verdict(
            Decision.SUPPRESS_COOLDOWN,
            f"episode {last_trigger.episode_id} triggered {event.model_name} on the window "
            f"ending {last_trigger.window_end.isoformat()}; cooldown until windows ending "
            f"{until.isoformat()} (prediction time)",
        )
    return Verdict(Decision.TRIGGER)


_UPSERT = """
INSERT INTO retrain_triggers (episode_id, model_name, model_version, dag_id, dag_run_id, state,
                              reason, drift_share, event_id, window_end, triggered_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (episode_id) DO UPDATE
SET model_version = EXCLUDED.model_version, dag_id = EXCLUDED.dag_id,
    dag_run_id = EXCLUDED.dag_run_id, state = EXCLUDED.state, reason = EXCLUDED.reason,
    drift_share = EXCLUDED.drift_share, event_id = EXCLUDED.event_id,
    window_end = EXCLUDED.window_end, triggered_at = EXCLUDED.triggered_at, updated_at = now()
WHERE retrain_triggers.state NOT IN ('triggered', 'already_triggered')
"""
_ENTRY = """
SELECT episode_id, model_name, dag_id, dag_run_id, state, reason, triggered_at, dag_run_state
FROM retrain_triggers WHERE episode_id = $1
"""
# The accepted trigger with the latest window, in prediction time: the order the triggers were
# accepted in (wall clock) may differ when windows arrive late. A model has one accepted row
# per episode, so the scan is small; retrain_triggers_cooldown narrows it to the model.
_LAST_TRIGGER = """
SELECT episode_id, window_end FROM retrain_triggers
WHERE model_name = $1 AND triggered_at IS NOT NULL
ORDER BY window_end DESC, triggered_at DESC LIMIT 1
"""
_OPEN_RUNS = """
SELECT episode_id, model_name, dag_id, dag_run_id, state, reason, triggered_at, dag_run_state
FROM retrain_triggers
WHERE triggered_at IS NOT NULL
  AND (dag_run_state IS NULL OR dag_run_state NOT IN ('success', 'failed'))
ORDER BY updated_at
LIMIT $1
"""
_RECENT = """
SELECT episode_id, model_name, dag_id, dag_run_id, state, reason, triggered_at, dag_run_state
FROM retrain_triggers ORDER BY created_at DESC LIMIT $1
"""
_RUN_STATE = """
UPDATE retrain_triggers
SET dag_run_state = $2, dag_run_started_at = $3, dag_run_ended_at = $4, updated_at = now()
WHERE episode_id = $1
  AND (dag_run_state IS DISTINCT FROM $2 OR dag_run_started_at IS DISTINCT FROM $3
       OR dag_run_ended_at IS DISTINCT FROM $4)
"""


def _entry(row: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(
        episode_id=row["episode_id"],
        model_name=row["model_name"],
        dag_id=row["dag_id"],
        dag_run_id=row["dag_run_id"],
        state=TriggerState(row["state"]),
        reason=row["reason"],
        triggered_at=row["triggered_at"],
        dag_run_state=row["dag_run_state"],
    )


class RetrainLedger:
    """The ``retrain_triggers`` table of one Postgres schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def close(self) -> None:
        await self.pool.close()

    async def entry(self, episode_id: str) -> LedgerEntry | None:
        """The episode's row, if any."""
        row = await self.pool.fetchrow(_ENTRY, episode_id)
        return None if row is None else _entry(row)

    async def last_trigger(self, model_name: str) -> PriorTrigger | None:
        """The model's accepted trigger with the latest window end (prediction time)."""
        row = await self.pool.fetchrow(_LAST_TRIGGER, model_name)
        return None if row is None else PriorTrigger(row["episode_id"], row["window_end"])

    async def record(
        self,
        event: DriftDetected,
        *,
        dag_id: str,
        dag_run_id: str,
        state: TriggerState,
        reason: str | None,
        triggered_at: datetime | None,
    ) -> bool:
        """Write the episode's decision; False when the row was already final (a replay)."""
        status = await self.pool.execute(
            _UPSERT,
            event.episode_id,
            event.model_name,
            event.model_version,
            dag_id,
            dag_run_id,
            state.value,
            reason,
            event.drift_share,
            event.event_id,
            event.window_end,
            triggered_at,
        )
        return bool(status.endswith(" 1"))

    async def open_runs(self, limit: int = 100) -> list[LedgerEntry]:
        """Accepted triggers whose DAG run has not finished (as far as the ledger knows)."""
        return [_entry(row) for row in await self.pool.fetch(_OPEN_RUNS, limit)]

    async def recent(self, limit: int = 20) -> list[LedgerEntry]:
        """The most recently created rows, newest first."""
        return [_entry(row) for row in await self.pool.fetch(_RECENT, limit)]

    async def update_run_state(
        self,
        episode_id: str,
        state: str,
        started_at: datetime | None,
        ended_at: datetime | None,
    ) -> None:
        """Record the DAG run's last known state."""
        await self.pool.execute(_RUN_STATE, episode_id, state, started_at, ended_at)


async def open_retrain_ledger(
    settings: PostgresSettings, schema: str = "public", *, give_up_after_seconds: float = 300.0
) -> RetrainLedger:
    """Apply the migrations to ``schema`` and open a small pool whose sessions work in it."""
    pool = await open_migrated_pool(
        settings, schema, max_size=2, give_up_after_seconds=give_up_after_seconds
    )
    return RetrainLedger(pool)
