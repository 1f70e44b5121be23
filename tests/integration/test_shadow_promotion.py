"""Shadow promotion on the real stack: the retrain DAG's steps, then live evidence.

The model is declared ``training.live.promotion: shadow``. Its first champion learns the
winter; summer traffic it served is logged with labels (as in ``test_retrain_dag``). The DAG's
steps run here, called directly (the stack's Airflow runs the main branch's code), against the
real Postgres, object store, MLflow and Kafka:

- a challenger trained on shuffled labels passes no gate: the holdout rejects it, and put in
  shadow by hand anyway, the live judge rejects it on the labelled rows that arrive;
- a better challenger passes the holdout, waits under the alias ``challenger``
  (``ChallengerShadowed``), is scored in shadow on live traffic, and becomes champion once its
  error on the first labelled rows beats the champion's; the gateway swaps to it with no failed
  request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from driftloop.events.kafka import create_topics
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)
from driftloop.storage.database import open_migrated_pool
from driftloop.training import bootstrap, retrain, trainer, workspace
from driftloop.training.retrain import Challenger, Extracted, Outcome
from driftloop_tools.demo.replay import ReplayHour, load_replay_hours
from schemas.events import ChallengerShadowed, ModelPromoted, ModelRejected, decode_model_event
from schemas.features import FeatureSpec, LiveEvidence, PromotionEvidence, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import eventually, read_to_end
from tests.integration.shadow_support import (
    LiveTraffic,
    judged_live,
    register,
    shadow_rig,
    shuffled_labels,
)
from tests.integration.test_retrain_dag import SUMMER, RetrainSetup

pytestmark = pytest.mark.integration

LIVE_ROWS = 30
MARGIN = 0.05
AUGUST = (214, 240)  # days of 2011 after the logged summer: traffic no version trained on


def august(spec: FeatureSpec) -> list[ReplayHour]:
    return load_replay_hours(spec, first_day=AUGUST[0], last_day=AUGUST[1])


@dataclass
class Retraining:
    setup: RetrainSetup
    extracted: Extracted

    @property
    def name(self) -> str:
        return self.setup.model_name

    def aliases(self) -> dict[str, int]:
        found = self.setup.client.get_registered_model(self.name).aliases
        return {alias: int(version) for alias, version in found.items()}


@pytest.fixture
async def retraining(
    unique: str,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    kafka_settings: KafkaSettings,
    object_store_settings: ObjectStoreSettings,
    tmp_path: Path,
) -> AsyncIterator[Retraining]:
    """A winter champion declared for shadow promotion, its summer traffic logged with labels,
    and the DAG's extract step run on it."""
    spec = judged_live(
        load_feature_spec("bikeshare"),
        LiveEvidence(promotion=PromotionEvidence.SHADOW, rows=LIVE_ROWS, margin=MARGIN),
    )
    uri = mlflow_settings.tracking_uri
    name = f"shadow-{unique}"
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.MODEL_EVENTS])
    result = await asyncio.to_thread(
        bootstrap.bootstrap_model, spec, tracking_uri=uri, model_name=name, num_boost_round=100
    )
    pool = await open_migrated_pool(postgres_settings, unique)
    setup = RetrainSetup(
        unique=unique,
        spec=spec,
        model_name=name,
        champion=result.model,
        uri=uri,
        kafka=kafka,
        pool=pool,
        object_store=object_store_settings,
        tmp_path=tmp_path,
    )
    extracted: Extracted | None = None
    try:
        await setup.log_served_rows(SUMMER)
        conf = {"model_name": name, "postgres_schema": unique, "topic_prefix": kafka.topic_prefix}
        extracted = await asyncio.to_thread(
            retrain.extract_step,
            conf,
            {"num_boost_round": 60},
            dag_run_id=f"manual__{unique}",
            cutoff=datetime.now(UTC),
        )
        yield Retraining(setup, extracted)
    finally:
        if extracted is not None:
            await asyncio.to_thread(
                workspace.delete_work_objects,
                extracted.bucket,
                extracted.prefix,
                settings=object_store_settings,
            )
        await pool.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await pool.close()
        MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model(name)


async def test_a_challenger_trained_on_shuffled_labels_passes_no_gate(
    retraining: Retraining,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> None:
    setup, name = retraining.setup, retraining.name
    champion = setup.champion.version
    # Trained on the rows the challenger would learn, their labels shuffled.
    rows = trainer.read_dataset(setup.spec, since="2011-01-01", until=SUMMER[1])
    bad = await asyncio.to_thread(
        register, setup.spec, setup.uri, name, shuffled_labels(setup.spec, rows), tmp_path / "bad"
    )
    challenger = Challenger(model_name=name, version=bad.version, run_id=bad.run_id, reused=False)

    evaluation = await asyncio.to_thread(retrain.evaluate_step, retraining.extracted, challenger)
    decision = await asyncio.to_thread(
        retrain.decide_step, retraining.extracted, challenger, evaluation
    )

    assert evaluation.promotion_evidence is PromotionEvidence.SHADOW
    assert evaluation.challenger_score > evaluation.champion_score
    assert decision.outcome is Outcome.REJECTED
    assert retraining.aliases() == {trainer.CHAMPION_ALIAS: champion}

    # Put in shadow anyway (as a person could): the live judge rejects it on live rows.
    setup.client.set_registered_model_alias(name, trainer.CHALLENGER_ALIAS, str(bad.version))
    async with shadow_rig(
        name,
        f"{setup.unique}_live",
        kafka_settings=kafka_settings,
        mlflow_settings=mlflow_settings,
        postgres_settings=postgres_settings,
        tmp_path=tmp_path,
    ) as rig:
        traffic = LiveTraffic(
            rig, load_replay_hours(setup.spec, first_day=AUGUST[0], last_day=AUGUST[1])
        )
        traffic.start()
        try:

            async def judged() -> bool:
                traffic.check()
                return trainer.CHALLENGER_ALIAS not in retraining.aliases()

            await eventually(judged, within=180, what="a live verdict on the challenger")
        finally:
            await traffic.stop()
        events = await rig.model_events()

    assert set(traffic.statuses) == {200}
    assert set(traffic.versions) == {champion}
    assert retraining.aliases() == {trainer.CHAMPION_ALIAS: champion}
    rejected = [event for event in events if isinstance(event, ModelRejected)]
    assert [event.model_version for event in rejected] == [bad.version]
    assert rejected[0].reason.startswith("live evidence in shadow")
    assert not [event for event in events if isinstance(event, ModelPromoted)]
    tags = setup.client.get_model_version(name, str(bad.version)).tags
    assert tags[retrain.DECISION_TAG] == Outcome.REJECTED.value


async def test_a_better_challenger_waits_in_shadow_and_is_promoted_on_live_evidence(
    retraining: Retraining,
    kafka_settings: KafkaSettings,
    mlflow_settings: MlflowSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
) -> None:
    setup, name, extracted = retraining.setup, retraining.name, retraining.extracted
    champion = setup.champion.version

    challenger = await asyncio.to_thread(retrain.train_step, extracted)
    evaluation = await asyncio.to_thread(retrain.evaluate_step, extracted, challenger)
    decision = await asyncio.to_thread(retrain.decide_step, extracted, challenger, evaluation)

    assert decision.outcome is Outcome.SHADOWED, decision.reason
    assert retraining.aliases() == {
        trainer.CHAMPION_ALIAS: champion,
        trainer.CHALLENGER_ALIAS: challenger.version,
    }
    announced = [
        decode_model_event(record.value) for record in await read_to_end(setup.kafka, setup.topic)
    ]
    assert [type(event) for event in announced] == [ChallengerShadowed]

    async with shadow_rig(
        name,
        f"{setup.unique}_live",
        kafka_settings=kafka_settings,
        mlflow_settings=mlflow_settings,
        postgres_settings=postgres_settings,
        tmp_path=tmp_path,
    ) as rig:
        assert await rig.serving() == champion
        traffic = LiveTraffic(
            rig, load_replay_hours(setup.spec, first_day=AUGUST[0], last_day=AUGUST[1])
        )
        traffic.start()
        try:
            await traffic.until_serving(challenger.version, within=180)
        finally:
            await traffic.stop()
        events = await rig.model_events()

    assert set(traffic.statuses) == {200}, "a request failed around the promotion"
    swap = traffic.versions.index(challenger.version)
    assert swap > 0
    assert set(traffic.versions[:swap]) == {champion}
    assert set(traffic.versions[swap:]) == {challenger.version}
    assert retraining.aliases() == {trainer.CHAMPION_ALIAS: challenger.version}
    promoted = [event for event in events if isinstance(event, ModelPromoted)]
    assert [(event.model_version, event.champion_version) for event in promoted] == [
        (challenger.version, champion)
    ]
    # Judged on live rows: the scores are the live ones, better by the margin.
    assert promoted[0].champion_score is not None
    assert promoted[0].challenger_score < promoted[0].champion_score * (1 - MARGIN)
    tags = setup.client.get_model_version(name, str(challenger.version)).tags
    assert tags[retrain.DECISION_TAG] == Outcome.PROMOTED.value
    assert tags[retrain.DECISION_REASON_TAG].startswith("live evidence in shadow")
    assert tags[retrain.CHAMPION_VERSION_TAG] == str(champion)
