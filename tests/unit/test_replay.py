"""The demo replay: hours in time order, the accelerated clock, labels sent after their hour."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
import pytest

from driftloop.seed_data import seed_data_path
from driftloop_tools.demo import replay
from schemas.features import FeatureSpec, load_feature_spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def frame(spec: FeatureSpec) -> pd.DataFrame:
    assert spec.dataset is not None
    return pd.read_csv(seed_data_path(spec.dataset.path))


def test_day_of_year() -> None:
    assert replay.day_of_year("01-01") == 1
    assert replay.day_of_year("04-01") == 91
    assert replay.day_of_year("12-31") == 365
    with pytest.raises(ValueError, match="MM-DD"):
        replay.day_of_year("02-30")


def test_hours_come_in_time_order_with_valid_rows(spec: FeatureSpec, frame: pd.DataFrame) -> None:
    hours = replay.replay_hours(
        spec, frame.sample(frac=1, random_state=1), first_day=91, last_day=151
    )

    assert len(hours) == 719 + 744
    assert [hour.moment for hour in hours] == sorted(hour.moment for hour in hours)
    assert hours[0].moment == datetime(2011, 4, 1, tzinfo=UTC)
    assert hours[-1].moment.date() == datetime(2011, 5, 31, tzinfo=UTC).date()
    for hour in hours[:50]:
        assert spec.validate_row(hour.row) == hour.row
    json.dumps([hour.row for hour in hours])


def test_request_ids_are_valid_gateway_ids(spec: FeatureSpec, frame: pd.DataFrame) -> None:
    (hour,) = replay.replay_hours(
        spec, frame[frame["day"] == 91].head(1), first_day=1, last_day=365
    )

    request_id = replay.hour_request_id(replay.new_replay_id(), hour)

    assert request_id.endswith("-d091h00")
    assert len(request_id) <= 100


def test_only_labels_of_past_hours_are_due() -> None:
    start = datetime(2011, 4, 1, tzinfo=UTC)
    waiting = [
        replay.DueLabel(start + timedelta(hours=n + 1), f"r{n}:0", float(n)) for n in range(3)
    ]

    due = replay.take_due(waiting, start + timedelta(hours=2))

    assert [label.row_id for label in due] == ["r0:0", "r1:0"]
    assert [label.row_id for label in waiting] == ["r2:0"]


def test_last_day_rmse_forgets_older_hours() -> None:
    stats = replay.ReplayStats(total_hours=3)
    start = datetime(2011, 4, 1, tzinfo=UTC)
    stats.record_prediction(start, 100.0, 0.0)
    stats.record_prediction(start + timedelta(hours=30), 3.0, 0.0)
    stats.record_prediction(start + timedelta(hours=31), 5.0, 1.0)
    stats.predictions = 3

    assert stats.last_day_rmse() == pytest.approx((12.5) ** 0.5)
    assert stats.rmse() == pytest.approx(((10000 + 9 + 16) / 3) ** 0.5)


def answered(request_id: str, prediction: float) -> httpx.Response:
    """The gateway's answer to a one-row /predict by version 1 of bikeshare."""
    return httpx.Response(
        200,
        json={
            "request_id": request_id,
            "model_name": "bikeshare",
            "model_version": 1,
            "predictions": [{"request_id": f"{request_id}:0", "prediction": prediction}],
        },
    )


async def test_replay_sends_each_hour_and_its_label_after_it(
    spec: FeatureSpec, frame: pd.DataFrame
) -> None:
    hours = replay.replay_hours(spec, frame, first_day=91, last_day=91)[:5]
    calls: list[tuple[str, Any, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append((request.url.path, body, request.headers.get("x-request-id")))
        if request.url.path == "/feedback":
            return httpx.Response(202, json={"accepted": len(body)})
        request_id = request.headers["x-request-id"]
        if request_id.endswith("h03"):
            return httpx.Response(500, json={"detail": []})
        return answered(request_id, 10.0)

    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        replayer = replay.Replayer(
            client, hours, replay_id="replay-test", hours_per_second=1000, concurrency=1
        )
        stats = await replayer.run()

    predicts = [call for call in calls if call[0] == "/predict"]
    assert [call[2] for call in predicts] == [f"replay-test-d091h{hour.hour:02d}" for hour in hours]
    assert stats.hours_sent == 5
    assert stats.predictions == 4
    assert stats.errors == {"predict 500": 1}
    assert stats.versions == {1: 4}
    labelled = [
        label["request_id"] for path, body, _ in calls if path == "/feedback" for label in body
    ]
    assert sorted(labelled) == sorted(stats.row_ids)
    assert stats.labels_sent == 4
    # A label goes out only after its hour: never in the same step as its own prediction.
    first_feedback = next(index for index, call in enumerate(calls) if call[0] == "/feedback")
    assert first_feedback > 0


async def test_a_held_clock_sends_nothing_until_released(
    spec: FeatureSpec, frame: pd.DataFrame
) -> None:
    hours = replay.replay_hours(spec, frame, first_day=91, last_day=91)[:3]
    paths: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/feedback":
            return httpx.Response(202, json={"accepted": 1})
        request_id = request.headers["x-request-id"]
        return answered(request_id, 7.0)

    transport = httpx.MockTransport(answer)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        replayer = replay.Replayer(
            client, hours, replay_id="replay-held", hours_per_second=1000, concurrency=1
        )
        replayer.hold()
        running = asyncio.create_task(replayer.run())
        # Time enough for a free-running replay of three hours (3 ms) to finish many times.
        await asyncio.sleep(0.2)
        assert paths == []
        assert not running.done()
        replayer.release()
        stats = await running

    assert paths.count("/predict") == 3
    # One hold, closed by the release (its length is the wall clock's: not asserted).
    assert [until is not None for _, until in stats.holds] == [True]
    assert stats.holds_timed_out == 0
    # Every served hour is kept for the loop's accounting, by its moment.
    assert stats.served == {hour.moment: 7.0 for hour in hours}
