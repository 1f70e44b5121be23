"""The dags/ folder imports cleanly, cheaply, and every DAG is wired the way we require."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
HEAVY_MODULES = ("numpy", "pandas", "lightgbm", "mlflow", "evidently", "sklearn")


@pytest.fixture(scope="module")
def dagbag() -> object:
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_dag_folder_imports_without_errors(dagbag: object) -> None:
    assert dagbag.import_errors == {}  # type: ignore[attr-defined]
    assert "platform_healthcheck" in dagbag.dag_ids  # type: ignore[attr-defined]


def test_dags_do_not_catch_up(dagbag: object) -> None:
    for dag in dagbag.dags.values():  # type: ignore[attr-defined]
        assert dag.catchup is False, dag.dag_id


@pytest.mark.parametrize("dag_file", sorted(DAGS.glob("*.py")), ids=lambda path: path.name)
def test_dag_files_parse_without_heavy_imports(dag_file: Path) -> None:
    """The dag-processor parses files every few seconds: no numpy/mlflow at module level."""
    probe = (
        "import runpy, sys\n"
        f"runpy.run_path({str(dag_file)!r})\n"
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1:] in ([], [""]), result.stdout
