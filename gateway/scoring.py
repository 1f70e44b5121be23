"""The one scoring core of the gateway: request bytes in, checked rows, scores and events out.

Routes stay thin: they pass the body and the request id here and turn the result (or a
``RequestProblemError``) into a response. Rows are checked by the feature declaration's own row
model (``FeatureSpec.validate_row``) and encoded by it (``FeatureSpec.encode_row``), so the
gateway, the batch scorer and training read one input vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np
import orjson
from prometheus_client import Counter, Histogram
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from driftloop.champion import Champion, ChampionHolder
from gateway.contract import Feedback
from gateway.metrics import GatewayMetrics
from gateway.publishing import Answer, ModelKey, Publisher
from schemas.features import FeatureSpec
from schemas.fields import FeatureValue

T = TypeVar("T")

# A request with thousands of bad rows gets a readable answer, not a megabyte of errors.
MAX_REPORTED_PROBLEMS: Final = 50


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with one part of a request: where (``field``) and why (``reason``)."""

    field: str
    reason: str


class RequestProblemError(ValueError):
    """The request cannot be served as sent; answered with ``status`` and the problems."""

    def __init__(self, status: int, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"{problem.field}: {problem.reason}" for problem in problems))
        self.status = status
        self.problems = list(problems)


class NoModelError(RuntimeError):
    """No model is loaded yet: the gateway answers 503 with this reason."""


@dataclass(frozen=True, slots=True)
class Scores:
    """The answer to one /predict request."""

    champion: Champion
    row_ids: list[str]
    predictions: list[float]
    single: bool


@dataclass(frozen=True, slots=True)
class _ChampionOutputs:
    """What the scorer writes for one model version: its metric children, its name in events."""

    predictions: Counter
    values: Histogram
    model: ModelKey


def parse_json(body: bytes) -> Any:
    """The body as JSON, or a 400 problem naming the parse error."""
    if not body:
        raise RequestProblemError(400, [Problem("body", "empty body; expected JSON")])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestProblemError(400, [Problem("body", f"not valid JSON: {error}")]) from None


def problems_from(error: ValidationError, prefix: str = "") -> list[Problem]:
    """One problem per validation error, with a dotted path such as ``[3].temp``."""
    return [_problem(detail, prefix) for detail in error.errors(include_url=False)]


def _problem(detail: ErrorDetails, prefix: str) -> Problem:
    path = prefix
    for part in detail["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return Problem(path or "body", detail["msg"])


def check_rows(payload: object, *, max_items: int, what: str) -> tuple[list[Any], bool]:
    """A JSON object or a non-empty list of at most ``max_items``: (items, was_single)."""
    if isinstance(payload, dict):
        return [payload], True
    if not isinstance(payload, list):
        raise RequestProblemError(
            422,
            [Problem("body", f"expected one {what} (object) or a list of them, "
                     f"got {type(payload).__name__}")],
        )  # fmt: skip
    if not payload:
        raise RequestProblemError(422, [Problem("body", f"empty list; send at least one {what}")])
    if len(payload) > max_items:
        raise RequestProblemError(
            413,
            [Problem("body", f"{len(payload)} {what}s; at most {max_items} per request")],
        )
    return payload, False


def _capped(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= MAX_REPORTED_PROBLEMS:
        return problems
    hidden = len(problems) - MAX_REPORTED_PROBLEMS
    return [*problems[:MAX_REPORTED_PROBLEMS], Problem("body", f"and {hidden} more problems")]


def check_items(
    items: Sequence[Any], single: bool, validate: Callable[[dict[str, Any]], T]
) -> list[T]:
    """Every item validated, or one 422 naming the problems of all of them."""
    checked: list[T] = []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        prefix = "" if single else f"[{index}]"
        if not isinstance(item, dict):
            problems.append(
                Problem(prefix or "body", f"expected an object, got {type(item).__name__}")
            )
            continue
        try:
            checked.append(validate(item))
        except ValidationError as error:
            problems += problems_from(error, prefix)
    if problems:
        raise RequestProblemError(422, _capped(problems))
    return checked


def read_feedback(body: bytes, *, max_items: int) -> list[Feedback]:
    """The checked labels of a /feedback body (one object or a list)."""
    items, single = check_rows(parse_json(body), max_items=max_items, what="label")
    return check_items(items, single, Feedback.model_validate)


class Scorer:
    """Checks rows against the declaration, scores them with the champion, publishes events."""

    def __init__(
        self,
        spec: FeatureSpec,
        holder: ChampionHolder,
        publisher: Publisher | None,
        metrics: GatewayMetrics,
        *,
        max_rows: int,
    ) -> None:
        self.spec = spec
        self.holder = holder
        self.publisher = publisher
        self.metrics = metrics
        self.max_rows = max_rows
        self._width = len(spec.features)
        self._champion_outputs: dict[tuple[str, int], _ChampionOutputs] = {}

    def rows(self, body: bytes) -> tuple[list[dict[str, FeatureValue]], bool]:
        """The checked feature rows of a request body, and whether it held one object."""
        items, single = check_rows(parse_json(body), max_items=self.max_rows, what="row")
        return check_items(items, single, self.spec.validate_row), single

    def score(
        self,
        rows: Sequence[Mapping[str, FeatureValue]],
        request_id: str,
        *,
        single: bool,
        started: float,
    ) -> Scores:
        """Score checked rows with the current champion and publish one event per row."""
        # One read of the holder: every row of the request is scored and described by the
        # same model version, even if a swap happens meanwhile.
        champion = self.holder.current
        if champion is None:
            raise NoModelError(
                f"no model loaded yet: {self.holder.model_name}@{self.holder.alias} could not "
                "be loaded from MLflow or the local cache"
            )
        matrix = np.empty((len(rows), self._width), dtype=np.float64)
        for position, row in enumerate(rows):
            matrix[position] = self.spec.encode_row(row)
        predictions: list[float] = champion.predict(matrix).tolist()
        row_ids = [request_id] if single else [f"{request_id}:{i}" for i in range(len(rows))]
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._record(champion, rows, row_ids, predictions, latency_ms)
        return Scores(champion, row_ids, predictions, single)

    def _outputs(self, champion: Champion) -> _ChampionOutputs:
        # Resolved once per model version: labels() takes a lock and hashes the labels.
        key = (champion.name, champion.version)
        outputs = self._champion_outputs.get(key)
        if outputs is None:
            outputs = self._champion_outputs[key] = _ChampionOutputs(
                self.metrics.predictions.labels(champion.name, str(champion.version)),
                self.metrics.prediction_values.labels(champion.name),
                ModelKey(champion.name, champion.version, champion.run_id),
            )
        return outputs

    def _record(
        self,
        champion: Champion,
        rows: Sequence[Mapping[str, FeatureValue]],
        row_ids: list[str],
        predictions: list[float],
        latency_ms: float,
    ) -> None:
        outputs = self._outputs(champion)
        outputs.predictions.inc(len(rows))
        for prediction in predictions:
            outputs.values.observe(prediction)
        if self.publisher is None:
            return
        self.publisher.publish_predictions(
            Answer(outputs.model, time.time_ns() // 1000, latency_ms, row_ids, rows, predictions)
        )
