"""The decide step of a model declared ``training.live.promotion: shadow``: no alias move yet."""

from __future__ import annotations

import pytest

from driftloop.training import retrain, trainer
from driftloop.training.retrain import Outcome
from schemas.events import ChallengerShadowed, ModelDecision, ModelRejected, decode_model_event
from schemas.features import PromotionEvidence
from tests.unit.test_retraining import (
    Registry,
    challenger_of,
    evaluation_of,
    extracted_for,
    registry,
    registry_uri,
    unreachable_connections,
)

pytestmark = pytest.mark.unit
__all__ = ["registry", "registry_uri"]  # fixtures of test_retraining, used here


class Published:
    def __init__(self) -> None:
        self.events: list[ModelDecision] = []

    def __call__(self, event: ModelDecision) -> str:
        # What consumers read back from the wire.
        self.events.append(decode_model_event(event.to_bytes()))
        return "t.model.events"


def test_a_challenger_that_passes_the_holdout_waits_in_shadow(registry: Registry) -> None:
    published = Published()
    evaluation = evaluation_of(80.0).model_copy(
        update={"promotion_evidence": PromotionEvidence.SHADOW}
    )

    decision = retrain.decide_step(
        extracted_for(registry),
        challenger_of(registry),
        evaluation,
        connections=unreachable_connections(registry.uri),
        publish=published,
    )

    assert decision.outcome is Outcome.SHADOWED
    # The champion stays; the challenger is under its own alias for the shadow-scorer.
    assert registry.champion() == 1
    assert decision.alias_version == 1
    challenger = registry.client.get_model_version_by_alias(registry.name, "challenger")
    assert int(challenger.version) == 2
    assert registry.tags(2)[retrain.DECISION_TAG] == "shadowed"
    [event] = published.events
    assert isinstance(event, ChallengerShadowed)
    assert (event.model_version, event.champion_version) == (2, 1)


def test_a_challenger_that_fails_the_holdout_is_not_put_in_shadow(registry: Registry) -> None:
    published = Published()
    evaluation = evaluation_of(120.0).model_copy(
        update={"promotion_evidence": PromotionEvidence.SHADOW}
    )

    decision = retrain.decide_step(
        extracted_for(registry),
        challenger_of(registry),
        evaluation,
        connections=unreachable_connections(registry.uri),
        publish=published,
    )

    assert decision.outcome is Outcome.REJECTED
    assert registry.champion() == 1
    aliases = registry.client.get_registered_model(registry.name).aliases
    assert trainer.CHALLENGER_ALIAS not in aliases
    assert [type(event) for event in published.events] == [ModelRejected]
