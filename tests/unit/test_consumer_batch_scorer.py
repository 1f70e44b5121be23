"""The batch scorer's write, the batch file rows and dead-letter selection, with nothing running."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from consumers.batch_scorer import BatchScorer
from driftloop.events.consumer_loop import Delivery
from driftloop.serving.catalog import ServedModel
from driftloop.serving.scoring import NoModelError, ScoringService
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
from tests.unit.fake_kafka import FakeRecordProducer

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
    alias = "champion"

    def __init__(self, champion: FakeChampion | None, model_name: str = "bikeshare") -> None:
        self.current = champion
        self.model_name = model_name


class FakeModels:
    """The scorer's models: bikeshare by default, more added by ``declare`` (as if discovered)."""

    def __init__(self, champion: FakeChampion | None) -> None:
        self.default = self._served("bikeshare", champion)
        self.models = {"bikeshare": self.default}
        self.declared: dict[str, FakeChampion | None] = {}
        self.discoveries = 0

    @staticmethod
    def _served(name: str, champion: FakeChampion | None) -> ServedModel:
        holder = FakeHolder(champion, name)
        scoring = ScoringService(SPEC, holder)  # type: ignore[arg-type]
        return ServedModel(name, SPEC, holder, scoring)  # type: ignore[arg-type]

    def get(self, name: str | None) -> ServedModel | None:
        return self.default if name is None else self.models.get(name)

    async def discover(self) -> list[str]:
        self.discoveries += 1
        added = [name for name in self.declared if name not in self.models]
        for name in added:
            self.models[name] = self._served(name, self.declared[name])
        return added


def scorer(
    champion: FakeChampion | None, models: FakeModels | None = None
) -> tuple[BatchScorer, FakeRecordProducer]:
    producer = FakeRecordProducer()
    return (
        BatchScorer(
            models or FakeModels(champion),
            producer,
            results_topic="scoring.results",
            predictions_topic="predictions",
        ),
        producer,
    )


def request(index: int, model_name: str | None = None, **changes: Any) -> Delivery[ScoringRequest]:
    event = ScoringRequest(
        request_id=f"r-{index}",
        features={**ROW, **changes},
        batch_id="b-1",
        model_name=model_name,
    )
    return Delivery(event, "scoring.requests", 0, index)


async def test_a_batch_is_scored_in_one_call_and_answered_per_request() -> None:
    batch_scorer, producer = scorer(FakeChampion())
    await batch_scorer.write([request(0), request(1, hr=42), request(2)])
    results = [ScoringResult.from_bytes(v) for t, _, v in producer.sent if t == "scoring.results"]
    events = [PredictionEvent.from_bytes(v) for t, _, v in producer.sent if t == "predictions"]
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
    keys = {key for topic, key, _ in producer.sent if topic == "scoring.results"}
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
    results = [ScoringResult.from_bytes(v) for t, _, v in producer.sent if t == "scoring.results"]
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
    events = [PredictionEvent.from_bytes(v) for t, _, v in producer.sent if t == "predictions"]
    assert len({event.occurred_at for event in events}) == 1  # one answer time per batch


async def test_each_request_is_scored_by_the_model_it_names() -> None:
    models = FakeModels(FakeChampion())
    models.declared["bikeshare-v2"] = FakeChampion(name="bikeshare-v2", version=9)
    batch_scorer, producer = scorer(None, models)
    deliveries = [
        request(0),
        request(1, model_name="bikeshare-v2"),
        request(2, model_name="nope"),
        request(3, model_name="bikeshare"),
    ]
    await batch_scorer.write(deliveries)
    results = {
        result.request_id: result
        for result in (
            ScoringResult.from_bytes(v) for t, _, v in producer.sent if t == "scoring.results"
        )
    }
    assert (results["r-0"].model_name, results["r-0"].model_version) == ("bikeshare", 4)
    assert (results["r-3"].model_name, results["r-3"].model_version) == ("bikeshare", 4)
    assert (results["r-1"].model_name, results["r-1"].model_version) == ("bikeshare-v2", 9)
    unknown = results["r-2"]
    assert (unknown.model_name, unknown.model_version, unknown.prediction) == ("nope", None, None)
    assert unknown.error == "no model 'nope' is served here; served: ['bikeshare', 'bikeshare-v2']"
    assert models.discoveries == 1  # unknown names looked up once per batch
    events = [PredictionEvent.from_bytes(v) for t, _, v in producer.sent if t == "predictions"]
    assert sorted((event.request_id, event.model_name) for event in events) == [
        ("r-0", "bikeshare"),
        ("r-1", "bikeshare-v2"),
        ("r-3", "bikeshare"),
    ]


async def test_another_model_without_a_champion_is_answered_not_waited_for() -> None:
    models = FakeModels(FakeChampion())
    models.declared["fresh"] = None  # declared, no champion registered yet
    batch_scorer, producer = scorer(None, models)
    await batch_scorer.write([request(0, model_name="fresh"), request(1)])
    results = {
        result.request_id: result
        for result in (
            ScoringResult.from_bytes(v) for t, _, v in producer.sent if t == "scoring.results"
        )
    }
    assert results["r-0"].error == "model 'fresh' has no champion loaded yet"
    assert results["r-0"].model_version is None
    assert results["r-1"].prediction == 0.5


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
