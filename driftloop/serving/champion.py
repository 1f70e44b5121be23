"""The champion model: loaded from the MLflow registry, cached on disk, swapped atomically.

Anything that scores (the gateway, the batch scorer) holds a ``ChampionHolder`` and reads
``holder.current`` once per request or batch: that reference is one complete ``Champion``
(booster, feature declaration, name, version, run id), never half of an old and half of a new
one. A new version is downloaded, loaded and warmed off the event loop; only then does one
attribute assignment make it current, so no request fails or waits for a load.

Every loaded version is kept under ``cache_dir/<model>/<version>/`` with a pointer to the last
one served, so a process restarted while MLflow is down serves that version again.

Usage::

    holder = ChampionHolder(ModelRegistry(tracking_uri), "bikeshare", Path(".cache/models"))
    await holder.start()                       # registry, else the cache; never raises
    champion = holder.current                  # None until a model is loaded
    predictions = champion.predict(matrix)     # float64 rows in the declared feature order
    await holder.refresh("model promoted")     # e.g. on a ModelPromoted event
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

import lightgbm as lgb
import mlflow.artifacts
import numpy as np
import numpy.typing as npt
import yaml
from mlflow.tracking import MlflowClient

from driftloop.serving.lightgbm_native import SingleRowPredictor, version_supported
from driftloop.training.trainer import (
    BOOSTER_ARTIFACT,
    CHAMPION_ALIAS,
    DECLARATION_ARTIFACT,
    FEATURE_SPEC_FILE,
)
from schemas.features import FeatureSpec
from schemas.fields import utc_now

log = logging.getLogger(__name__)

_POINTER_FILE: Final = "current.json"
_REFERENCE_FILE: Final = "champion.json"
_WARM_ROWS: Final = 64


@dataclass(frozen=True, slots=True)
class ChampionRef:
    """Which model version an alias points at."""

    name: str
    version: int
    run_id: str
    registered_at: datetime | None = field(default=None, compare=False)
    """When the version was registered (its age for monitoring); ``None`` when unknown."""


@dataclass(frozen=True, slots=True, eq=False)
class Champion:
    """A loaded, warmed model version: everything needed to score and to describe a score."""

    name: str
    version: int
    run_id: str
    loaded_at: datetime
    booster: lgb.Booster
    spec: FeatureSpec
    _single_row: SingleRowPredictor | None = field(default=None, repr=False)
    registered_at: datetime | None = None
    """When the version was registered in the registry; ``None`` when unknown."""

    @property
    def ref(self) -> ChampionRef:
        """The registry version this model is."""
        return ChampionRef(self.name, self.version, self.run_id, self.registered_at)

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Scores of a (rows x declared features) float64 matrix, NaN for missing values."""
        if self._single_row is not None and matrix.shape[0] == 1 and matrix.flags.c_contiguous:
            return self._single_row(matrix)
        # One thread: a request holds a few rows, and OpenMP's fan-out costs more than it saves
        # on them (measured: 75 us against 1.5 ms for one row); parallelism comes from serving
        # many requests.
        scores = self.booster.predict(matrix, num_threads=1)
        return np.asarray(scores, dtype=np.float64)


class ChampionLoadError(RuntimeError):
    """A model version could not be fetched or loaded; the message says which and why."""


class LoadSource(StrEnum):
    """Where a champion's files came from."""

    REGISTRY = "registry"
    CACHE = "cache"


class LoadOutcome(StrEnum):
    """What one load attempt did."""

    LOADED = "loaded"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LoadEvent:
    """One load attempt, reported to the holder's listener (metrics, logs)."""

    outcome: LoadOutcome
    source: LoadSource
    reason: str
    ref: ChampionRef | None
    error: str | None = None


class ChampionSource(Protocol):
    """Where model versions come from: the MLflow registry (``ModelRegistry``) or a test double."""

    def resolve(self, name: str, alias: str = CHAMPION_ALIAS) -> ChampionRef:
        """The version behind ``alias``; raises ``ChampionLoadError`` when there is none."""
        ...

    def download(self, ref: ChampionRef, destination: Path) -> None:
        """Put the version's model artifacts into the (existing, empty) ``destination``."""
        ...


class ModelRegistry:
    """The MLflow registry, through the tracking server (which also serves the artifacts)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def resolve(self, name: str, alias: str = CHAMPION_ALIAS) -> ChampionRef:
        """The version behind ``alias``; raises ``ChampionLoadError`` when there is none."""
        try:
            version = self._client.get_model_version_by_alias(name, alias)
        except Exception as error:
            raise ChampionLoadError(f"cannot resolve {name}@{alias}: {error}") from error
        if not version.run_id:
            raise ChampionLoadError(f"{name} version {version.version} has no run id")
        created = version.creation_timestamp
        registered_at = (
            datetime.fromtimestamp(created / 1000, tz=UTC) if created is not None else None
        )
        return ChampionRef(name, int(version.version), str(version.run_id), registered_at)

    def download(self, ref: ChampionRef, destination: Path) -> None:
        """Download the version's model artifacts into the (existing, empty) ``destination``."""
        try:
            source = self._client.get_model_version_download_uri(ref.name, str(ref.version))
            # Into a staging folder first: some sources land in a subfolder named after the
            # artifact path (MLflow 3: "artifacts"), whose files are lifted into the
            # destination, and the model may hold a folder of that same name (the pyfunc's).
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=destination))
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging), tracking_uri=self.tracking_uri
                )
            )
            for child in local.iterdir():
                shutil.move(child, destination / child.name)
            shutil.rmtree(staging)
        except Exception as error:
            raise ChampionLoadError(
                f"cannot download {ref.name} version {ref.version}: {error}"
            ) from error


class ChampionCache:
    """Model versions on local disk, and which one was served last."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, ref: ChampionRef) -> Path:
        """Where a version's artifacts live."""
        return self.root / ref.name / str(ref.version)

    def has(self, ref: ChampionRef) -> bool:
        """Whether the version is complete on disk (written by ``store``)."""
        return (self.directory(ref) / _REFERENCE_FILE).is_file()

    def store(self, ref: ChampionRef, fetch: Callable[[Path], None]) -> Path:
        """Fill the version's folder with ``fetch(folder)``, all or nothing."""
        final = self.directory(ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=final.parent))
        try:
            fetch(staging)
            (staging / _REFERENCE_FILE).write_text(json.dumps(_ref_document(ref)))
            shutil.rmtree(final, ignore_errors=True)
            # A rename is atomic: readers see no folder or a complete one.
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def mark_current(self, ref: ChampionRef) -> None:
        """Remember ``ref`` as the version to serve after a restart without the registry."""
        pointer = self.root / ref.name / _POINTER_FILE
        staging = pointer.with_suffix(".tmp")
        staging.write_text(json.dumps(_ref_document(ref)))
        staging.replace(pointer)

    def current(self, name: str) -> ChampionRef | None:
        """The version last served for ``name``, when it is still complete on disk."""
        pointer = self.root / name / _POINTER_FILE
        try:
            document = json.loads(pointer.read_text())
            registered = document.get("registered_at")
            ref = ChampionRef(
                str(document["name"]),
                int(document["version"]),
                document["run_id"],
                datetime.fromisoformat(registered) if registered else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ref if self.has(ref) else None


def _ref_document(ref: ChampionRef) -> dict[str, object]:
    registered = ref.registered_at.isoformat() if ref.registered_at is not None else None
    return {
        "name": ref.name,
        "version": ref.version,
        "run_id": ref.run_id,
        "registered_at": registered,
    }


def model_files(directory: Path) -> tuple[Path, Path]:
    """The booster file and the declaration of a model version's artifacts, in either layout.

    Versions are the declared pyfunc (``driftloop.serving.declared_pyfunc``: booster and
    declaration among the pyfunc's artifacts); versions registered before it are MLflow's
    LightGBM flavour with the declaration in ``extra_files``. Both keep being served: the
    registry holds the old ones for good.
    """
    flavors = yaml.safe_load((directory / "MLmodel").read_text())["flavors"]
    if "lightgbm" in flavors:
        booster_file = directory / flavors["lightgbm"]["data"]
        return booster_file, directory / "extra_files" / FEATURE_SPEC_FILE
    artifacts = flavors["python_function"]["artifacts"]
    return (
        directory / artifacts[BOOSTER_ARTIFACT]["path"],
        directory / artifacts[DECLARATION_ARTIFACT]["path"],
    )


def load_champion(
    directory: Path, ref: ChampionRef, *, expected_spec: FeatureSpec | None = None
) -> Champion:
    """Load and warm the booster in ``directory`` with its declaration (``model_files``).

    With ``expected_spec``, a model whose declared features differ is refused: it would read
    another input vector than the callers build.
    """
    try:
        booster_file, spec_file = model_files(directory)
        booster = lgb.Booster(model_file=str(booster_file))
        spec = FeatureSpec.model_validate(yaml.safe_load(spec_file.read_text()))
    except Exception as error:
        raise ChampionLoadError(
            f"{ref.name} version {ref.version} in {directory} is not a LightGBM model with "
            f"its feature declaration: {error}"
        ) from error
    if expected_spec is not None and spec.features != expected_spec.features:
        raise ChampionLoadError(
            f"{ref.name} version {ref.version} declares features {spec.feature_names}, "
            f"this service reads {expected_spec.feature_names}"
        )
    if booster.num_feature() != len(spec.features):
        raise ChampionLoadError(
            f"{ref.name} version {ref.version} reads {booster.num_feature()} features, "
            f"its declaration has {len(spec.features)}"
        )
    champion = Champion(
        ref.name,
        ref.version,
        ref.run_id,
        utc_now(),
        booster,
        spec,
        SingleRowPredictor(booster, len(spec.features)) if version_supported() else None,
        ref.registered_at,
    )
    # The first predictions of a fresh booster pay for lazy initialisation; pay it here.
    warm = np.full((_WARM_ROWS, len(spec.features)), np.nan)
    champion.predict(warm[:1])
    champion.predict(warm)
    return champion


class ChampionHolder:
    """Serves one registered model's champion and swaps in new versions atomically."""

    def __init__(
        self,
        registry: ChampionSource,
        model_name: str,
        cache_dir: Path,
        *,
        alias: str = CHAMPION_ALIAS,
        expected_spec: FeatureSpec | None = None,
        on_load: Callable[[LoadEvent], None] | None = None,
    ) -> None:
        self.registry = registry
        self.model_name = model_name
        self.alias = alias
        self.cache = ChampionCache(cache_dir)
        self.expected_spec = expected_spec
        self._on_load = on_load
        self._current: Champion | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Champion | None:
        """The serving champion; ``None`` until one is loaded."""
        return self._current

    async def start(self) -> Champion | None:
        """Load the registry's champion, or the cached one when that fails; never raises."""
        champion = await self.refresh("start")
        if champion is None:
            champion = await self._load_cached()
        return champion

    async def refresh(self, reason: str) -> Champion | None:
        """Load the version behind the alias when it is not the one serving; never raises.

        Returns the serving champion afterwards (the new one, or the unchanged one).
        """
        async with self._lock:
            try:
                ref = await asyncio.to_thread(self.registry.resolve, self.model_name, self.alias)
                current = self._current
                if current is not None and current.ref == ref:
                    self._report(LoadOutcome.UNCHANGED, LoadSource.REGISTRY, reason, ref)
                    return current
                source = LoadSource.CACHE if self.cache.has(ref) else LoadSource.REGISTRY
                champion = await asyncio.to_thread(self._fetch_and_load, ref)
            except ChampionLoadError as error:
                self._report(LoadOutcome.FAILED, LoadSource.REGISTRY, reason, None, str(error))
                return self._current
            self._swap(champion, source, reason)
            return champion

    async def poll(self, interval_seconds: float) -> None:
        """Refresh every ``interval_seconds``: the safety net behind model events."""
        while True:
            await asyncio.sleep(interval_seconds)
            await self.refresh("poll")

    async def _load_cached(self) -> Champion | None:
        async with self._lock:
            if self._current is not None:
                return self._current
            ref = self.cache.current(self.model_name)
            if ref is None:
                return None
            try:
                champion = await asyncio.to_thread(
                    load_champion,
                    self.cache.directory(ref),
                    ref,
                    expected_spec=self.expected_spec,
                )
            except ChampionLoadError as error:
                self._report(LoadOutcome.FAILED, LoadSource.CACHE, "start", ref, str(error))
                return None
            self._swap(champion, LoadSource.CACHE, "start")
            return champion

    def _fetch_and_load(self, ref: ChampionRef) -> Champion:
        if not self.cache.has(ref):
            self.cache.store(ref, lambda folder: self.registry.download(ref, folder))
        return load_champion(self.cache.directory(ref), ref, expected_spec=self.expected_spec)

    def _swap(self, champion: Champion, source: LoadSource, reason: str) -> None:
        # One reference assignment: a reader holds either the old champion or the new one.
        self._current = champion
        with contextlib.suppress(OSError):  # the pointer only helps a later restart
            self.cache.mark_current(champion.ref)
        self._report(LoadOutcome.LOADED, source, reason, champion.ref)

    def _report(
        self,
        outcome: LoadOutcome,
        source: LoadSource,
        reason: str,
        ref: ChampionRef | None,
        error: str | None = None,
    ) -> None:
        if outcome is LoadOutcome.FAILED:
            log.warning("champion of %s not loaded (%s): %s", self.model_name, reason, error)
        elif outcome is LoadOutcome.LOADED and ref is not None:
            log.info(
                "champion %s version %d loaded from %s (%s)",
                ref.name,
                ref.version,
                source.value,
                reason,
            )
        if self._on_load is not None:
            self._on_load(LoadEvent(outcome, source, reason, ref, error))
