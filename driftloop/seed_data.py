"""Where a feature declaration's seed data lives: in the checkout, or inside the installed wheel.

A declaration names its dataset relative to the repository (``data/bikeshare/Bikeshare.csv``).
In a checkout that is beside the packages; an installed wheel carries the same tree under the
``driftloop`` package (``[tool.hatch.build.targets.wheel.force-include]``), because a top-level
``data`` folder in site-packages would belong to nobody.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

PACKAGE_ROOT: Final = Path(__file__).resolve().parent
CHECKOUT_ROOT: Final = PACKAGE_ROOT.parent
SEED_DATA_ROOTS: Final = (CHECKOUT_ROOT, PACKAGE_ROOT)


def seed_data_path(relative: str | Path, *, roots: tuple[Path, ...] = SEED_DATA_ROOTS) -> Path:
    """The file a dataset path names: absolute as given, else the first root that has it."""
    path = Path(relative)
    if path.is_absolute():
        return path
    for root in roots:
        candidate = root / path
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(root) for root in roots)
    raise FileNotFoundError(f"seed data {path} is in none of: {searched}")
