"""The demo's accounting of the loop: served predictions against the two baselines."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from driftloop.evaluation import loop_value
from driftloop_tools.demo import replay
from driftloop_tools.demo.cli import LoopTally, SimulatedTime, _value_table, account_for_loop
from schemas.features import load_feature_spec


def test_the_frozen_champions_own_predictions_have_no_lift_over_it() -> None:
    spec = load_feature_spec("bikeshare")
    frame = pd.read_csv("data/bikeshare/Bikeshare.csv")
    hours = replay.replay_hours(spec, frame, first_day=91, last_day=151)  # April and May
    history = loop_value.seed_history(spec)
    first = loop_value.first_champion(spec, history)
    rows = pd.DataFrame([hour.row for hour in hours])
    stats = replay.ReplayStats(total_hours=len(hours))
    for hour, prediction in zip(hours, loop_value.predict(spec, first, rows), strict=True):
        stats.record_prediction(hour.moment, float(prediction), hour.label)
    del stats.served[hours[3].moment]  # an hour the gateway did not answer

    accounting = account_for_loop(spec, hours, stats)

    found = accounting.comparison
    assert found.rows == len(hours) - 1
    assert abs(found.lift_over_frozen) < 1e-9
    # Two monthly retrains (April 1st, May 1st) beat the winter model on spring.
    assert accounting.scheduled_retrains == 2
    assert found.scheduled < found.frozen
    assert found.lift_over_scheduled < 0
    tally = LoopTally(triggers=Counter({"triggered": 1, "suppressed_cooldown": 2}))
    table = _value_table(accounting, tally, stats)
    assert table.row_count == 3
    assert "short of the target" in str(table.caption)
    assert np.isfinite(found.realised)


def busy(tally: LoopTally) -> bool:
    return tally.retraining


def test_a_retraining_is_in_flight_until_its_version_is_served() -> None:
    tally = LoopTally()
    assert not busy(tally)
    tally.in_flight.add("episode-1")
    assert busy(tally)
    tally.in_flight.clear()
    tally.promoted.append(2)
    assert busy(tally)
    tally.served.append(2)
    assert not busy(tally)
    tally.triggers.update({"triggered": 2, "already_triggered": 1, "failed": 4})
    assert tally.retrains == 3


def test_simulated_time_stops_while_the_clock_is_held() -> None:
    started = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    first = datetime(2011, 4, 1, tzinfo=UTC)
    holds = [(started + timedelta(seconds=10), started + timedelta(seconds=70))]
    clock = SimulatedTime(started, first, 30.0, holds)
    assert clock.at(started + timedelta(seconds=10)) == first + timedelta(hours=300)
    # Held from 10 s to 70 s: the simulated clock stands still, then runs on from there.
    assert clock.at(started + timedelta(seconds=40)) == first + timedelta(hours=300)
    assert clock.at(started + timedelta(seconds=80)) == first + timedelta(hours=600)
    # A hold still open stops the clock at its start.
    still = SimulatedTime(started, first, 30.0, [(started + timedelta(seconds=10), None)])
    assert still.at(started + timedelta(seconds=500)) == first + timedelta(hours=300)
