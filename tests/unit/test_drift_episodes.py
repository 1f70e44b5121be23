"""The drift episode state machine: when drift holds, stable ids, cool-down, replays."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter

from driftloop.drift.episodes import (
    EpisodePhase,
    EpisodeState,
    EpisodeStep,
    advance,
    episode_id,
    follow,
    start,
)
from driftloop.drift.policy import DriftPolicy
from schemas.fields import EpisodeId

T0 = datetime(2011, 4, 1, tzinfo=UTC)
POLICY = DriftPolicy(consecutive_windows=2, clean_windows_to_close=2)


def hour(n: int) -> datetime:
    return T0 + timedelta(hours=n)


def run(
    verdicts: Iterable[bool], policy: DriftPolicy = POLICY, state: EpisodeState | None = None
) -> list[EpisodeStep]:
    """Feed one window per hour (hour 1, 2, ...) and return every step."""
    current = state or start("bikeshare", 1)
    steps = []
    for n, drifted in enumerate(verdicts, start=1):
        step = advance(current, hour(n), drifted=drifted, policy=policy)
        steps.append(step)
        current = step.state
    return steps


def test_clean_windows_stay_quiet() -> None:
    steps = run([False, False, False])

    assert not any(step.drift_holds for step in steps)
    assert steps[-1].state.phase is EpisodePhase.QUIET
    assert steps[-1].episode_id is None


def test_drift_holds_after_consecutive_windows() -> None:
    first, second = run([True, True])

    assert not first.drift_holds
    assert first.state.phase is EpisodePhase.QUIET
    assert second.drift_holds
    assert second.opened
    assert second.state.phase is EpisodePhase.HOLDING
    # The id names the first drifted window of the streak, not the one that confirmed it.
    assert second.episode_id == episode_id("bikeshare", 1, hour(1))
    assert second.episode_id == "bikeshare-v1-20110401T010000.000000Z"


def test_one_window_is_enough_when_configured() -> None:
    (step,) = run([True], DriftPolicy(consecutive_windows=1))

    assert step.drift_holds
    assert step.episode_id == episode_id("bikeshare", 1, hour(1))


def test_a_clean_window_breaks_the_streak() -> None:
    steps = run([True, False, True, True])

    assert [step.drift_holds for step in steps] == [False, False, False, True]
    assert steps[-1].episode_id == episode_id("bikeshare", 1, hour(3))


def test_the_episode_keeps_its_id_while_drift_holds() -> None:
    steps = run([True, True, True, True])

    assert [step.drift_holds for step in steps] == [False, True, True, True]
    assert len({step.episode_id for step in steps[1:]}) == 1
    assert [step.opened for step in steps] == [False, True, False, False]


def test_an_episode_that_outlasts_its_retraining_is_renewed() -> None:
    policy = POLICY.model_copy(update={"renew_episode_windows": 3})
    # Two to open, then drifting on: the episode's 3 drifted windows, then a new episode.
    steps = run([True, True, True, True, False, True, True, True, True], policy)

    first = steps[1].episode_id
    assert [step.episode_id == first for step in steps[1:4]] == [True, True, True]
    renewed = steps[5]
    assert renewed.opened
    assert renewed.drift_holds
    assert renewed.closed == first
    assert renewed.episode_id == episode_id("bikeshare", 1, hour(6))
    # A clean window inside the episode does not count; the renewed one counts afresh.
    assert [step.state.episode_windows for step in steps] == [0, 1, 2, 3, 3, 1, 2, 3, 1]
    assert steps[8].opened
    assert steps[8].closed == renewed.episode_id


def test_without_renewal_an_episode_lasts_while_drift_holds() -> None:
    policy = POLICY.model_copy(update={"renew_episode_windows": None})
    steps = run([True] * 20, policy)

    assert len({step.episode_id for step in steps[1:]}) == 1
    assert sum(step.opened for step in steps) == 1


def test_a_state_saved_before_episodes_were_counted_renews_on_time() -> None:
    opened = run([True, True])[-1].state
    # As a monitor before renewal saved it: the field absent, read as 0.
    saved = EpisodeState.model_validate_json(opened.model_dump_json(exclude={"episode_windows"}))
    assert saved.episode_windows == 0
    policy = POLICY.model_copy(update={"renew_episode_windows": 2})
    third = advance(saved, hour(3), drifted=True, policy=policy)
    fourth = advance(third.state, hour(4), drifted=True, policy=policy)

    assert not third.opened
    assert fourth.opened
    assert fourth.closed == opened.episode_id


def test_a_clean_window_cools_down_without_closing() -> None:
    steps = run([True, True, False, True])
    cooling = steps[2]

    assert not cooling.drift_holds
    assert cooling.state.phase is EpisodePhase.COOLING
    assert cooling.episode_id == steps[1].episode_id
    # Drift again during the cool-down: the same episode, not a new one.
    assert steps[3].drift_holds
    assert steps[3].episode_id == steps[1].episode_id
    assert steps[3].state.clean_streak == 0


def test_clean_windows_close_the_episode_and_the_next_drift_opens_a_new_one() -> None:
    steps = run([True, True, False, False, True, True])
    first_episode = steps[1].episode_id

    assert steps[3].closed == first_episode
    assert steps[3].episode_id is None
    assert steps[3].state.phase is EpisodePhase.QUIET
    assert not steps[4].drift_holds  # a new streak needs its consecutive windows again
    assert steps[5].drift_holds
    assert steps[5].opened
    assert steps[5].episode_id == episode_id("bikeshare", 1, hour(5))
    assert steps[5].episode_id != first_episode


def test_replayed_or_older_windows_change_nothing() -> None:
    steps = run([True, True])
    state = steps[-1].state

    for moment in (hour(2), hour(1)):
        step = advance(state, moment, drifted=False, policy=POLICY)
        assert step.ignored
        assert step.state == state
        assert not step.drift_holds
        assert step.episode_id == state.episode_id


def test_replaying_the_same_windows_yields_the_same_episode() -> None:
    verdicts = [False, True, True, True, False]

    assert [step.episode_id for step in run(verdicts)] == [
        step.episode_id for step in run(verdicts)
    ]


def test_the_state_survives_a_restart_as_json() -> None:
    before = run([True, True, False])[-1].state
    restored = EpisodeState.model_validate_json(before.model_dump_json())

    assert restored == before
    after = advance(restored, hour(4), drifted=True, policy=POLICY)
    assert after.episode_id == before.episode_id
    assert after.drift_holds


def test_a_streak_survives_a_restart() -> None:
    half = run([True])[-1].state
    restored = EpisodeState.model_validate_json(half.model_dump_json())

    step = advance(restored, hour(2), drifted=True, policy=POLICY)

    assert step.episode_id == episode_id("bikeshare", 1, hour(1))


def test_a_new_champion_version_starts_afresh() -> None:
    holding = run([True, True])[-1].state

    assert follow(holding, 1) is holding
    fresh = follow(holding, 2)
    assert fresh == start("bikeshare", 2)
    step = advance(fresh, hour(3), drifted=True, policy=DriftPolicy(consecutive_windows=1))
    assert step.episode_id == episode_id("bikeshare", 2, hour(3))


def test_ids_depend_on_model_version_and_first_window() -> None:
    ids = {
        episode_id("bikeshare", 1, hour(1)),
        episode_id("bikeshare", 2, hour(1)),
        episode_id("other", 1, hour(1)),
        episode_id("bikeshare", 1, hour(2)),
    }

    assert len(ids) == 4
    local = hour(1).astimezone(datetime.now().astimezone().tzinfo)
    assert episode_id("bikeshare", 1, local) == episode_id("bikeshare", 1, hour(1))


@pytest.mark.parametrize("name", ["m", "a" * 100, "b" * 128])
def test_ids_are_valid_event_identifiers(name: str) -> None:
    identifier = episode_id(name, 123456, hour(1))

    assert TypeAdapter(EpisodeId).validate_python(identifier) == identifier
    assert len(identifier) <= 128
    assert identifier == episode_id(name, 123456, hour(1))


def test_long_names_keep_distinct_ids() -> None:
    assert episode_id("a" * 128, 1, hour(1)) != episode_id("a" * 127 + "b", 1, hour(1))


def test_naive_window_ends_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        advance(start("bikeshare", 1), datetime(2011, 4, 1), drifted=True, policy=POLICY)  # noqa: DTZ001
