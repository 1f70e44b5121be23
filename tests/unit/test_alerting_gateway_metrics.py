"""The gateway metrics the alerts and dashboards need: model version and age, retrain decisions
read from model.events, spool capacity; and where their values come from (the registry's
registration date, the champion cache, the model-event follower)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from driftloop.events.spool import Spool
from driftloop.serving.champion import Champion, ChampionCache, ChampionRef, ModelRegistry
from driftloop.serving.hot_swap import ModelEventFollower
from driftloop.settings import KafkaSettings
from gateway.metrics import GatewayMetrics
from gateway.publishing import EventPublisher
from schemas.events import ModelDecision, ModelPromoted, ModelRejected
from schemas.features import load_feature_spec

pytestmark = pytest.mark.unit

RUN = "a" * 32
REGISTERED = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _champion(version: int, registered_at: datetime | None) -> Champion:
    return Champion(
        "bikeshare",
        version,
        RUN,
        datetime.now(UTC),
        booster=None,  # type: ignore[arg-type]  # the metrics read no booster
        spec=load_feature_spec("bikeshare"),
        registered_at=registered_at,
    )


def _decision(kind: type[ModelDecision], model: str = "bikeshare", **extra: Any) -> ModelDecision:
    return kind(
        model_name=model,
        model_version=4,
        run_id=RUN,
        champion_version=3,
        metric_name="rmse",
        greater_is_better=False,
        challenger_score=40.0,
        champion_score=50.0,
        **extra,
    )


def test_the_served_version_and_its_registration_time_are_exported() -> None:
    metrics = GatewayMetrics()
    metrics.record_champion(_champion(3, REGISTERED))
    registry = metrics.registry
    assert _value(registry, "gateway_model_version", model_name="bikeshare") == 3
    assert _value(
        registry, "gateway_model_registered_timestamp_seconds", model_name="bikeshare"
    ) == pytest.approx(REGISTERED.timestamp())

    metrics.record_champion(_champion(4, None))
    assert _value(registry, "gateway_model_version", model_name="bikeshare") == 4
    # An unknown registration date is no series, not a misleading age.
    assert (
        _value(registry, "gateway_model_registered_timestamp_seconds", model_name="bikeshare")
        is None
    )


def test_decisions_are_exported_at_zero_then_counted() -> None:
    metrics = GatewayMetrics()
    metrics.expect_decisions("bikeshare")
    registry = metrics.registry
    for decision in ("promoted", "rejected"):
        assert (
            _value(
                registry, "gateway_model_decisions_total", model_name="bikeshare", decision=decision
            )
            == 0
        )
    metrics.record_decision(_decision(ModelPromoted))
    metrics.record_decision(_decision(ModelRejected, model="other", reason="worse on holdout"))
    assert (
        _value(
            registry, "gateway_model_decisions_total", model_name="bikeshare", decision="promoted"
        )
        == 1
    )
    assert (
        _value(registry, "gateway_model_decisions_total", model_name="other", decision="rejected")
        == 1
    )


def test_spool_capacity_is_the_configured_maximum(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    spool = Spool(tmp_path / "spool.sqlite3", max_records=1234)
    try:
        metrics.publisher_status = EventPublisher(KafkaSettings(), spool, timeout_seconds=1).status
        assert _value(metrics.registry, "gateway_spool_capacity") == 1234
        assert _value(metrics.registry, "gateway_spool_depth") == 0
        assert _value(metrics.registry, "gateway_kafka_up") == 0
    finally:
        spool.close()


class _Version:
    version = "7"
    run_id = RUN
    creation_timestamp = int(REGISTERED.timestamp() * 1000)


class _Client:
    def get_model_version_by_alias(self, name: str, alias: str) -> _Version:
        return _Version()


def test_the_registry_reports_when_a_version_was_registered() -> None:
    registry = ModelRegistry("http://127.0.0.1:1")
    registry._client = _Client()  # type: ignore[assignment]
    ref = registry.resolve("bikeshare")
    assert ref == ChampionRef("bikeshare", 7, RUN)
    assert ref.registered_at == REGISTERED


def test_the_cache_remembers_the_registration_time(tmp_path: Path) -> None:
    cache = ChampionCache(tmp_path)
    ref = ChampionRef("bikeshare", 7, RUN, REGISTERED)
    cache.store(ref, lambda folder: None)
    cache.mark_current(ref)
    current = cache.current("bikeshare")
    assert current == ref
    assert current is not None
    assert current.registered_at == REGISTERED

    # A pointer written before the field existed still names the version, with no date.
    pointer = tmp_path / "bikeshare" / "current.json"
    pointer.write_text(json.dumps({"name": "bikeshare", "version": 7, "run_id": RUN}))
    old = cache.current("bikeshare")
    assert old == ref
    assert old is not None
    assert old.registered_at is None


class _Holder:
    model_name = "bikeshare"

    def __init__(self) -> None:
        self.refreshed: list[str] = []

    async def promoted(self, model_name: str) -> None:
        if model_name == self.model_name:
            self.refreshed.append("model_event")


async def test_the_follower_reports_every_decision_and_reloads_on_a_promotion() -> None:
    holder = _Holder()
    seen: list[ModelDecision] = []
    follower = ModelEventFollower(
        KafkaSettings(),
        holder.promoted,
        reader="test",
        on_decision=seen.append,
    )
    promoted = _decision(ModelPromoted)
    rejected = _decision(ModelRejected, reason="worse on holdout")
    other = _decision(ModelPromoted, model="other")
    for event in (promoted, rejected, other):
        await follower._handle(event.to_bytes())
    await follower._handle(b"not an event")
    assert [event.event_id for event in seen] == [
        promoted.event_id,
        rejected.event_id,
        other.event_id,
    ]
    assert holder.refreshed == ["model_event"]
