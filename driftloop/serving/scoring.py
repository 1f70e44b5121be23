"""The one scoring service: feature rows in, the champion's predictions (or why not) out.

The gateway's ``POST /predict`` and the batch scorer's Kafka handler are thin transports over
``ScoringService``: each turns its own input into rows, asks for scores, and turns the
``Scores`` into its own answer (an HTTP body, ``ScoringResult`` and ``PredictionEvent``
messages). Rows are checked and encoded by the feature declaration
(``FeatureSpec.encode_rows``), so the gateway, the batch scorer and training read one input
vector and word a refusal the same way (``schemas.validation``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from driftloop.serving.champion import Champion, ChampionHolder
from schemas.features import EncodedRows, FeatureSpec
from schemas.fields import FeatureValue
from schemas.validation import Problem, problems_of


class NoModelError(RuntimeError):
    """No model is loaded yet: HTTP answers 503, the batch scorer waits and retries."""


@dataclass(frozen=True, slots=True)
class Scores:
    """What the champion made of a set of rows; positions are indices into the rows given."""

    champion: Champion
    """The one model version that scored every row (a swap meanwhile does not mix two)."""
    scored: list[int]
    """Positions of the rows scored, ascending."""
    rows: list[Mapping[str, FeatureValue]]
    """Each scored row as accepted, every declared feature present (missing values as None),
    in the order of ``scored``: what its PredictionEvent carries."""
    predictions: list[float]
    """The prediction of each scored row, in the order of ``scored``; always finite."""
    refused: list[tuple[int, list[Problem]]]
    """Rows the declaration refused, with every problem (fields relative to the row)."""
    failed: list[tuple[int, str]]
    """Rows the model gave no finite prediction for, with what it returned."""
    predict_seconds: float
    """Time of the one vectorised predict call."""


class ScoringService:
    """Checks rows against the declaration and scores them with the current champion."""

    def __init__(self, spec: FeatureSpec, holder: ChampionHolder) -> None:
        self.spec = spec
        self.holder = holder

    def champion(self) -> Champion:
        """The model serving now, or ``NoModelError``."""
        # One read of the holder per call: every row of a request or batch is scored and
        # described by the same model version, even if a swap happens meanwhile.
        champion = self.holder.current
        if champion is None:
            raise NoModelError(
                f"no model loaded yet: {self.holder.model_name}@{self.holder.alias} could not "
                "be loaded from MLflow or the local cache"
            )
        return champion

    def score(self, rows: Sequence[Mapping[str, object]]) -> Scores:
        """Score ``rows`` in the calling thread (the gateway: one request's few rows)."""
        champion = self.champion()
        encoded = self.spec.encode_rows(rows)
        started = time.perf_counter()
        output = champion.predict(encoded.matrix) if encoded.accepted else _NOTHING
        return self._scores(champion, rows, encoded, output, time.perf_counter() - started)

    async def score_in_thread(self, rows: Sequence[Mapping[str, object]]) -> Scores:
        """Score ``rows`` with the predict call in a worker thread (the batch scorer).

        LightGBM releases the GIL while it predicts: in a thread, a large batch's prediction
        runs beside the event loop decoding the next batch instead of stopping it.
        """
        champion = self.champion()
        encoded = self.spec.encode_rows(rows)
        started = time.perf_counter()
        output = (
            await asyncio.to_thread(champion.predict, encoded.matrix)
            if encoded.accepted
            else _NOTHING
        )
        return self._scores(champion, rows, encoded, output, time.perf_counter() - started)

    def _scores(
        self,
        champion: Champion,
        rows: Sequence[Mapping[str, object]],
        encoded: EncodedRows,
        output: npt.NDArray[np.float64],
        seconds: float,
    ) -> Scores:
        refused = [(position, _problems(error)) for position, error in encoded.refused]
        values: list[float] = output.tolist()
        names = self.spec.feature_names
        scored: list[int] = []
        accepted: list[Mapping[str, FeatureValue]] = []
        predictions: list[float] = []
        failed: list[tuple[int, str]] = []
        for position, value in zip(encoded.accepted, values, strict=True):
            if not math.isfinite(value):
                failed.append((position, f"the model returned {value}"))
                continue
            # A plain row holds declared features only, of their declared types; one that omits
            # nullable features gets them as None, as the event contract says. Another is
            # taken as the row model gave it (14.0 for an int feature becomes 14).
            row = encoded.checked.get(position) or cast(
                "Mapping[str, FeatureValue]", rows[position]
            )
            if len(row) != len(names):
                row = {name: row.get(name) for name in names}
            scored.append(position)
            accepted.append(row)
            predictions.append(value)
        return Scores(champion, scored, accepted, predictions, refused, failed, seconds)


_NOTHING = np.empty(0, dtype=np.float64)


def _problems(error: ValueError | TypeError) -> list[Problem]:
    if isinstance(error, ValidationError):
        return problems_of(error.errors(include_url=False), whole="")
    return [Problem("", str(error))]
