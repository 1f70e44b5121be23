"""batch-scorer on the real stack: two processes share a group, every request gets one result,
and `driftloop batch score` scores a file end to end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from consumers.batch_cli import batch_app, rows_from_records
from driftloop.batch_scoring import score_rows
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import RegisteredModel, read_dataset
from schemas.events import PredictionEvent
from schemas.features import load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    create_topics,
    eventually,
    free_port,
    metric,
    read_topic,
    register_champion,
)

SPEC = load_feature_spec("bikeshare")
TOPICS = [Topic.SCORING_REQUESTS, Topic.SCORING_RESULTS, Topic.PREDICTIONS]


@pytest.fixture(scope="module")
def champion(
    mlflow_settings: MlflowSettings, tmp_path_factory: pytest.TempPathFactory
) -> RegisteredModel:
    name = f"bikeshare-batch-{uuid.uuid4().hex[:12]}"
    return register_champion(mlflow_settings.tracking_uri, name, tmp_path_factory.mktemp("train"))


StartScorers = Callable[[int], list[tuple[ConsumerProcess, int]]]


@pytest.fixture
def scorers(unique: str, champion: RegisteredModel, tmp_path: Path) -> Iterator[StartScorers]:
    started: list[tuple[ConsumerProcess, int]] = []

    def start(count: int) -> list[tuple[ConsumerProcess, int]]:
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
                },
                tmp_path / f"batch-scorer-{index}.log",
            ).start()
            started.append((process, port))
        return started

    yield start
    for process, _ in started:
        process.close()


def sample_rows(count: int) -> list[dict[str, object]]:
    frame = read_dataset(SPEC, months=["March"])
    records = frame.head(count).to_dict(orient="records")
    return rows_from_records(SPEC, records)  # type: ignore[return-value]


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
    source = read_dataset(SPEC, months=["April"]).head(300)
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
