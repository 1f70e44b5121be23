"""``driftloop --help`` stays fast: importing the CLI pulls in none of the heavy libraries.

Asserted on the modules loaded, not on time (tests never assert on wall-clock time): each of
these takes from a fraction of a second to seconds to import on the machines here (Evidently
alone about 4 s), and every command that needs one imports it inside the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("evidently", "pandas", "sklearn", "mlflow", "lightgbm")
REPOSITORY = Path(__file__).resolve().parents[2]


def loaded_after(statement: str) -> list[str]:
    """The heavy modules in ``sys.modules`` after running ``statement`` in a fresh Python."""
    report = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"import json, sys; {statement}; {report}"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_heavy_library() -> None:
    assert loaded_after("import driftloop_tools.cli.app") == []


def test_the_probe_sees_a_heavy_import() -> None:
    # The drift store imports pandas and Evidently: the probe must report them.
    assert {"pandas", "evidently"} <= set(loaded_after("import driftloop.drift.store"))


def test_help_runs_through_the_entry_point() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("driftloop")), "--help"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    for command in ("model", "demo", "drift", "stack"):
        assert command in result.stdout
