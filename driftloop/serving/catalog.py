"""The models a serving process serves: one per declaration, each with its own champion.

The gateway and the batch scorer serve every declared model through a ``ModelCatalog``: a
default model (the service's ``*_FEATURE_SPEC``, what a request naming no model gets) and one
``ServedModel`` per declaration, each with its own ``ChampionHolder`` (hot-swapped on its own)
and ``ScoringService``. A declaration added while the process runs is served without a restart:
``discover`` reads the declaration folders again. It runs when a ``ModelPromoted`` names a model
not served yet (the new model's first registration), on the poll, and on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from driftloop.serving.champion import (
    Champion,
    ChampionHolder,
    ChampionSource,
    LoadEvent,
)
from driftloop.serving.hot_swap import RELOAD_REASON
from driftloop.serving.scoring import ScoringService
from driftloop.settings import ServedModelSettings
from schemas.features import (
    FeatureSpec,
    FeatureSpecError,
    declared_feature_specs,
    load_feature_spec,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One registered model a process serves: its declaration, champion and scoring."""

    name: str
    """Registered model name (``/models/{name}/predict``, a ScoringRequest's model_name)."""
    spec: FeatureSpec
    holder: ChampionHolder
    scoring: ScoringService


class ModelCatalog:
    """The default model and every declared one, each loaded and polled on its own."""

    def __init__(
        self,
        settings: ServedModelSettings,
        default_spec: FeatureSpec,
        registry: ChampionSource,
        *,
        on_load: Callable[[str, LoadEvent], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._on_load = on_load
        self.default = self._served(
            settings.model_name or default_spec.registered_model_name, default_spec
        )
        self.models: dict[str, ServedModel] = {self.default.name: self.default}
        self.on_added: list[Callable[[ServedModel], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._discovering = asyncio.Lock()

    def get(self, name: str | None) -> ServedModel | None:
        """The served model ``name`` (the default one for None), or None."""
        return self.default if name is None else self.models.get(name)

    async def start(self) -> None:
        """Load the default model and every declared one; poll their aliases and the folders."""
        await self._add(self.default)
        await self.discover()
        self._tasks.append(
            asyncio.create_task(
                self._poll_declarations(self.settings.model_poll_seconds), name="declarations"
            )
        )

    async def stop(self) -> None:
        """Stop polling."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def discover(self) -> list[str]:
        """Serve every declared model not served yet (the settings' ``models`` limit which);
        the names added. The folders are read anew, so a declaration added since the start is
        served."""
        async with self._discovering:
            added: list[str] = []
            for name, spec in (await asyncio.to_thread(self._declared)).items():
                if name not in self.models:
                    await self._add(self._served(name, spec))
                    added.append(name)
            return added

    async def promoted(self, model_name: str) -> None:
        """A ``ModelPromoted`` for ``model_name``: reload it, or serve it if it is new."""
        served = self.models.get(model_name)
        if served is None:
            await self.discover()
            return
        await served.holder.refresh(RELOAD_REASON)

    async def refresh_all(self, reason: str) -> dict[str, Champion | None]:
        """Refresh every served model's champion; each one's serving champion afterwards."""
        return {name: await served.holder.refresh(reason) for name, served in self.models.items()}

    def _served(self, name: str, spec: FeatureSpec) -> ServedModel:
        on_load = self._on_load
        holder = ChampionHolder(
            self.registry,
            name,
            self.settings.model_cache(),
            alias=self.settings.model_alias,
            expected_spec=spec,
            on_load=None if on_load is None else (lambda event: on_load(name, event)),
        )
        return ServedModel(name, spec, holder, ScoringService(spec, holder))

    def _declared(self) -> dict[str, FeatureSpec]:
        wanted: Collection[str] = set(self.settings.models)
        declared: dict[str, FeatureSpec] = {}
        for declaration in declared_feature_specs():
            try:
                spec = load_feature_spec(declaration)
            except FeatureSpecError as error:
                # One broken declaration must not keep the others from being served.
                log.warning("declaration %s not served: %s", declaration, error)
                continue
            if not wanted or spec.registered_model_name in wanted:
                declared.setdefault(spec.registered_model_name, spec)
        return declared

    async def _add(self, served: ServedModel) -> None:
        self.models[served.name] = served
        for listener in self.on_added:
            listener(served)
        await served.holder.start()
        self._tasks.append(
            asyncio.create_task(
                served.holder.poll(self.settings.model_poll_seconds),
                name=f"champion-poll-{served.name}",
            )
        )

    async def _poll_declarations(self, interval_seconds: float) -> None:
        # The net behind model events for a model declared while Kafka was away.
        while True:
            await asyncio.sleep(interval_seconds)
            await self.discover()
