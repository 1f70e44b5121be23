"""The dags/ folder imports cleanly, cheaply, and every DAG is wired the way we require."""

from __future__ import annotations

import copy
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


def test_retrain_model_wires_its_tasks_in_order(dagbag: object) -> None:
    dag = dagbag.dags["retrain_model"]  # type: ignore[attr-defined]

    assert dag.schedule is None
    assert dag.max_active_runs == 1
    assert {task.task_id: sorted(task.upstream_task_ids) for task in dag.tasks} == {
        "extract": [],
        "train": ["extract"],
        "evaluate": ["extract", "train"],
        "decide": ["evaluate", "extract", "train"],
        "cleanup": ["decide", "extract"],
    }
    # Transient failures (MLflow, S3, Kafka down) are retried; refusals fail fast in the task.
    assert all(dag.get_task(name).retries >= 1 for name in ("extract", "train", "decide"))
    assert "model_name" in (dag.doc_md or "")


def test_retrain_model_params_are_the_policy_defaults(dagbag: object) -> None:
    from driftloop.training.policy import RetrainPolicy

    dag = dagbag.dags["retrain_model"]  # type: ignore[attr-defined]

    assert {name: dag.params[name] for name in dag.params} == RetrainPolicy().model_dump()


def test_retrain_model_params_refuse_what_the_policy_refuses(dagbag: object) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["retrain_model"]  # type: ignore[attr-defined]

    def validated(conf: dict[str, object]) -> dict[str, object]:
        # What Airflow does with a trigger's conf: the DAG's params, overridden, validated.
        params = copy.deepcopy(dag.params)
        params.update(conf)
        return params.validate()  # type: ignore[no-any-return]

    assert (
        validated({"promotion_margin": 0.5, "model_name": "bikeshare"})["promotion_margin"] == 0.5
    )
    bad_confs: list[dict[str, object]] = [
        {"promotion_margin": -0.1},
        {"num_boost_round": 0},
        {"holdout_fraction": "x"},
    ]
    for bad in bad_confs:
        with pytest.raises(ParamValidationError):
            validated(bad)
