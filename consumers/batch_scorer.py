"""batch-scorer: scores ``scoring.requests`` in vectorised batches with the current champion.

Each batch is checked, encoded and scored in one ``Booster.predict`` call by the scoring
service the gateway's /predict uses too (``driftloop.serving.scoring``), with the champion
``driftloop.serving.champion`` loads and hot-swaps, and answered with a ``ScoringResult`` per
request on ``scoring.results`` (keyed by batch id) and a ``PredictionEvent`` per scored row on
``predictions`` (source ``batch``), so batch traffic is logged and drift-checked like HTTP
traffic. Offsets are committed only after every produced message is acknowledged: a crash
replays the batch, and readers de-duplicate results by request id (the feature logger does so
by design). Run with ``python -m consumers.batch_scorer``; metrics on
``BATCH_SCORER_METRICS_PORT`` (9102).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Annotated, Any, ClassVar, Final, Protocol

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from consumers.service import serve
from driftloop.events import kafka
from driftloop.events.consumer_loop import (
    RECORDS_OUT,
    WRITE_SECONDS,
    ConsumerLoop,
    Delivery,
    LoopOptions,
    install_stop_signals,
)
from driftloop.events.producer import DeliveryError, EventProducer, Record, RecordProducer
from driftloop.serving.catalog import ModelCatalog, ServedModel
from driftloop.serving.champion import Champion, ModelRegistry
from driftloop.serving.hot_swap import ModelEventFollower
from driftloop.serving.scoring import NoModelError
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ServedModelSettings,
    ServiceSettings,
)
from schemas.events import TOPIC_EVENTS, PredictionEvent, ScoringRequest, ScoringResult
from schemas.features import load_feature_spec
from schemas.fields import utc_now
from schemas.topics import Topic
from schemas.validation import describe

NAME: Final = "batch-scorer"
PRODUCER_BATCH_BYTES: Final = 1024 * 1024
log = logging.getLogger(NAME)

SCORED = Counter(
    "driftloop_batch_scorer_rows_total",
    "Requests answered, by outcome (scored, or invalid features answered with an error).",
    ["outcome"],
)
PREDICT_SECONDS = Histogram(
    "driftloop_batch_scorer_predict_seconds",
    "Time of one vectorised Booster.predict call.",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
MODEL_VERSION = Gauge(
    "driftloop_batch_scorer_model_version", "Registry version of the champion scoring now."
)


class BatchScorerSettings(ServiceSettings, ServedModelSettings):
    """The batch scorer (``BATCH_SCORER_*``) and the connections it uses."""

    model_config = SettingsConfigDict(env_prefix="BATCH_SCORER_")
    cache_folder: ClassVar[str] = "batch-scorer"

    group: str = Field(
        default="batch-scorer",
        description="BATCH_SCORER_GROUP: Kafka consumer group (default batch-scorer).",
    )
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=5000,
        description="BATCH_SCORER_MAX_BATCH: requests scored per predict call (default 5000).",
    )
    poll_timeout_ms: Annotated[int, Field(ge=1)] = Field(
        default=100,
        description="BATCH_SCORER_POLL_TIMEOUT_MS: longest wait for a batch (default 100).",
    )
    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        default=9102,
        description="BATCH_SCORER_METRICS_PORT: Prometheus /metrics port (default 9102; 0 "
        "picks a free port).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


class ScoringModels(Protocol):
    """The models a batch scorer serves (``driftloop.serving.catalog.ModelCatalog``)."""

    @property
    def default(self) -> ServedModel: ...

    @property
    def models(self) -> dict[str, ServedModel]: ...

    def get(self, name: str | None) -> ServedModel | None: ...

    async def discover(self) -> list[str]: ...


class BatchScorer:
    """The Kafka transport of the scoring service: requests in, results and predictions out.

    A request names its model (``model_name``; null for the default one). The requests of a
    batch are scored in one vectorised call per model.
    """

    def __init__(
        self,
        models: ScoringModels,
        producer: RecordProducer,
        *,
        results_topic: str,
        predictions_topic: str,
    ) -> None:
        self.models = models
        self.producer = producer
        self.results_topic = results_topic
        self.predictions_topic = predictions_topic

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, KafkaError | DeliveryError | NoModelError)

    async def write(self, deliveries: Sequence[Delivery[ScoringRequest]]) -> None:
        if not deliveries:
            return
        by_model: dict[str | None, list[ScoringRequest]] = {}
        for delivery in deliveries:
            by_model.setdefault(delivery.event.model_name, []).append(delivery.event)
        if any(self.models.get(name) is None for name in by_model):
            # A model declared since the last look: serve it before answering "unknown".
            await self.models.discover()
        # The batch is answered at one moment, so its events share one timestamp (one clock
        # read and UTC conversion per batch instead of two per row).
        answered_at = utc_now()
        messages: list[Record] = []
        predicted = 0
        for name, requests in by_model.items():
            served = self.models.get(name)
            if served is None:
                reason = f"no model {name!r} is served here; served: {sorted(self.models.models)}"
                messages += [self._unknown_model(request, reason) for request in requests]
                continue
            if served is not self.models.default and served.holder.current is None:
                # The default model's requests wait for its first champion (NoModelError is
                # transient); another model without one must not hold every model's traffic.
                reason = f"model {served.name!r} has no champion loaded yet"
                messages += [self._unknown_model(request, reason) for request in requests]
                continue
            predicted += await self._score(served, requests, answered_at, messages)
        started = time.perf_counter()
        # The loop commits the requests' offsets only after Kafka took every record.
        await self.producer.send(messages)
        WRITE_SECONDS.labels(NAME, "kafka").observe(time.perf_counter() - started)
        RECORDS_OUT.labels(NAME, "scoring.results").inc(len(deliveries))
        RECORDS_OUT.labels(NAME, "predictions").inc(predicted)
        SCORED.labels("scored").inc(predicted)
        SCORED.labels("invalid").inc(len(deliveries) - predicted)

    async def _score(
        self,
        served: ServedModel,
        requests: Sequence[ScoringRequest],
        answered_at: datetime,
        messages: list[Record],
    ) -> int:
        """Score one model's requests in one call; append their records; the rows scored."""
        # One call checks, encodes and scores the model's rows with one champion: a hot swap
        # in the middle never mixes two versions.
        scores = await served.scoring.score_in_thread([request.features for request in requests])
        champion = scores.champion
        PREDICT_SECONDS.observe(scores.predict_seconds)
        share_ms = scores.predict_seconds * 1000 / max(len(scores.scored), 1)
        for position, problems in scores.refused:
            reason = "invalid features: " + describe(
                [problem.under("", whole="features") for problem in problems]
            )
            messages.append(self._refusal(requests[position], champion, reason))
        for position, reason in scores.failed:
            messages.append(self._refusal(requests[position], champion, reason))
        # Every field below comes from a validated request or the loaded champion, so the
        # messages are encoded without validating them a second time (most of a batch's CPU).
        # The fields naming the model are encoded once per batch.
        encode_result = ScoringResult.trusted_encoder(
            model_name=champion.name, model_version=champion.version, error=None
        )
        encode_prediction = PredictionEvent.encoder(
            model_name=champion.name,
            model_version=champion.version,
            run_id=champion.run_id,
            source="batch",
        )
        for position, features, score in zip(
            scores.scored, scores.rows, scores.predictions, strict=True
        ):
            request = requests[position]
            messages.append(
                Record(
                    self.results_topic,
                    ScoringResult.key_of(request.request_id, request.batch_id),
                    encode_result(
                        occurred_at=answered_at,
                        request_id=request.request_id,
                        batch_id=request.batch_id,
                        prediction=score,
                    ),
                )
            )
            messages.append(
                Record(
                    self.predictions_topic,
                    request.partition_key(),
                    encode_prediction(
                        occurred_at=answered_at,
                        request_id=request.request_id,
                        features=features,
                        prediction=score,
                        latency_ms=share_ms,
                    ),
                )
            )
        if served is self.models.default:
            MODEL_VERSION.set(champion.version)
        return len(scores.scored)

    def _unknown_model(self, request: ScoringRequest, reason: str) -> Record:
        """The error result of a request no served champion can answer."""
        result = ScoringResult(
            request_id=request.request_id,
            batch_id=request.batch_id,
            model_name=request.model_name or self.models.default.name,
            model_version=None,
            error=reason,
        )
        return Record(self.results_topic, result.partition_key(), result.to_bytes())

    def _refusal(self, request: ScoringRequest, champion: Champion, reason: str) -> Record:
        result = ScoringResult(
            request_id=request.request_id,
            batch_id=request.batch_id,
            model_name=champion.name,
            model_version=champion.version,
            error=reason,
        )
        return Record(self.results_topic, result.partition_key(), result.to_bytes())

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        """Nothing to restore: the scorer keeps no state between batches."""

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Nothing to flush: every batch is acknowledged before its commit."""


async def run_batch_scorer(settings: BatchScorerSettings) -> None:
    """Run the batch scorer until SIGTERM/SIGINT (or a non-transient failure)."""
    spec = load_feature_spec(settings.feature_spec)
    requests_topic = settings.kafka.topic(Topic.SCORING_REQUESTS)
    options = LoopOptions(
        name=NAME,
        group=settings.group,
        topics={requests_topic: TOPIC_EVENTS[Topic.SCORING_REQUESTS]},
        dead_letter_topics={
            requests_topic: settings.kafka.topic(Topic.SCORING_REQUESTS.dead_letter)
        },
        max_batch=settings.max_batch,
        poll_timeout_ms=settings.poll_timeout_ms,
    )
    models = ModelCatalog(settings, spec, ModelRegistry(settings.mlflow.tracking_uri))
    await models.start()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(models.stop)
        # ModelPromoted swaps a model between batches within a second; polling is the net.
        follower = ModelEventFollower(settings.kafka, models.promoted, reader=NAME)
        following = asyncio.create_task(follower.run(), name="model-events")
        stack.push_async_callback(_cancel, following)
        # Results of one batch share a partition (keyed by batch id), so large batches. A failed
        # send fails the batch and the loop retries it; readers dedupe by request id.
        producer = EventProducer(settings.kafka, NAME, config={"batch.size": PRODUCER_BATCH_BYTES})
        await producer.start()
        stack.push_async_callback(producer.close)
        consumer = kafka.consumer(
            settings.kafka, settings.group, max_partition_fetch_bytes=8 * 1024 * 1024
        )
        await kafka.start_with_retry(consumer, settings.kafka)
        stack.push_async_callback(consumer.stop)
        scorer = BatchScorer(
            models,
            producer,
            results_topic=settings.kafka.topic(Topic.SCORING_RESULTS),
            predictions_topic=settings.kafka.topic(Topic.PREDICTIONS),
        )
        loop = ConsumerLoop(options, consumer, producer, scorer)
        install_stop_signals(loop.stop)
        await loop.run()
        log.info("stopped cleanly")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m consumers.batch_scorer``."""
    serve("consumers.batch_scorer", BatchScorerSettings, run_batch_scorer, argv=argv)


if __name__ == "__main__":
    main()
