"""The publishing relay: its frames, and a real relay process spooling while Kafka is away."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings
from gateway.publishing import (
    Answer,
    ModelKey,
    PredictionRecords,
    PublisherState,
    PublisherStatus,
    datetime_of,
)
from gateway.relay import FrameReader, FrameWriter, RelayConfig, RelayPublisher
from schemas.events import PredictionEvent
from schemas.fields import FeatureValue

MODELS = [ModelKey("bikeshare", 3, "a" * 32), ModelKey("bikeshare", 4, "b" * 32)]
TOPIC = "unit.predictions"

record = st.builds(
    SpoolRecord,
    topic=st.text(min_size=1, max_size=30),
    key=st.one_of(st.none(), st.binary(max_size=40)),
    value=st.binary(max_size=300),
)
name = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
feature_value = st.one_of(
    st.none(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    count = draw(st.integers(min_value=1, max_value=4))
    return Answer(
        model=draw(st.sampled_from(MODELS)),
        # Up to the last microsecond of year 9999, the end of what a datetime holds.
        occurred_at_us=draw(st.integers(min_value=0, max_value=253_402_300_799_999_999)),
        latency_ms=draw(st.floats(min_value=0, max_value=1e6)),
        request_ids=draw(
            st.lists(st.text(min_size=1, max_size=40), min_size=count, max_size=count)
        ),
        rows=draw(
            st.lists(
                st.dictionaries(
                    st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), feature_value
                ),
                min_size=count,
                max_size=count,
            )
        ),
        predictions=draw(
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False), min_size=count, max_size=count
            )
        ),
    )


def _comparable(item: SpoolRecord) -> tuple[str, bytes | None, Any]:
    """A record with its value parsed and the random event id left out."""
    try:
        value = orjson.loads(item.value)
    except orjson.JSONDecodeError:
        return item
    if isinstance(value, dict):
        value.pop("event_id", None)
    return item.topic, item.key, value


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sent=st.lists(st.one_of(record, answers()), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_what_the_relay_reads_is_what_the_gateway_would_have_sent(
    sent: list[SpoolRecord | Answer], cuts: list[int]
) -> None:
    writer, in_process = FrameWriter(), PredictionRecords(TOPIC, "http")
    frames: list[bytes] = []
    expected: list[SpoolRecord] = []
    for item in sent:
        if isinstance(item, SpoolRecord):
            frames.append(writer.record(*item))
            expected.append(item)
            continue
        frames += writer.predictions(item)
        at = datetime_of(item.occurred_at_us)
        for request_id, row, prediction in zip(
            item.request_ids, item.rows, item.predictions, strict=True
        ):
            expected.append(
                in_process.record(item.model, at, request_id, row, prediction, item.latency_ms)
            )
    stream = b"".join(frames)
    # Read in arbitrary chunks: a frame may end anywhere in one.
    bounds = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    reader = FrameReader(PredictionRecords(TOPIC, "http"))
    received: list[SpoolRecord] = []
    for start, end in itertools.pairwise(bounds):
        received += reader.feed(stream[start:end])
    assert [_comparable(item) for item in received] == [_comparable(item) for item in expected]
    assert reader.pending == 0


def test_a_relayed_prediction_is_a_valid_prediction_event() -> None:
    writer, reader = FrameWriter(), FrameReader(PredictionRecords(TOPIC, "http"))
    at_us = 1_764_921_600_123_456
    row: dict[str, FeatureValue] = {"season": 2, "temp": 0.5, "mnth": "July", "hum": None}
    frames = writer.predictions(Answer(MODELS[1], at_us, 1.25, ["req-9"], [row], [412.5]))
    (item,) = reader.feed(b"".join(frames))
    event = PredictionEvent.from_bytes(item.value)
    assert (item.topic, item.key) == (TOPIC, b"req-9")
    assert event.occurred_at == datetime(2025, 12, 5, 8, 0, 0, 123456, tzinfo=UTC)
    assert (event.model_name, event.model_version, event.run_id) == MODELS[1]
    assert (event.request_id, event.features, event.prediction) == ("req-9", row, 412.5)
    assert (event.latency_ms, event.source) == (1.25, "http")


def test_a_partial_frame_waits_for_the_rest() -> None:
    frame = FrameWriter().record("predictions", b"r-1", b'{"x":1}')
    reader = FrameReader(PredictionRecords(TOPIC, "http"))
    assert reader.feed(frame[:-1]) == []
    assert reader.pending == len(frame) - 1
    assert reader.feed(frame[-1:]) == [SpoolRecord("predictions", b"r-1", b'{"x":1}')]


def test_a_status_knows_when_the_spool_is_full() -> None:
    assert PublisherStatus(
        state=PublisherState.SPOOLING, spool_depth=3, spool_capacity=3
    ).spool_full
    assert not PublisherStatus(
        state=PublisherState.SPOOLING, spool_depth=2, spool_capacity=3
    ).spool_full
    assert not PublisherStatus(state=PublisherState.STOPPED).spool_full


def _config(tmp_path: Path, max_records: int = 1000) -> RelayConfig:
    return RelayConfig(
        # Nothing listens there: the relay spools everything.
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9", topic_prefix="unit."),
        spool_path=tmp_path / "spool.sqlite3",
        spool_max_records=max_records,
        timeout_seconds=0.5,
        predictions_topic=TOPIC,
    )


async def _wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _spooled(path: Path) -> list[SpoolRecord]:
    spool = Spool(path, max_records=1000)
    try:
        return [item.record for item in spool.peek(1000)]
    finally:
        spool.close()


def _events(first: int, count: int) -> list[SpoolRecord]:
    return [
        SpoolRecord("unit.predictions", f"r-{i}".encode(), f'{{"n":{i}}}'.encode())
        for i in range(first, first + count)
    ]


async def test_a_relay_spools_in_order_while_kafka_is_away_and_hands_all_over_at_stop(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    relay = RelayPublisher(config, on_restart=lambda: None)
    await relay.start(connect_within_seconds=0.5)
    sent = _events(0, 300)
    for record in sent:
        relay.publish_encoded(*record)

    await _wait_for(lambda: relay.status().spool_depth == len(sent))
    status = relay.status()
    assert status.state is PublisherState.SPOOLING
    assert (status.spooled, status.spool_capacity, status.spool_dropped) == (300, 1000, 0)

    more = _events(300, 50)
    for record in more:
        relay.publish_encoded(*record)
    # Stopping right away still hands the 50 over: they are read, spooled, then it exits.
    await relay.stop()
    assert relay.status().state is PublisherState.STOPPED
    assert _spooled(config.spool_path) == sent + more

    # The spool outlives the relay: the next one starts with it.
    again = RelayPublisher(config, on_restart=lambda: None)
    await again.start(connect_within_seconds=0.5)
    try:
        assert again.status().spool_depth == len(sent) + len(more)
    finally:
        await again.stop()


async def test_a_full_spool_counts_the_events_it_drops(tmp_path: Path) -> None:
    relay = RelayPublisher(_config(tmp_path, max_records=5), on_restart=lambda: None)
    await relay.start(connect_within_seconds=0.5)
    try:
        for record in _events(0, 8):
            relay.publish_encoded(*record)
        await _wait_for(lambda: relay.status().spool_dropped == 3)
        assert relay.status().spool_full
    finally:
        await relay.stop()


async def test_a_relay_that_dies_is_replaced_and_its_counts_are_kept(tmp_path: Path) -> None:
    config = _config(tmp_path)
    restarts: list[int] = []
    relay = RelayPublisher(config, on_restart=lambda: restarts.append(1))
    await relay.start(connect_within_seconds=0.5)
    row: dict[str, FeatureValue] = {"temp": 0.5}
    try:
        relay.publish_predictions(Answer(MODELS[0], 0, 1.0, ["p-0"], [row], [1.0]))
        for record in _events(0, 10):
            relay.publish_encoded(*record)
        await _wait_for(lambda: relay.status().spooled == 11)
        first = relay.process_id
        assert first is not None
        os.kill(first, signal.SIGKILL)

        await _wait_for(lambda: relay.process_id not in (None, first) and bool(restarts))
        # The new relay knows the model described to the one before it.
        relay.publish_predictions(Answer(MODELS[0], 0, 1.0, ["p-1"], [row], [2.0]))
        for record in _events(10, 5):
            relay.publish_encoded(*record)
        await _wait_for(lambda: relay.status().spooled == 17)
        assert relay.status().spool_depth == 17
    finally:
        await relay.stop()
    assert restarts == [1]
    spooled = _spooled(config.spool_path)
    assert [item.key for item in spooled] == [
        b"p-0", *(record.key for record in _events(0, 10)),
        b"p-1", *(record.key for record in _events(10, 5)),
    ]  # fmt: skip
    assert PredictionEvent.from_bytes(spooled[11].value).prediction == 2.0


async def test_a_relay_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.spool_path.mkdir()  # a folder where the spool's file should be
    relay = RelayPublisher(config, on_restart=lambda: None)
    with pytest.raises(RuntimeError, match="exited with 1 before it started"):
        await relay.start(connect_within_seconds=0.5)
