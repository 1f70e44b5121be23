"""platform_healthcheck: proves Airflow's workers can run the project's code and reach MLflow.

Triggered by the integration suite and useful to operators after a deploy. Wiring only; the
check itself lives in ``driftloop.health``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task


@dag(
    dag_id="platform_healthcheck",
    schedule=None,
    catchup=False,
    tags=["driftloop", "operations"],
    default_args={"retries": 0, "execution_timeout": timedelta(minutes=2)},
    doc_md=__doc__,
)
def platform_healthcheck() -> None:
    @task
    def check_registry() -> dict[str, str]:
        from driftloop.health import check_mlflow

        return check_mlflow()

    check_registry()


platform_healthcheck()
