"""Shadow scoring: the versions of a model that do not serve, scored on what the served one saw.

For each model the registry says which versions run in shadow beside the champion
(``resolve_plan``): the challenger under the alias ``challenger`` (waiting for live evidence),
the version the champion replaced (its tags ``driftloop.champion_version`` after a promotion,
``driftloop.restored_from`` after a rollback) and the model's first version, frozen. The
shadow-scorer (``consumers.shadow_scorer``) reads the predictions stream, never the request
path, and scores each row with each of them through the same native LightGBM path as serving
(``driftloop.serving.champion``: the same cache, loader and warm-up, the same declaration's
encoding); ``driftloop.storage.shadow_log`` keeps the rows with their role.

A share of the requests may be scored instead of all (``in_sample``): chosen by a hash of the
request id, so every shadow version scores the same requests, a replayed batch the same ones
again, and the comparisons (which join on request id) stay paired. The evidence then gathers
at that share of the traffic's pace, for a share of the CPU, the Kafka reads aside.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from driftloop.serving.champion import (
    Champion,
    ChampionCache,
    ChampionLoadError,
    ChampionRef,
    load_champion,
)
from driftloop.storage.shadow_log import ShadowPrediction, ShadowRole
from driftloop.training.retrain import CHAMPION_VERSION_TAG, DECISION_TAG, Outcome
from driftloop.training.trainer import CHALLENGER_ALIAS, CHAMPION_ALIAS
from schemas.events import PredictionEvent
from schemas.features import FeatureSpec

log = logging.getLogger(__name__)

# Tag of a version the live judge restored by a rollback: the version it was restored from
# (beside the DAG's DECISION_TAG and CHAMPION_VERSION_TAG, read for the previous champion).
RESTORED_FROM_TAG: Final = "driftloop.restored_from"


@dataclass(frozen=True, slots=True)
class ShadowVersion:
    """A version scored in shadow and why."""

    role: ShadowRole
    ref: ChampionRef


@dataclass(frozen=True, slots=True)
class ShadowPlan:
    """Which versions of a model run in shadow beside its champion."""

    model_name: str
    champion: ChampionRef
    champion_tags: Mapping[str, str]
    """The champion version's registry tags (its decision, what it replaced)."""
    shadows: Mapping[int, ShadowVersion]
    """Version -> its role; never the champion itself. A version holds one role, the first
    that applies of challenger, previous champion, first champion."""
    challenger: int | None
    """The version under the alias ``challenger`` (None: none, or the champion itself)."""
    previous: int | None
    """The version the champion replaced (None for a first model)."""
    first: int
    """The model's first version: the champion itself until a promotion."""


def previous_champion(tags: Mapping[str, str]) -> int | None:
    """The version a champion replaced, from its tags: the one it was restored from after a
    rollback, the one it was judged against when the DAG promoted it; None for a first model."""
    restored_from = tags.get(RESTORED_FROM_TAG)
    if restored_from is not None:
        return int(restored_from)
    if tags.get(DECISION_TAG) == Outcome.PROMOTED.value and CHAMPION_VERSION_TAG in tags:
        return int(tags[CHAMPION_VERSION_TAG])
    return None


def _ref(version: ModelVersion) -> ChampionRef:
    created = version.creation_timestamp
    return ChampionRef(
        str(version.name),
        int(version.version),
        str(version.run_id),
        datetime.fromtimestamp(created / 1000, tz=UTC) if created is not None else None,
    )


def _by_alias(client: MlflowClient, name: str, alias: str) -> ChampionRef | None:
    try:
        return _ref(client.get_model_version_by_alias(name, alias))
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def resolve_plan(client: MlflowClient, name: str) -> ShadowPlan | None:
    """The model's shadow versions as the registry says now; None when it has no champion.

    Raises ``MlflowException`` (or the HTTP client's error) when the registry is unreachable.
    """
    if "'" in name:
        raise ValueError(f"cannot search for model {name!r}: quote in its name")
    champion_version = _by_alias(client, name, CHAMPION_ALIAS)
    if champion_version is None:
        return None
    champion_tags = client.get_model_version(name, str(champion_version.version)).tags
    wanted: dict[int, ShadowRole] = {}
    challenger = _by_alias(client, name, CHALLENGER_ALIAS)
    if challenger is not None:
        wanted[challenger.version] = ShadowRole.CHALLENGER
    previous = previous_champion(champion_tags)
    if previous is not None:
        wanted.setdefault(previous, ShadowRole.PREVIOUS_CHAMPION)
    versions = client.search_model_versions(f"name = '{name}'")
    first = min([int(version.version) for version in versions] or [champion_version.version])
    wanted.setdefault(first, ShadowRole.FIRST_CHAMPION)
    wanted.pop(champion_version.version, None)
    shadows = {
        version: ShadowVersion(role, _ref(client.get_model_version(name, str(version))))
        for version, role in sorted(wanted.items())
    }
    return ShadowPlan(
        model_name=name,
        champion=champion_version,
        champion_tags=dict(champion_tags),
        shadows=shadows,
        challenger=challenger.version
        if challenger is not None and challenger.version != champion_version.version
        else None,
        previous=previous if previous != champion_version.version else None,
        first=first,
    )


class VersionSource(Protocol):
    """Where a version's files come from (``driftloop.serving.champion.ModelRegistry``)."""

    def download(self, ref: ChampionRef, destination: Path) -> None:
        """Put the version's model artifacts into the (existing, empty) ``destination``."""
        ...


class ShadowModels:
    """The loaded shadow versions of every model, kept in step with their plans."""

    def __init__(self, source: VersionSource, cache_dir: Path, *, share: float = 1.0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"the share of requests scored must be in (0, 1], got {share}")
        self.source = source
        self.share = share
        """Share of the requests scored (``in_sample``)."""
        self.cache = ChampionCache(cache_dir)
        self.plans: dict[str, ShadowPlan] = {}
        self._loaded: dict[tuple[str, int], Champion] = {}
        self._declarations: dict[tuple[str, int], FeatureSpec] = {}

    async def declaration(self, ref: ChampionRef) -> FeatureSpec:
        """The declaration a version was registered with (its metric, its live policy),
        read from its artifacts once and kept."""
        key = (ref.name, ref.version)
        spec = self._declarations.get(key)
        if spec is None:
            loaded = self._loaded.get(key)
            if loaded is None:
                loaded = await asyncio.to_thread(self._fetch_and_load, ref)
            spec = self._declarations[key] = loaded.spec
        return spec

    async def apply(self, plan: ShadowPlan) -> None:
        """Load the plan's versions not loaded yet (off the event loop), forget the others.

        A version that cannot be loaded is left out of the model's scoring and logged; the
        next plan tries it again.
        """
        for version, shadow in plan.shadows.items():
            key = (plan.model_name, version)
            if key in self._loaded:
                continue
            try:
                self._loaded[key] = await asyncio.to_thread(self._fetch_and_load, shadow.ref)
            except ChampionLoadError as error:
                log.warning("shadow %s v%d not loaded: %s", plan.model_name, version, error)
                continue
            log.info(
                "%s v%d scored in shadow as %s (champion v%d)",
                plan.model_name,
                version,
                shadow.role.value,
                plan.champion.version,
            )
        for model_name, version in list(self._loaded):
            if model_name == plan.model_name and version not in plan.shadows:
                del self._loaded[(model_name, version)]
        self.plans[plan.model_name] = plan

    def _fetch_and_load(self, ref: ChampionRef) -> Champion:
        if not self.cache.has(ref):
            self.cache.store(ref, lambda folder: self.source.download(ref, folder))
        return load_champion(self.cache.directory(ref), ref)

    def loaded(self, model_name: str) -> list[tuple[ShadowVersion, Champion]]:
        """The model's shadow versions that are loaded, with their roles."""
        plan = self.plans.get(model_name)
        if plan is None:
            return []
        # Read from a worker thread while ``apply`` may run on the event loop: one lookup per
        # version, so a version dropped meanwhile is skipped rather than a KeyError.
        found = []
        for version, shadow in plan.shadows.items():
            model = self._loaded.get((model_name, version))
            if model is not None:
                found.append((shadow, model))
        return found

    def score(self, events: Iterable[PredictionEvent]) -> list[ShadowPrediction]:
        """Every event scored by each shadow version of its model other than the one that
        served it; rows a version refuses or gives no finite score are left out."""
        by_model: dict[str, list[PredictionEvent]] = {}
        for event in events:
            if self.share == 1 or in_sample(event.request_id, self.share):
                by_model.setdefault(event.model_name, []).append(event)
        scored: list[ShadowPrediction] = []
        for model_name, model_events in by_model.items():
            for shadow, model in self.loaded(model_name):
                scored += _score_version(shadow, model, model_events)
        return scored


_HASH_RANGE: Final = 2**64


def in_sample(request_id: str, share: float) -> bool:
    """Whether a request is among the ``share`` scored: its id's hash (BLAKE2b, the same on
    every replica and run) below that share of the hash range."""
    return key_in_sample(request_id.encode(), share)


def key_in_sample(key: bytes | None, share: float) -> bool:
    """``in_sample`` of a prediction's Kafka key (its request id, ``partition_key``), checked
    before the record is decoded; a record without a key is decoded, and judged by its id."""
    if key is None:
        return True
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * _HASH_RANGE


def _score_version(
    shadow: ShadowVersion, model: Champion, events: Sequence[PredictionEvent]
) -> list[ShadowPrediction]:
    own = [event for event in events if event.model_version != model.version]
    if not own:
        return []
    # The version's own declaration encodes the rows: the input vector it was trained on.
    encoded = model.spec.encode_rows([event.features for event in own])
    if not encoded.accepted:
        return []
    values: list[float] = model.predict(encoded.matrix).tolist()
    rows: list[ShadowPrediction] = []
    for position, value in zip(encoded.accepted, values, strict=True):
        if not math.isfinite(value):
            continue
        event = own[position]
        rows.append(
            ShadowPrediction(
                request_id=event.request_id,
                model_name=event.model_name,
                model_version=model.version,
                role=shadow.role,
                served_version=event.model_version,
                predicted_at=event.occurred_at,
                prediction=value,
            )
        )
    return rows
