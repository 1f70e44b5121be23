"""Which versions the registry puts in shadow beside the champion (a sqlite MLflow registry)."""

from __future__ import annotations

import pytest

from driftloop.serving.shadow import RESTORED_FROM_TAG, resolve_plan
from driftloop.storage.shadow_log import ShadowRole
from driftloop.training import trainer
from driftloop.training.retrain import CHAMPION_VERSION_TAG, DECISION_TAG
from tests.unit.test_retraining import Registry, registry, registry_uri

pytestmark = pytest.mark.unit
__all__ = ["registry", "registry_uri"]  # fixtures of test_retraining, used here


def roles(registry: Registry) -> dict[int, ShadowRole]:
    plan = resolve_plan(registry.client, registry.name)
    assert plan is not None
    return {version: shadow.role for version, shadow in plan.shadows.items()}


def promote(registry: Registry, version: int, over: int) -> None:
    """What the retrain DAG leaves: the alias on ``version``, tagged as promoted over ``over``."""
    client = registry.client
    client.set_registered_model_alias(registry.name, trainer.CHAMPION_ALIAS, str(version))
    client.set_model_version_tag(registry.name, str(version), DECISION_TAG, "promoted")
    client.set_model_version_tag(registry.name, str(version), CHAMPION_VERSION_TAG, str(over))


def test_a_first_champion_has_nothing_in_shadow(registry: Registry) -> None:
    plan = resolve_plan(registry.client, registry.name)
    assert plan is not None
    assert (plan.champion.version, plan.first, plan.previous, plan.challenger) == (1, 1, None, None)
    assert plan.shadows == {}


def test_a_promoted_champion_has_its_predecessor_and_the_first_in_shadow(
    registry: Registry,
) -> None:
    promote(registry, 3, over=2)
    assert roles(registry) == {
        1: ShadowRole.FIRST_CHAMPION,
        2: ShadowRole.PREVIOUS_CHAMPION,
    }


def test_a_challenger_takes_its_role_first(registry: Registry) -> None:
    promote(registry, 3, over=2)
    registry.client.set_registered_model_alias(registry.name, trainer.CHALLENGER_ALIAS, "2")
    assert roles(registry) == {1: ShadowRole.FIRST_CHAMPION, 2: ShadowRole.CHALLENGER}


def test_after_a_rollback_the_demoted_version_is_the_predecessor(registry: Registry) -> None:
    promote(registry, 2, over=1)
    # The live judge moved the alias back to v1 and tagged it.
    registry.client.set_registered_model_alias(registry.name, trainer.CHAMPION_ALIAS, "1")
    registry.client.set_model_version_tag(registry.name, "1", RESTORED_FROM_TAG, "2")
    plan = resolve_plan(registry.client, registry.name)
    assert plan is not None
    assert (plan.previous, plan.first) == (2, 1)
    assert roles(registry) == {2: ShadowRole.PREVIOUS_CHAMPION}


def test_a_model_without_a_champion_has_no_plan(registry: Registry) -> None:
    registry.client.delete_registered_model_alias(registry.name, trainer.CHAMPION_ALIAS)
    assert resolve_plan(registry.client, registry.name) is None
