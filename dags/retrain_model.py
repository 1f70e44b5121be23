"""retrain_model: train a challenger on recent labelled traffic, promote it only if it is better.

Triggered by the retrain-trigger, one run per drift episode (run id ``drift-<episode id>``),
or by hand with the conf ``{"model_name": "bikeshare"}``. Wiring only: each task calls one
step of ``driftloop.training.retrain``, where the training-set policy, the holdout and the promotion
safety are described; the promotion rule is in ``driftloop.training.policy``.

**Tasks**: ``extract`` (validate the conf, find the champion, read the labelled rows it served,
cut the holdout, write the training set and the holdout to the object store) ▸ ``train``
(the challenger, logged to MLflow with its reference dataset and registered; once per run) ▸
``evaluate`` (challenger and champion on the same holdout) ▸ ``decide`` (move the ``champion``
alias when the margin is met and the alias did not move meanwhile, tag the version, publish
``ModelPromoted`` or ``ModelRejected`` to ``model.events``; a model declared
``training.live.promotion: shadow`` gets the ``challenger`` alias and ``ChallengerShadowed``
instead, and the shadow-scorer decides on live rows) ▸ ``cleanup`` (work objects).

**conf**: ``model_name`` (required); from the retrain-trigger also ``model_version`` (champion
version that drifted), ``episode_id``, ``event_id``, ``window_start``, ``window_end``,
``window_rows``, ``drift_share``, ``drifted_features``, ``prediction_drifted``,
``report_uri``; ``postgres_schema`` (schema of the prediction log, default ``public``) and
``topic_prefix`` (default KAFKA_TOPIC_PREFIX). Any param below may be overridden in the conf.

**Failures**: a refusal (invalid conf, no champion, too few labels) fails the task at once,
without retries; anything else (MLflow, S3, Postgres or Kafka unavailable) is retried. Either
way the champion stays where it was unless the decision to move it was made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from driftloop.training.policy import RetrainPolicy, RetrainRefusedError


@contextmanager
def refusals_fail_fast() -> Iterator[None]:
    """A refusal cannot succeed on a retry: fail the task at once, with the refusal's message."""
    try:
        yield
    except RetrainRefusedError as error:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(error)) from error


@dag(
    dag_id="retrain_model",
    schedule=None,
    catchup=False,
    # One run at a time: the alias check before a promotion is not atomic in MLflow.
    max_active_runs=1,
    tags=["driftloop", "training"],
    params={name: Param(**schema) for name, schema in RetrainPolicy.param_schemas().items()},
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=15),
        "execution_timeout": timedelta(minutes=20),
    },
    doc_md=__doc__,
)
def retrain_model() -> None:
    @task(multiple_outputs=False)
    def extract() -> dict[str, Any]:
        from driftloop.training import retrain

        context = get_current_context()
        dag_run = context["dag_run"]
        with refusals_fail_fast():
            extracted = retrain.extract_step(
                dag_run.conf,
                context["params"],
                dag_run_id=dag_run.run_id,
                cutoff=dag_run.run_after,
            )
        return extracted.model_dump(mode="json")

    @task(multiple_outputs=False)
    def train(extracted: dict[str, Any]) -> dict[str, Any]:
        from driftloop.training import retrain

        with refusals_fail_fast():
            challenger = retrain.train_step(retrain.Extracted.model_validate(extracted))
        return challenger.model_dump(mode="json")

    @task(multiple_outputs=False)
    def evaluate(extracted: dict[str, Any], challenger: dict[str, Any]) -> dict[str, Any]:
        from driftloop.training import retrain

        with refusals_fail_fast():
            evaluation = retrain.evaluate_step(
                retrain.Extracted.model_validate(extracted),
                retrain.Challenger.model_validate(challenger),
            )
        return evaluation.model_dump(mode="json")

    @task(multiple_outputs=False)
    def decide(
        extracted: dict[str, Any], challenger: dict[str, Any], evaluation: dict[str, Any]
    ) -> dict[str, Any]:
        from driftloop.training import retrain

        with refusals_fail_fast():
            decision = retrain.decide_step(
                retrain.Extracted.model_validate(extracted),
                retrain.Challenger.model_validate(challenger),
                retrain.Evaluation.model_validate(evaluation),
            )
        return decision.model_dump(mode="json")

    @task(retries=0)
    def cleanup(extracted: dict[str, Any]) -> int:
        # The light module: this task need not import pandas, LightGBM and MLflow.
        from driftloop.training.workspace import delete_work_objects

        return delete_work_objects(extracted["bucket"], extracted["prefix"])

    # TaskFlow passes each task's XComArg where the next task's function takes the resolved
    # value; Airflow's type hints do not model that substitution.
    extracted = extract()
    challenger = train(extracted)  # type: ignore[arg-type]
    evaluation = evaluate(extracted, challenger)  # type: ignore[arg-type]
    decision = decide(extracted, challenger, evaluation)  # type: ignore[arg-type]
    decision >> cleanup(extracted)  # type: ignore[arg-type]


retrain_model()
