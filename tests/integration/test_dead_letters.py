"""Garbage on each consumed topic ends in its dead-letter topic with the reason, the consumers
keep processing good messages, and `driftloop dlq` lists and replays the letters."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from driftloop.events.kafka import create_topics
from driftloop.settings import KafkaSettings, MlflowSettings, PostgresSettings
from driftloop_tools.cli.dlq import dlq_app, read_dead_letters, replay_dead_letters, select
from schemas.events import (
    DeadLetter,
    FailureKind,
    GroundTruth,
    PredictionEvent,
    ScoringRequest,
    ScoringResult,
)
from schemas.fields import FeatureValue
from schemas.topics import Topic
from tests.integration.consumer_support import (
    ConsumerProcess,
    eventually,
    free_port,
    produce,
    produce_raw,
    read_topic,
    register_champion,
)


def garbage(good: bytes) -> list[tuple[bytes | None, bytes]]:
    """One message per way a producer can get it wrong, with the failure each must give."""
    return [
        (b"k1", b"{definitely not json"),
        (None, b'"a string"'),
        (b"k3", good.replace(b'"schema_version":1', b'"schema_version":2')),
        (b"k4", good.replace(b'"request_id":', b'"no_such_field":')),
        (b"k5", b'{"event_type":"drift_detected","schema_version":1}'),
    ]


EXPECTED = [
    FailureKind.INVALID_JSON,
    FailureKind.NOT_AN_OBJECT,
    FailureKind.UNSUPPORTED_SCHEMA_VERSION,
    FailureKind.INVALID_EVENT,
    FailureKind.UNEXPECTED_EVENT_TYPE,
]


def prediction(request_id: str) -> PredictionEvent:
    return PredictionEvent(
        request_id=request_id,
        model_name="bikeshare",
        model_version=1,
        run_id=uuid.uuid4().hex,
        features={"temp": 0.3},
        prediction=1.0,
        latency_ms=1.0,
        source="http",
    )


async def dead_letters(kafka: KafkaSettings, topic: Topic, count: int) -> list[DeadLetter]:
    records = await read_topic(kafka, kafka.topic(topic.dead_letter), expected=count)
    return [DeadLetter.from_bytes(record.value) for record in records]


def check(letters: list[DeadLetter], kafka: KafkaSettings, topic: Topic, group: str) -> None:
    assert sorted(letter.failure for letter in letters) == sorted(EXPECTED)
    assert {letter.source_topic for letter in letters} == {kafka.topic(topic)}
    assert {letter.consumer_group for letter in letters} == {group}
    by_failure = {letter.failure: letter for letter in letters}
    assert by_failure[FailureKind.INVALID_JSON].original_value == b"{definitely not json"
    assert by_failure[FailureKind.INVALID_JSON].original_key == b"k1"
    assert "request_id" in by_failure[FailureKind.INVALID_EVENT].reason
    assert "not readable" in by_failure[FailureKind.UNSUPPORTED_SCHEMA_VERSION].reason
    assert all(letter.reason for letter in letters)


async def test_feature_logger_dead_letters_garbage_and_keeps_logging(
    unique: str,
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.PREDICTIONS, Topic.LABELS])
    group = f"{unique}-feature-logger"
    logger = ConsumerProcess(
        "consumers.feature_logger",
        {
            "KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "FEATURE_LOGGER_GROUP": group,
            "FEATURE_LOGGER_DB_SCHEMA": unique,
            "FEATURE_LOGGER_PARQUET_ENABLED": "false",
            "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
        },
        tmp_path / "feature-logger.log",
    ).start()
    connection = await asyncpg.connect(postgres_settings.dsn())
    try:
        first, second = prediction(f"{unique}-1"), prediction(f"{unique}-2")
        label = GroundTruth(request_id=first.request_id, label=3.0, observed_at=datetime.now(UTC))
        await produce(kafka, Topic.PREDICTIONS, [first])
        await produce_raw(kafka, Topic.PREDICTIONS, garbage(first.to_bytes()))
        await produce(kafka, Topic.PREDICTIONS, [second])
        await produce_raw(kafka, Topic.LABELS, garbage(label.to_bytes()))
        await produce(kafka, Topic.LABELS, [label])

        async def good_ones_logged() -> bool:
            try:
                rows = await connection.fetchval(
                    f"SELECT count(*) FROM {unique}.prediction_log"  # noqa: S608
                )
                labels = await connection.fetchval(f"SELECT count(*) FROM {unique}.labels")  # noqa: S608
            except asyncpg.UndefinedTableError:
                return False
            return (rows, labels) == (2, 1)

        await eventually(good_ones_logged, what="the good messages around the garbage")
        check(await dead_letters(kafka, Topic.PREDICTIONS, 5), kafka, Topic.PREDICTIONS, group)
        check(await dead_letters(kafka, Topic.LABELS, 5), kafka, Topic.LABELS, group)
        assert logger.alive(), logger.log()

        # The CLI lists them, and a replay sends the originals back to their source topic
        # (still garbage here, so the logger dead-letters them a second time).
        monkeypatch.setenv("KAFKA_TOPIC_PREFIX", kafka.topic_prefix)
        listing = await asyncio.to_thread(
            CliRunner().invoke, dlq_app, ["list", "predictions"], env={"COLUMNS": "200"}
        )
        assert listing.exit_code == 0, listing.output
        assert "invalid_json" in listing.output
        stored = await read_dead_letters(kafka, Topic.PREDICTIONS)
        chosen = select(stored, failure=FailureKind.INVALID_JSON)
        assert len(chosen) == 1
        assert await replay_dead_letters(kafka, chosen) == 1
        again = await dead_letters(kafka, Topic.PREDICTIONS, 6)
        assert [letter.failure for letter in again].count(FailureKind.INVALID_JSON) == 2
        assert await asyncio.to_thread(logger.terminate) == 0, logger.log()
    finally:
        logger.close()
        await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await connection.close()


async def test_batch_scorer_dead_letters_garbage_and_keeps_scoring(
    unique: str, kafka_settings: KafkaSettings, mlflow_settings: MlflowSettings, tmp_path: Path
) -> None:
    kafka = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await create_topics(kafka, [Topic.SCORING_REQUESTS, Topic.SCORING_RESULTS, Topic.PREDICTIONS])
    model = register_champion(mlflow_settings.tracking_uri, f"dlq-{unique}", tmp_path / "train")
    group = f"{unique}-batch-scorer"
    scorer = ConsumerProcess(
        "consumers.batch_scorer",
        {
            "KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            "BATCH_SCORER_GROUP": group,
            "BATCH_SCORER_MODEL_NAME": model.name,
            "BATCH_SCORER_MODEL_CACHE_DIR": str(tmp_path / "models"),
            "BATCH_SCORER_METRICS_PORT": str(free_port()),
        },
        tmp_path / "batch-scorer.log",
    ).start()
    try:
        features: dict[str, FeatureValue] = {
            "season": 1, "mnth": "Jan", "hr": 8, "holiday": 0, "weekday": 2, "workingday": 1,
            "weathersit": "clear", "temp": 0.2, "atemp": 0.2, "hum": 0.5, "windspeed": 0.1,
        }  # fmt: skip
        good = [
            ScoringRequest(request_id=f"{unique}-{index}", features=features) for index in (1, 2)
        ]
        await produce(kafka, Topic.SCORING_REQUESTS, good[:1])
        await produce_raw(kafka, Topic.SCORING_REQUESTS, garbage(good[0].to_bytes()))
        await produce(kafka, Topic.SCORING_REQUESTS, good[1:])
        results = await read_topic(kafka, kafka.topic(Topic.SCORING_RESULTS), expected=2)
        answered = {ScoringResult.from_bytes(record.value).request_id for record in results}
        assert answered == {request.request_id for request in good}
        check(
            await dead_letters(kafka, Topic.SCORING_REQUESTS, 5),
            kafka,
            Topic.SCORING_REQUESTS,
            group,
        )
        assert await asyncio.to_thread(scorer.terminate) == 0, scorer.log()
    finally:
        scorer.close()
