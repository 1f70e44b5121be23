"""Drift episodes: when drift holds, which episode a drifted window belongs to, when it ends.

A pure state machine over the windows of one model version, so the drift monitor can keep the
state in Postgres and replay it after a restart. Drift holds after ``consecutive_windows``
drifted windows in a row; the episode then stays open (same ``episode_id``) until
``clean_windows_to_close`` clean windows in a row close it, or until it has drifted
``renew_episode_windows`` windows and drifts again: the version still serves, so its retraining
did not replace it (the challenger lost, or the run failed), and a new episode (a new id, so a
new retraining once the trigger's cooldown allows) takes over. The id is derived from the model
name, the version and the end of the streak's first drifted window, so re-running the same
windows after a crash yields the same id, and the retrain trigger's dedup by episode works.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from driftloop.drift.policy import DriftPolicy
from schemas.fields import UtcDatetime

# Identifier (schemas.fields) allows 128 characters; longer readable ids become hashed ones.
_MAX_EPISODE_ID: Final = 128


class EpisodePhase(StrEnum):
    """Where a model version stands after a window."""

    QUIET = "quiet"
    """No drift, or a drifted streak still shorter than ``consecutive_windows``."""
    HOLDING = "holding"
    """An episode is open and this window drifted."""
    COOLING = "cooling"
    """An episode is open and this window was clean; not yet enough clean ones to close it."""


class EpisodeState(BaseModel):
    """What the machine remembers about one model version between windows."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    model_name: str
    model_version: int = Field(ge=1)
    drifted_streak: int = Field(default=0, ge=0)
    """Drifted windows in a row (counted while no episode is open)."""
    streak_start: UtcDatetime | None = None
    """End of the first window of the current drifted streak."""
    episode_id: str | None = None
    """The open episode, if any."""
    clean_streak: int = Field(default=0, ge=0)
    """Clean windows in a row since the open episode last drifted."""
    episode_windows: int = Field(default=0, ge=0)
    """Drifted windows of the open episode so far (its first included)."""
    last_window_end: UtcDatetime | None = None
    """End of the last window observed; older or repeated windows are ignored."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.drifted_streak == 0) != (self.streak_start is None):
            raise ValueError("streak_start is set exactly when drifted_streak > 0")
        return self

    @property
    def phase(self) -> EpisodePhase:
        """The phase this state is in."""
        if self.episode_id is None:
            return EpisodePhase.QUIET
        return EpisodePhase.COOLING if self.clean_streak else EpisodePhase.HOLDING


class EpisodeStep(BaseModel):
    """The outcome of one window: the new state and whether to publish ``DriftDetected``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    state: EpisodeState
    """State to keep for the next window."""
    drift_holds: bool
    """Publish ``DriftDetected`` for this window (with ``episode_id``)."""
    episode_id: str | None
    """The open episode after this window (also set while cooling down)."""
    opened: bool = False
    """This window opened the episode."""
    closed: str | None = None
    """Id of the episode this window closed."""
    ignored: bool = False
    """The window was not newer than the last one observed: nothing changed."""


def episode_id(model_name: str, model_version: int, first_window_end: datetime) -> str:
    """Stable id of the episode whose first drifted window ended at ``first_window_end``."""
    moment = first_window_end.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    readable = f"{model_name}-v{model_version}-{moment}"
    if len(readable) <= _MAX_EPISODE_ID:
        return readable
    digest = hashlib.sha256(readable.encode()).hexdigest()[:16]
    return f"{readable[: _MAX_EPISODE_ID - len(digest) - 1]}-{digest}"


def start(model_name: str, model_version: int) -> EpisodeState:
    """The state of a model version nothing has been observed for."""
    return EpisodeState(model_name=model_name, model_version=model_version)


def follow(state: EpisodeState, model_version: int) -> EpisodeState:
    """The state for the current champion version: a new version starts with no episode."""
    if model_version == state.model_version:
        return state
    return start(state.model_name, model_version)


def skip(state: EpisodeState, window_end: datetime) -> EpisodeState:
    """Move past a refused window: it is not observed (streaks unchanged), but not read again."""
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    window_end = window_end.astimezone(UTC)
    if state.last_window_end is not None and window_end <= state.last_window_end:
        return state
    return state.model_copy(update={"last_window_end": window_end})


def advance(
    state: EpisodeState, window_end: datetime, *, drifted: bool, policy: DriftPolicy
) -> EpisodeStep:
    """Take one judged window (refused windows are not observed: they neither drift nor clear)."""
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    window_end = window_end.astimezone(UTC)
    if state.last_window_end is not None and window_end <= state.last_window_end:
        return EpisodeStep(
            state=state, drift_holds=False, episode_id=state.episode_id, ignored=True
        )
    seen = state.model_copy(update={"last_window_end": window_end})
    if state.episode_id is not None:
        if drifted:
            # States saved before episodes were counted: the episode has at least its first.
            drifted_so_far = max(state.episode_windows, 1)
            renew = policy.renew_episode_windows
            if renew is not None and drifted_so_far >= renew:
                renewed_id = episode_id(state.model_name, state.model_version, window_end)
                renewed = seen.model_copy(
                    update={"episode_id": renewed_id, "clean_streak": 0, "episode_windows": 1}
                )
                return EpisodeStep(
                    state=renewed,
                    drift_holds=True,
                    episode_id=renewed_id,
                    opened=True,
                    closed=state.episode_id,
                )
            holding = seen.model_copy(
                update={"clean_streak": 0, "episode_windows": drifted_so_far + 1}
            )
            return EpisodeStep(state=holding, drift_holds=True, episode_id=state.episode_id)
        clean = state.clean_streak + 1
        if clean >= policy.clean_windows_to_close:
            closed = seen.model_copy(
                update={"episode_id": None, "clean_streak": 0, "episode_windows": 0}
            )
            return EpisodeStep(
                state=closed, drift_holds=False, episode_id=None, closed=state.episode_id
            )
        cooling = seen.model_copy(update={"clean_streak": clean})
        return EpisodeStep(state=cooling, drift_holds=False, episode_id=state.episode_id)
    if not drifted:
        quiet = seen.model_copy(update={"drifted_streak": 0, "streak_start": None})
        return EpisodeStep(state=quiet, drift_holds=False, episode_id=None)
    streak_start = state.streak_start or window_end
    streak = state.drifted_streak + 1
    if streak < policy.consecutive_windows:
        building = seen.model_copy(update={"drifted_streak": streak, "streak_start": streak_start})
        return EpisodeStep(state=building, drift_holds=False, episode_id=None)
    opened_id = episode_id(state.model_name, state.model_version, streak_start)
    opened = seen.model_copy(
        update={
            "drifted_streak": 0,
            "streak_start": None,
            "episode_id": opened_id,
            "clean_streak": 0,
            "episode_windows": 1,
        }
    )
    return EpisodeStep(state=opened, drift_holds=True, episode_id=opened_id, opened=True)
