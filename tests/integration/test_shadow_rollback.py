"""Rollback on the real stack: real Kafka, Postgres, MLflow, and the services as processes.

A good first champion (v1) and a bad one promoted over it (v2, trained on shuffled labels:
what a holdout that got it wrong would let through, tagged as the DAG tags a promotion) serve
live traffic through a gateway; the feature-logger logs the predictions and their labels; the
shadow-scorer scores v1 in shadow on the predictions stream and judges v2 over its first
labelled rows. v2 is rolled back: the alias moves to v1, ``ModelRolledBack`` is published, and
the gateway serves v1 again without a failed request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from mlflow.tracking import MlflowClient

from driftloop.serving.shadow import RESTORED_FROM_TAG
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings
from driftloop.training import trainer
from driftloop.training.live_judge import LIVE_VERDICT_TAG, ROLLED_BACK
from driftloop.training.retrain import CHAMPION_VERSION_TAG, DECISION_TAG, Outcome
from driftloop_tools.demo.replay import load_replay_hours
from schemas.events import ModelRolledBack
from schemas.features import FeatureSpec, LiveEvidence, load_feature_spec
from tests.integration.consumer_support import eventually
from tests.integration.shadow_support import (
    LiveTraffic,
    judged_live,
    register,
    shadow_rig,
    shuffled_labels,
)

pytestmark = pytest.mark.integration

LIVE_ROWS = 30
MARGIN = 0.05
TRAFFIC_DAYS = (60, 75)  # March 2011: after both models' training months


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    """Bikeshare, judged live over its first LIVE_ROWS labelled rows (registered with it)."""
    return judged_live(load_feature_spec("bikeshare"), LiveEvidence(rows=LIVE_ROWS, margin=MARGIN))


def promote_as_the_dag_does(
    tracking_uri: str, model: trainer.RegisteredModel, champion_version: int
) -> None:
    """The alias and the tags ``decide_step`` leaves on a promoted challenger."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    trainer.set_champion(model, tracking_uri=tracking_uri)
    client.set_model_version_tag(
        model.name, str(model.version), DECISION_TAG, Outcome.PROMOTED.value
    )
    client.set_model_version_tag(
        model.name, str(model.version), CHAMPION_VERSION_TAG, str(champion_version)
    )


async def test_a_promotion_that_loses_live_is_rolled_back_without_a_failed_request(
    spec: FeatureSpec,
    unique: str,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> None:
    name = f"rb-{unique}"
    uri = mlflow_settings.tracking_uri
    winter = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    good = await asyncio.to_thread(register, spec, uri, name, winter, tmp_path / "v1")
    trainer.set_champion(good, tracking_uri=uri)
    bad = await asyncio.to_thread(
        register, spec, uri, name, shuffled_labels(spec, winter), tmp_path / "v2"
    )
    await asyncio.to_thread(promote_as_the_dag_does, uri, bad, good.version)

    async with shadow_rig(
        name,
        unique,
        kafka_settings=kafka_settings,
        mlflow_settings=mlflow_settings,
        postgres_settings=postgres_settings,
        tmp_path=tmp_path,
    ) as rig:
        assert await rig.serving() == bad.version
        traffic = LiveTraffic(
            rig, load_replay_hours(spec, first_day=TRAFFIC_DAYS[0], last_day=TRAFFIC_DAYS[1])
        )
        traffic.start()
        try:
            await traffic.until_serving(good.version, within=180)
        finally:
            await traffic.stop()
        events = await rig.model_events()

        # The counterfactual of the window: the bad promotion's rows made the served error
        # worse than the first champion (v1, in shadow on them) would have had.
        async def accounted() -> bool:
            lift = await rig.shadow_metric(
                "driftloop_counterfactual_lift", baseline="first_champion", model=name
            )
            return lift is not None and lift < 0

        await eventually(accounted, within=30, what="a negative lift over the first champion")
        verdicts = await rig.shadow_metric(
            "driftloop_live_verdicts_total", action="swap", kind="rollback", model=name
        )
        served_error = await rig.shadow_metric("driftloop_live_error", metric="rmse", model=name)
        first_error = await rig.shadow_metric(
            "driftloop_counterfactual_baseline_error",
            baseline="first_champion",
            metric="rmse",
            model=name,
        )

    assert verdicts == 1
    assert served_error is not None
    assert first_error is not None
    assert served_error > first_error
    assert traffic.statuses
    assert set(traffic.statuses) == {200}, "a request failed around the rollback"
    versions = traffic.versions
    # Served by v2, then by v1 for good: one swap, no flapping back.
    swap = versions.index(good.version)
    assert swap > 0
    assert set(versions[:swap]) == {bad.version}
    assert set(versions[swap:]) == {good.version}

    rollbacks = [event for event in events if isinstance(event, ModelRolledBack)]
    assert len(rollbacks) == 1, events
    rollback = rollbacks[0]
    assert (rollback.model_name, rollback.model_version) == (name, good.version)
    assert rollback.champion_version == bad.version
    assert rollback.run_id == good.run_id
    # Judged over exactly the first LIVE_ROWS labelled rows v2 served, and lost by the margin.
    assert rollback.live_rows == LIVE_ROWS
    assert rollback.metric_name == "rmse"
    assert rollback.champion_score is not None
    assert rollback.challenger_score < rollback.champion_score * (1 - MARGIN)

    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert trainer.current_champion(uri, name) == good.version
    demoted = registry.get_model_version(name, str(bad.version)).tags
    restored = registry.get_model_version(name, str(good.version)).tags
    assert demoted[LIVE_VERDICT_TAG] == ROLLED_BACK
    assert demoted[DECISION_TAG] == Outcome.PROMOTED.value
    assert restored[RESTORED_FROM_TAG] == str(bad.version)


async def test_shadow_rows_are_logged_once_with_their_role(
    spec: FeatureSpec,
    unique: str,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> None:
    """v3 promoted over v2 over v1, and v4 waiting as challenger: each in its role."""
    # No live verdict within the test (v4 would leave the shadow once judged).
    spec = judged_live(spec, LiveEvidence(rows=1_000_000))
    name = f"roles-{unique}"
    uri = mlflow_settings.tracking_uri
    winter = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    first = await asyncio.to_thread(register, spec, uri, name, winter, tmp_path / "v1")
    second = await asyncio.to_thread(register, spec, uri, name, winter, tmp_path / "v2")
    third = await asyncio.to_thread(register, spec, uri, name, winter, tmp_path / "v3")
    fourth = await asyncio.to_thread(register, spec, uri, name, winter, tmp_path / "v4")
    await asyncio.to_thread(promote_as_the_dag_does, uri, third, second.version)
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registry.set_registered_model_alias(name, trainer.CHALLENGER_ALIAS, str(fourth.version))

    async with shadow_rig(
        name,
        unique,
        kafka_settings=kafka_settings,
        mlflow_settings=mlflow_settings,
        postgres_settings=postgres_settings,
        tmp_path=tmp_path,
    ) as rig:
        traffic = LiveTraffic(
            rig, load_replay_hours(spec, first_day=TRAFFIC_DAYS[0], last_day=TRAFFIC_DAYS[1])
        )
        traffic.start()
        try:
            await traffic.until_labelled(20, within=60)
        finally:
            await traffic.stop()
        answered = {f"{unique}-{index}" for index in range(len(traffic.versions))}
        connection = await asyncpg.connect(postgres_settings.dsn())
        try:

            async def shadow_rows() -> list[asyncpg.Record]:
                return list(
                    await connection.fetch(
                        f"SELECT request_id, model_version, role, served_version "  # noqa: S608
                        f"FROM {unique}.shadow_predictions WHERE model_name = $1",
                        name,
                    )
                )

            async def every_version_scored() -> bool:
                return len(await shadow_rows()) >= 3 * len(answered)

            await eventually(every_version_scored, within=60, what="3 shadow rows per request")
            rows = await shadow_rows()
        finally:
            await connection.close()

    assert set(traffic.statuses) == {200}
    assert set(traffic.versions) == {third.version}
    roles = {row["model_version"]: row["role"] for row in rows}
    assert roles == {
        fourth.version: "challenger",
        second.version: "previous_champion",
        first.version: "first_champion",
    }
    assert {row["served_version"] for row in rows} == {third.version}
    # Every answered request scored once by each shadow version: none missing, none twice.
    assert len(rows) == 3 * len(answered)
    for version in roles:
        assert {row["request_id"] for row in rows if row["model_version"] == version} == answered
