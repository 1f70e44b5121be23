"""Seed data is found in the checkout, or under the driftloop package as the wheel ships it."""

from __future__ import annotations

from pathlib import Path

import pytest

from driftloop.seed_data import CHECKOUT_ROOT, seed_data_path
from schemas.features import load_feature_spec

pytestmark = pytest.mark.unit

RELATIVE = Path("data/bikeshare/Bikeshare.csv")


def test_the_demo_declaration_finds_its_data_in_the_checkout() -> None:
    spec = load_feature_spec("bikeshare")
    assert spec.dataset is not None
    assert seed_data_path(spec.dataset.path) == CHECKOUT_ROOT / RELATIVE


def test_falls_back_to_the_packaged_copy(tmp_path: Path) -> None:
    checkout, package = tmp_path / "site-packages", tmp_path / "site-packages" / "driftloop"
    (package / RELATIVE).parent.mkdir(parents=True)
    (package / RELATIVE).write_text("day,hr\n")
    assert seed_data_path(RELATIVE, roots=(checkout, package)) == package / RELATIVE


def test_absolute_path_is_taken_as_given(tmp_path: Path) -> None:
    assert seed_data_path(tmp_path / "x.csv") == tmp_path / "x.csv"


def test_missing_data_names_every_place_searched(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        seed_data_path(RELATIVE, roots=(tmp_path,))
