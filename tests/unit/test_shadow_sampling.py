"""Scoring a share of the requests in shadow: chosen by request id, the same on every run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from driftloop.serving.champion import ChampionRef
from driftloop.serving.shadow import ShadowModels, ShadowVersion, in_sample, key_in_sample
from driftloop.storage.shadow_log import ShadowRole
from gateway.contract import example_row
from schemas.events import PredictionEvent
from schemas.features import FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit

IDS = [f"request-{n}" for n in range(20_000)]


def test_a_share_keeps_about_that_share_of_requests() -> None:
    for share in (0.01, 0.1, 0.5):
        kept = sum(in_sample(request_id, share) for request_id in IDS) / len(IDS)
        assert kept == pytest.approx(share, abs=0.01)
    assert all(in_sample(request_id, 1.0) for request_id in IDS)


def test_the_kafka_key_decides_as_the_request_id_does() -> None:
    # A prediction's key is its request id: the scorer skips a record before decoding it.
    for request_id in IDS[:2000]:
        assert key_in_sample(request_id.encode(), 0.2) == in_sample(request_id, 0.2)
    assert key_in_sample(None, 0.2)  # no key: decoded, then judged by its id


def test_the_choice_is_stable_and_nested() -> None:
    small = {request_id for request_id in IDS if in_sample(request_id, 0.1)}
    again = {request_id for request_id in IDS if in_sample(request_id, 0.1)}
    larger = {request_id for request_id in IDS if in_sample(request_id, 0.3)}
    assert small == again
    # A larger share scores every request a smaller one did: raising it keeps the pairs.
    assert small < larger


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share of requests scored"):
        ShadowModels(source=None, cache_dir=tmp_path, share=share)  # type: ignore[arg-type]


@dataclass
class ConstantVersion:
    """A loaded version that predicts 1.0 for every row (what ``score`` needs of one)."""

    version: int
    spec: FeatureSpec

    def predict(self, matrix: Any) -> npt.NDArray[np.float64]:
        return np.ones(len(matrix), dtype=np.float64)


def test_only_the_sampled_requests_are_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_feature_spec("bikeshare")
    models = ShadowModels(source=None, cache_dir=tmp_path, share=0.25)  # type: ignore[arg-type]
    previous = ShadowVersion(ShadowRole.PREVIOUS_CHAMPION, ChampionRef("bikeshare", 1, "r1"))
    first = ShadowVersion(ShadowRole.FIRST_CHAMPION, ChampionRef("bikeshare", 2, "r2"))
    loaded = [(previous, ConstantVersion(1, spec)), (first, ConstantVersion(2, spec))]
    monkeypatch.setattr(models, "loaded", lambda model_name: loaded)
    events = [
        PredictionEvent(
            request_id=request_id,
            model_name="bikeshare",
            model_version=3,
            run_id="0" * 32,
            features=example_row(spec),
            prediction=10.0,
            latency_ms=1.0,
            source="http",
            occurred_at=datetime.now(UTC),
        )
        for request_id in IDS[:2000]
    ]
    scored = models.score(events)
    wanted = {event.request_id for event in events if in_sample(event.request_id, 0.25)}
    # Both versions score the same requests: each shadow row has its pair.
    assert {row.request_id for row in scored if row.model_version == 1} == wanted
    assert {row.request_id for row in scored if row.model_version == 2} == wanted
    assert len(scored) == 2 * len(wanted)
