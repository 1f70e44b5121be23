"""The batch scorer's write, the batch file rows and dead-letter selection, with nothing running."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from consumers.batch_scorer import BatchScorer
from driftloop.events.consumer_loop import Delivery
from driftloop.serving.scoring import NoModelError
from driftloop_tools.cli.batch import rows_from_records
from driftloop_tools.cli.dlq import StoredLetter, select
from schemas.events import (
    DeadLetter,
    FailureKind,
    PredictionEvent,
    ScoringRequest,
    ScoringResult,
)
from schemas.features import load_feature_spec
from schemas.fields import FeatureValue
from schemas.validation import describe, problems_of

SPEC = load_feature_spec("bikeshare")
ROW: dict[str, FeatureValue] = {
    "season": 1, "mnth": "Jan", "hr": 8, "holiday": 0, "weekday": 2, "workingday": 1,
    "weathersit": "clear", "temp": 0.2, "atemp": 0.2, "hum": 0.5, "windspeed": 0.1,
}  # fmt: skip


@dataclass
class FakeChampion:
    name: str = "bikeshare"
    version: int = 4
    run_id: str = "a" * 32

    def predict(self, matrix: Any) -> Any:
        assert matrix.shape[1] == len(SPEC.features)
        return np.arange(len(matrix), dtype=np.float64) + 0.5


class FakeHolder:
    model_name = "bikeshare"
    alias = "champion"

    def __init__(self, champion: FakeChampion | None) -> None:
        self.current = champion


class FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: int | None) -> object:
        self.records.append((key, value))
        return object()


class FakeProducer:
    """Acknowledges every batch at once; ``sent`` lists (topic, value, key) in send order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.partitions: list[int] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        self.sent += [(topic, value, key) for key, value in batch.records]
        self.partitions += [partition] * len(batch.records)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def scorer(champion: FakeChampion | None) -> tuple[BatchScorer, FakeProducer]:
    producer = FakeProducer()
    return (
        BatchScorer(
            FakeHolder(champion),  # type: ignore[arg-type]
            SPEC,
            producer,
            results_topic="scoring.results",
            predictions_topic="predictions",
        ),
        producer,
    )


def request(index: int, **changes: Any) -> Delivery[ScoringRequest]:
    event = ScoringRequest(request_id=f"r-{index}", features={**ROW, **changes}, batch_id="b-1")
    return Delivery(event, "scoring.requests", 0, index)


async def test_a_batch_is_scored_in_one_call_and_answered_per_request() -> None:
    batch_scorer, producer = scorer(FakeChampion())
    await batch_scorer.write([request(0), request(1, hr=42), request(2)])
    results = [ScoringResult.from_bytes(v) for t, v, _ in producer.sent if t == "scoring.results"]
    events = [PredictionEvent.from_bytes(v) for t, v, _ in producer.sent if t == "predictions"]
    by_id = {result.request_id: result for result in results}
    assert by_id["r-0"].prediction == 0.5
    assert by_id["r-2"].prediction == 1.5
    assert by_id["r-1"].prediction is None
    assert "hr" in (by_id["r-1"].error or "")
    assert {result.model_version for result in results} == {4}
    assert {result.batch_id for result in results} == {"b-1"}
    assert [event.request_id for event in events] == ["r-0", "r-2"]
    assert {event.source for event in events} == {"batch"}
    assert {event.run_id for event in events} == {"a" * 32}
    keys = {key for topic, _, key in producer.sent if topic == "scoring.results"}
    assert keys == {b"b-1"}


async def test_refusals_are_worded_from_validate_row_and_scores_keep_request_order() -> None:
    batch_scorer, producer = scorer(FakeChampion())
    # Values a ScoringRequest carries (NaN and bools never get this far) that the spec refuses.
    spoilt: list[dict[str, Any]] = [
        {"hr": 24},
        {"temp": "warm"},
        {"season": "1"},
        {"mnth": "january"},
        {"season": None},
        {"humidity": 0.5},
        {"hr": 8.5},
    ]
    deliveries = [request(0)]
    for index, changes in enumerate(spoilt, start=1):
        deliveries += [request(index, **changes), request(100 + index, temp=None, hum=1)]
    await batch_scorer.write(deliveries)
    results = [ScoringResult.from_bytes(v) for t, v, _ in producer.sent if t == "scoring.results"]
    errors = {result.request_id: result.error for result in results if result.error}
    for index, changes in enumerate(spoilt, start=1):
        with pytest.raises(ValidationError) as refused:
            SPEC.validate_row({**ROW, **changes})
        problems = problems_of(refused.value.errors(include_url=False), whole="features")
        assert errors[f"r-{index}"] == f"invalid features: {describe(problems)}"
    scored = [result for result in results if result.prediction is not None]
    # FakeChampion scores the n-th row of the matrix n + 0.5: rows keep the requests' order.
    assert [result.request_id for result in scored] == ["r-0"] + [
        f"r-{100 + index}" for index in range(1, len(spoilt) + 1)
    ]
    assert [result.prediction for result in scored] == [n + 0.5 for n in range(len(scored))]
    events = [PredictionEvent.from_bytes(v) for t, v, _ in producer.sent if t == "predictions"]
    assert len({event.occurred_at for event in events}) == 1  # one answer time per batch


async def test_without_a_champion_the_batch_waits() -> None:
    batch_scorer, producer = scorer(None)
    with pytest.raises(NoModelError):
        await batch_scorer.write([request(0)])
    assert batch_scorer.is_transient(NoModelError("x"))
    assert producer.sent == []


def test_file_rows_become_declared_json_values() -> None:
    records = [{**ROW, "hr": 8.0, "temp": math.nan, "bikers": 12, "day": 1}]
    (row,) = rows_from_records(SPEC, records)
    assert row["hr"] == 8
    assert isinstance(row["hr"], int)
    assert row["temp"] is None
    assert "bikers" not in row
    SPEC.validate_row(row)


def test_dead_letters_are_selected_by_offset_range_and_failure() -> None:
    def stored(offset: int, failure: FailureKind) -> StoredLetter:
        letter = DeadLetter(
            original_value=b"x",
            failure=failure,
            reason="bad",
            source_topic="predictions",
            source_partition=0,
            source_offset=offset,
            consumer_group="g",
            occurred_at=datetime.now(UTC),
        )
        return StoredLetter(0, offset, letter)

    letters = [
        stored(0, FailureKind.INVALID_JSON),
        stored(1, FailureKind.INVALID_EVENT),
        stored(2, FailureKind.INVALID_JSON),
    ]
    assert [s.offset for s in select(letters, failure=FailureKind.INVALID_JSON)] == [0, 2]
    assert [s.offset for s in select(letters, from_offset=1, to_offset=1)] == [1]
