"""Champion loading: registry first, local cache as fallback, atomic swaps, refused mismatches."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from driftloop.serving.champion import (
    ChampionHolder,
    ChampionLoadError,
    ChampionRef,
    LoadEvent,
    LoadOutcome,
    LoadSource,
    load_champion,
)
from driftloop.training import trainer
from schemas.features import FeatureSpec, load_feature_spec

RUN_1 = "1" * 32
RUN_2 = "2" * 32


class FolderRegistry:
    """A registry double: model versions are local folders, the alias a settable attribute."""

    def __init__(self) -> None:
        self.versions: dict[int, tuple[str, Path]] = {}
        self.champion: int | None = None
        self.reachable = True
        self.downloads = 0

    def resolve(self, name: str, alias: str = "champion") -> ChampionRef:
        if not self.reachable or self.champion is None:
            raise ChampionLoadError(f"cannot resolve {name}@{alias}: registry unreachable")
        run_id, _ = self.versions[self.champion]
        return ChampionRef(name, self.champion, run_id)

    def download(self, ref: ChampionRef, destination: Path) -> None:
        if not self.reachable:
            raise ChampionLoadError("registry unreachable")
        self.downloads += 1
        shutil.copytree(self.versions[ref.version][1], destination, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def model_dirs(spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    root = tmp_path_factory.mktemp("models")
    return {
        version: trainer.save_model(
            trainer.train_booster(spec, frame, num_boost_round=rounds), spec, root / str(version)
        )
        for version, rounds in ((1, 5), (2, 40))
    }


@pytest.fixture
def registry(model_dirs: dict[int, Path]) -> FolderRegistry:
    registry = FolderRegistry()
    registry.versions = {1: (RUN_1, model_dirs[1]), 2: (RUN_2, model_dirs[2])}
    registry.champion = 1
    return registry


def _holder(
    registry: FolderRegistry, cache: Path, spec: FeatureSpec, events: list[LoadEvent]
) -> ChampionHolder:
    return ChampionHolder(registry, "bikeshare", cache, expected_spec=spec, on_load=events.append)


async def test_starts_with_the_registry_champion(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    events: list[LoadEvent] = []
    holder = _holder(registry, tmp_path, spec, events)

    champion = await holder.start()

    assert champion is not None
    assert (champion.name, champion.version, champion.run_id) == ("bikeshare", 1, RUN_1)
    assert champion.spec == spec
    assert holder.current is champion
    assert events[-1].outcome is LoadOutcome.LOADED
    assert events[-1].source is LoadSource.REGISTRY


async def test_predicts_on_the_declared_matrix(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    holder = _holder(registry, tmp_path, spec, [])
    champion = await holder.start()
    assert champion is not None
    frame = trainer.read_dataset(spec, since="2011-03-01", until="2011-04-01").head(4)

    scores = champion.predict(trainer.feature_matrix(spec, frame))

    assert scores.shape == (4,)
    assert np.isfinite(scores).all()
    assert np.isfinite(champion.predict(np.full((1, len(spec.features)), np.nan))).all()


async def test_restart_without_registry_serves_the_cached_model(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    await _holder(registry, tmp_path, spec, []).start()
    registry.reachable = False
    events: list[LoadEvent] = []

    champion = await _holder(registry, tmp_path, spec, events).start()

    assert champion is not None
    assert champion.version == 1
    assert [event.outcome for event in events] == [LoadOutcome.FAILED, LoadOutcome.LOADED]
    assert events[-1].source is LoadSource.CACHE


async def test_no_model_anywhere_is_none_not_an_error(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    registry.reachable = False

    assert await _holder(registry, tmp_path, spec, []).start() is None


async def test_refresh_swaps_to_the_new_version_and_skips_unchanged(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    events: list[LoadEvent] = []
    holder = _holder(registry, tmp_path, spec, events)
    first = await holder.start()

    unchanged = await holder.refresh("poll")
    registry.champion = 2
    second = await holder.refresh("model_event")

    assert unchanged is first
    assert second is not None
    assert (second.version, second.run_id) == (2, RUN_2)
    assert holder.current is second
    assert [event.outcome for event in events] == [
        LoadOutcome.LOADED,
        LoadOutcome.UNCHANGED,
        LoadOutcome.LOADED,
    ]
    assert registry.downloads == 2


async def test_readers_keep_scoring_during_a_swap(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    holder = _holder(registry, tmp_path, spec, [])
    await holder.start()
    row = np.full((1, len(spec.features)), np.nan)
    seen: set[int] = set()
    registry.champion = 2
    swap = asyncio.create_task(holder.refresh("model_event"))

    while not swap.done():
        champion = holder.current
        assert champion is not None
        champion.predict(row)
        seen.add(champion.version)
        await asyncio.sleep(0)
    await swap

    assert holder.current is not None
    assert holder.current.version == 2
    assert 1 in seen


async def test_failed_refresh_keeps_serving_the_current_model(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    events: list[LoadEvent] = []
    holder = _holder(registry, tmp_path, spec, events)
    first = await holder.start()
    registry.reachable = False

    assert await holder.refresh("poll") is first
    assert events[-1].outcome is LoadOutcome.FAILED
    assert events[-1].error is not None


def test_refuses_a_model_declaring_other_features(
    model_dirs: dict[int, Path], spec: FeatureSpec
) -> None:
    other = spec.model_copy(update={"features": spec.features[:-1]})

    with pytest.raises(ChampionLoadError, match="declares features"):
        load_champion(model_dirs[1], ChampionRef("bikeshare", 1, RUN_1), expected_spec=other)


def test_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ChampionLoadError, match="not a LightGBM model"):
        load_champion(tmp_path, ChampionRef("bikeshare", 1, RUN_1))


async def test_a_torn_download_leaves_no_cached_version(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    def torn(ref: ChampionRef, destination: Path) -> None:
        (destination / "MLmodel").write_text("half")
        raise ChampionLoadError("connection reset")

    registry.download = torn  # type: ignore[method-assign]
    holder = _holder(registry, tmp_path, spec, [])

    assert await holder.start() is None
    assert not holder.cache.has(ChampionRef("bikeshare", 1, RUN_1))


async def test_single_row_fast_path_matches_the_booster(
    registry: FolderRegistry, tmp_path: Path, spec: FeatureSpec
) -> None:
    champion = await _holder(registry, tmp_path, spec, []).start()
    assert champion is not None
    april = trainer.read_dataset(spec, since="2011-04-01", until="2011-05-01")
    matrix = trainer.feature_matrix(spec, april)
    matrix[::5, spec.feature_names.index("temp")] = np.nan

    one_by_one = np.array([champion.predict(matrix[i : i + 1].copy())[0] for i in range(200)])

    np.testing.assert_array_equal(one_by_one, champion.booster.predict(matrix[:200]))
