"""The one scoring service: rows checked and encoded by the declaration, scored by one champion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest

from driftloop.serving.scoring import NoModelError, ScoringService
from gateway.contract import ProblemDetails
from gateway.problems import ScoringFailedError, problem_answer
from schemas.features import load_feature_spec
from schemas.fields import FeatureValue
from schemas.validation import Problem

SPEC = load_feature_spec("bikeshare")
ROW: dict[str, FeatureValue] = {
    "season": 1, "mnth": "Jan", "hr": 8, "holiday": 0, "weekday": 2, "workingday": 1,
    "weathersit": "clear", "temp": 0.2, "atemp": 0.2, "hum": 0.5, "windspeed": 0.1,
}  # fmt: skip


@dataclass
class RecordingChampion:
    """Predicts the given outputs, in order, and keeps the matrices it was asked about."""

    outputs: list[float]
    name: str = "bikeshare"
    version: int = 3
    run_id: str = "c" * 32
    matrices: list[Any] = field(default_factory=list)

    def predict(self, matrix: Any) -> Any:
        self.matrices.append(matrix)
        return np.array(self.outputs[: len(matrix)], dtype=np.float64)


@dataclass
class Holder:
    current: RecordingChampion | None
    model_name: str = "bikeshare"
    alias: str = "champion"


def service(champion: RecordingChampion | None) -> ScoringService:
    return ScoringService(SPEC, Holder(champion))  # type: ignore[arg-type]


def test_valid_rows_are_scored_in_one_call_with_every_feature_in_their_event_rows() -> None:
    champion = RecordingChampion([1.5, 2.5])
    sparse = {name: value for name, value in ROW.items() if name != "temp"}

    scores = service(champion).score([ROW, {**sparse, "hr": 14.0}])

    assert len(champion.matrices) == 1
    assert scores.champion.version == champion.version
    assert scores.scored == [0, 1]
    assert scores.predictions == [1.5, 2.5]
    assert scores.rows[0] == ROW
    assert scores.rows[1] == {**ROW, "temp": None, "hr": 14}
    assert type(scores.rows[1]["hr"]) is int
    assert (scores.refused, scores.failed) == ([], [])


def test_refused_rows_carry_their_problems_relative_to_the_row() -> None:
    champion = RecordingChampion([7.0])

    scores = service(champion).score([{**ROW, "hr": 24}, ROW, [1, 2]])  # type: ignore[list-item]

    assert scores.scored == [1]
    assert scores.predictions == [7.0]
    (first, problems), (third, whole) = scores.refused
    assert (first, third) == (0, 2)
    assert [problem.field for problem in problems] == ["hr"]
    assert [problem.under("[2]").field for problem in whole] == ["[2]"]


def test_a_non_finite_output_is_a_failed_row_not_a_prediction() -> None:
    scores = service(RecordingChampion([float("nan"), 3.0])).score([ROW, ROW])

    assert scores.scored == [1]
    assert scores.failed == [(0, "the model returned nan")]
    answer = problem_answer(ScoringFailedError([Problem("[0]", scores.failed[0][1])]))
    assert answer is not None
    status, body = answer
    assert status == 500
    assert ProblemDetails.model_validate(orjson.loads(body)).errors[0].field == "[0]"


async def test_the_batch_path_scores_in_a_thread_with_the_same_outcome() -> None:
    rows = [ROW, {**ROW, "mnth": "Smarch"}, ROW]
    in_loop = service(RecordingChampion([1.0, 2.0])).score(rows)
    in_thread = await service(RecordingChampion([1.0, 2.0])).score_in_thread(rows)

    assert (in_thread.scored, in_thread.predictions, in_thread.rows) == (
        in_loop.scored,
        in_loop.predictions,
        in_loop.rows,
    )
    assert in_thread.refused == in_loop.refused


def test_without_a_champion_nothing_is_scored() -> None:
    with pytest.raises(NoModelError, match="bikeshare@champion"):
        service(None).score([ROW])
