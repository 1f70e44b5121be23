"""batch-scorer on the real stack: two processes share a group, every request gets one result
(across a broker outage too), and `driftloop batch score` scores a file end to end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pandas as pd
import pytest
from typer.testing import CliRunner

from driftloop.events.kafka import create_topics
from driftloop.serving.batch_client import score_rows
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training.trainer import RegisteredModel, read_dataset
from driftloop_tools.cli.batch import batch_app, rows_from_records
from driftloop_tools.stack.settings import StackSettings
from schemas.events import PredictionEvent, ScoringRequest, ScoringResult
from schemas.features import load_feature_spec
from schemas.fields import FeatureValue
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    broker_loss_seen,
    broker_stopped,
    eventually,
    free_port,
    metric,
    produce,
    read_to_end,
    read_topic,
    register_champion,
)

SPEC = load_feature_spec("bikeshare")
# model.events too: the scorer follows it, and a missing topic floods its log with retries.
TOPICS = [Topic.SCORING_REQUESTS, Topic.SCORING_RESULTS, Topic.PREDICTIONS, Topic.MODEL_EVENTS]


@pytest.fixture(scope="module")
def champion(
    mlflow_settings: MlflowSettings, tmp_path_factory: pytest.TempPathFactory
) -> RegisteredModel:
    name = f"bikeshare-batch-{uuid.uuid4().hex[:12]}"
    return register_champion(mlflow_settings.tracking_uri, name, tmp_path_factory.mktemp("train"))


class StartScorers(Protocol):
    def __call__(self, count: int, **environment: str) -> list[tuple[ConsumerProcess, int]]:
        """Start ``count`` scorers in the test's group (``environment`` overrides settings)."""
        ...


@pytest.fixture
def scorers(unique: str, champion: RegisteredModel, tmp_path: Path) -> Iterator[StartScorers]:
    started: list[tuple[ConsumerProcess, int]] = []

    def start(count: int, **environment: str) -> list[tuple[ConsumerProcess, int]]:
        for index in range(count):
            port = free_port()
            process = ConsumerProcess(
                "consumers.batch_scorer",
                {
                    "KAFKA_TOPIC_PREFIX": f"{unique}.",
                    "BATCH_SCORER_GROUP": f"{unique}-batch-scorer",
                    "BATCH_SCORER_MODEL_NAME": champion.name,
                    "BATCH_SCORER_MODEL_CACHE_DIR": str(tmp_path / f"models-{index}"),
                    "BATCH_SCORER_MAX_BATCH": "500",
                    "BATCH_SCORER_METRICS_PORT": str(port),
                    **environment,
                },
                tmp_path / f"batch-scorer-{index}.log",
            ).start()
            started.append((process, port))
        return started

    yield start
    for process, _ in started:
        process.close()


def sample_rows(count: int) -> list[dict[str, FeatureValue]]:
    frame = read_dataset(SPEC, since="2011-03-01", until="2011-04-01")
    records = frame.head(count).to_dict(orient="records")
    return rows_from_records(SPEC, records)  # type: ignore[arg-type]


async def test_two_scorers_share_the_partitions_and_answer_each_request_once(
    unique: str, kafka_settings: KafkaSettings, scorers: StartScorers, champion: RegisteredModel
) -> None:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, TOPICS)
    pair = scorers(2)

    async def both_consuming() -> bool:
        ready = [
            await metric(port, "driftloop_consumer_ready", consumer="batch-scorer")
            for _, port in pair
        ]
        return ready == [1.0, 1.0]

    await eventually(both_consuming, what="both scorers in the group with partitions")
    rows = sample_rows(600) * 5
    rows[7] = {**rows[7], "hr": 99}  # out of the declared range: answered with an error
    request_ids = [f"{unique}-{index}" for index in range(len(rows))]
    outcome = await score_rows(kafka, rows, request_ids, batch_id=unique, wait_seconds=120)

    assert outcome.missing == []
    assert set(outcome.results) == set(request_ids)
    assert outcome.errors == 1
    assert "hr" in (outcome.results[request_ids[7]].error or "")
    assert {result.model_version for result in outcome.results.values()} == {champion.version}
    handled = [
        await metric(
            port,
            "driftloop_consumer_records_in_total",
            consumer="batch-scorer",
            topic=kafka.topic(Topic.SCORING_REQUESTS),
        )
        for _, port in pair
    ]
    assert all(count and count > 0 for count in handled), handled
    assert sum(count or 0 for count in handled) >= len(rows)
    # Every scored row is also a batch prediction for the feature logger.
    logged = await read_topic(kafka, kafka.topic(Topic.PREDICTIONS), expected=len(rows) - 1)
    events = [PredictionEvent.from_bytes(record.value) for record in logged]
    assert {event.request_id for event in events} == set(request_ids) - {request_ids[7]}
    assert {event.source for event in events} == {"batch"}
    for process, _ in pair:
        assert await asyncio.to_thread(process.terminate) == 0, process.log()


async def test_batch_score_cli_writes_the_results_beside_the_rows(
    unique: str,
    kafka_settings: KafkaSettings,
    scorers: StartScorers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, TOPICS)
    ((process, port),) = scorers(1)

    async def consuming() -> bool:
        return await metric(port, "driftloop_consumer_ready", consumer="batch-scorer") == 1.0

    await eventually(consuming, what="the scorer in its group")
    source = read_dataset(SPEC, since="2011-04-01", until="2011-05-01").head(300)
    source.to_csv(tmp_path / "rows.csv", index=False)
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", kafka.topic_prefix)
    result = await asyncio.to_thread(
        CliRunner().invoke,
        batch_app,
        ["score", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "scored.parquet")],
    )
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert len(scored) == 300
    assert scored["prediction"].notna().all()
    assert scored["error"].isna().all()
    assert "rows/s" in result.output
    assert await asyncio.to_thread(process.terminate) == 0, process.log()


async def test_broker_outage_mid_stream_answers_every_request(
    unique: str,
    kafka_settings: KafkaSettings,
    stack_settings: StackSettings,
    scorers: StartScorers,
    champion: RegisteredModel,
) -> None:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, TOPICS)
    # Tiny batches: scoring the backlog takes seconds, so the broker stops in the middle of it.
    ((process, port),) = scorers(1, BATCH_SCORER_MAX_BATCH="5")

    async def ready() -> bool:
        return await metric(port, "driftloop_consumer_ready", consumer="batch-scorer") == 1.0

    await eventually(ready, what="the scorer in its group")
    requests = [
        ScoringRequest(request_id=f"{unique}-{index}", features=row, batch_id=unique)
        for index, row in enumerate(sample_rows(1000) * 5)
    ]
    before = 4000
    await produce(kafka, Topic.SCORING_REQUESTS, requests[:before])

    async def answered() -> float:
        results = await metric(
            port,
            "driftloop_consumer_records_out_total",
            consumer="batch-scorer",
            sink="scoring.results",
        )
        return results or 0.0

    async def scoring() -> bool:
        return await answered() > 0

    await eventually(scoring, what="the first results")
    seen = len(process.log())
    async with broker_stopped(stack_settings):
        await broker_loss_seen(process, seen)
        assert process.alive(), process.log()
        assert await answered() < before, "the backlog was scored before the broker stopped"
    assert process.alive(), process.log()
    await produce(kafka, Topic.SCORING_REQUESTS, requests[before:])

    wanted = {request.request_id for request in requests}
    # A batch replayed after the outage is answered again: readers keep the first result.
    results: dict[str, ScoringResult] = {}

    async def every_request_answered() -> bool:
        for record in await read_to_end(kafka, kafka.topic(Topic.SCORING_RESULTS)):
            result = ScoringResult.from_bytes(record.value)
            results.setdefault(result.request_id, result)
        return results.keys() >= wanted

    await eventually(every_request_answered, within=120, what="a result for every request")
    assert results.keys() == wanted
    assert all(result.error is None for result in results.values())
    assert {result.batch_id for result in results.values()} == {unique}
    assert {result.model_version for result in results.values()} == {champion.version}
    logged: set[str] = set()

    async def every_row_logged() -> bool:
        records = await read_to_end(kafka, kafka.topic(Topic.PREDICTIONS))
        logged.update(PredictionEvent.from_bytes(record.value).request_id for record in records)
        return logged >= wanted

    await eventually(every_row_logged, within=60, what="a prediction event for every row")
    assert logged == wanted
    await eventually(ready, within=60, what="the scorer ready again")
    assert process.alive(), process.log()
    assert await asyncio.to_thread(process.terminate) == 0, process.log()
