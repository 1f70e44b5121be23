"""The gateway's running parts, created and stopped by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from driftloop.events.producer import RecordProducer
from driftloop.events.spool import Spool
from driftloop.serving.catalog import ModelCatalog, ServedModel
from driftloop.serving.champion import (
    Champion,
    ChampionHolder,
    ChampionSource,
    LoadEvent,
    LoadOutcome,
    ModelRegistry,
)
from driftloop.serving.hot_swap import FollowerState, ModelEventFollower
from driftloop.serving.scoring import ScoringService
from gateway.metrics import GatewayMetrics, PredictionHistogram
from gateway.problems import RequestProblemError
from gateway.publishing import Answer, EventPublisher, ModelKey, PredictionRecords, Publisher
from gateway.relay import RelayConfig, RelayPublisher
from gateway.settings import GatewaySettings
from schemas.events import Event
from schemas.features import FeatureSpec
from schemas.fields import FeatureValue
from schemas.topics import Topic
from schemas.validation import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _ChampionOutputs:
    """What the gateway writes for one model version: its metric children, its name in events."""

    predictions: Counter
    values: PredictionHistogram
    model: ModelKey


class Gateway:
    """Served models, publisher, spool and background tasks of one gateway process.

    The default model (``GATEWAY_FEATURE_SPEC``) answers ``/predict``; every model of the
    catalog answers ``/models/{name}/predict``, each hot-swapped on its own.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        spec: FeatureSpec,
        metrics: GatewayMetrics,
        *,
        registry: ChampionSource | None = None,
        producer_factory: Callable[[], RecordProducer] | None = None,
    ) -> None:
        if producer_factory is not None and settings.publisher_process:
            raise ValueError("a producer_factory replaces the producer of the in-process "
                             "publisher: set publisher_process=False")  # fmt: skip
        self.settings = settings
        self._producer_factory = producer_factory
        self.metrics = metrics
        self.catalog = ModelCatalog(
            settings,
            spec,
            registry or ModelRegistry(settings.mlflow.tracking_uri),
            on_load=self._model_loaded,
        )
        self.catalog.on_added.append(lambda served: metrics.expect_decisions(served.name))
        self.spool: Spool | None = None
        self.publisher: Publisher | None = None
        self.follower: ModelEventFollower | None = None
        self.labels_topic = settings.kafka.topic(Topic.LABELS)
        self._champion_outputs: dict[tuple[str, int], _ChampionOutputs] = {}
        self._api_keys = tuple(key.get_secret_value().encode() for key in settings.api_keys)
        self._admin_token = settings.admin_token.get_secret_value().encode()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def default(self) -> ServedModel:
        """The model of /predict and /feedback."""
        return self.catalog.default

    @property
    def models(self) -> dict[str, ServedModel]:
        """Every served model by registered name."""
        return self.catalog.models

    # The default model's parts, under the names the single-model gateway had.
    @property
    def spec(self) -> FeatureSpec:
        """The default model's declaration."""
        return self.default.spec

    @property
    def holder(self) -> ChampionHolder:
        """The default model's champion holder."""
        return self.default.holder

    @property
    def scoring(self) -> ScoringService:
        """The default model's scoring service."""
        return self.default.scoring

    @property
    def model_name(self) -> str:
        """The default model's registered name."""
        return self.default.name

    def model(self, name: str) -> ServedModel:
        """The served model ``name``; a 404 refusal when this gateway serves none of that name."""
        served = self.catalog.get(name)
        if served is None:
            raise RequestProblemError(
                404,
                [
                    Problem(
                        "name", f"no model {name!r} is served here; served: {sorted(self.models)}"
                    )
                ],
            )
        return served

    async def start(self) -> None:
        """Open the spool, connect Kafka, load the models and start the background tasks."""
        if self.settings.publish:
            self.publisher = self._publisher()
            self.metrics.publisher_status = self.publisher.status
            await self.publisher.start(connect_within_seconds=self.settings.kafka_timeout_seconds)
        await self.catalog.start()
        if self.settings.model_events:
            self.follower = ModelEventFollower(
                self.settings.kafka,
                self.catalog.promoted,
                reader="gateway",
                on_decision=self.metrics.record_decision,
            )
            self._tasks.append(asyncio.create_task(self.follower.run(), name="model-events"))

    async def stop(self) -> None:
        """Stop the background tasks, hand the queued events to Kafka or the spool, close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.catalog.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.spool is not None:
            self.spool.close()

    def _publisher(self) -> Publisher:
        settings = self.settings
        if settings.publisher_process:
            config = RelayConfig(
                kafka=settings.kafka,
                spool_path=settings.spool_path,
                spool_max_records=settings.spool_max_records,
                timeout_seconds=settings.kafka_timeout_seconds,
                predictions_topic=settings.kafka.topic(Topic.PREDICTIONS),
            )
            return RelayPublisher(config, on_restart=self.metrics.relay_restarts.inc)
        self.spool = Spool(settings.spool_path, max_records=settings.spool_max_records)
        return EventPublisher(
            settings.kafka,
            self.spool,
            timeout_seconds=settings.kafka_timeout_seconds,
            predictions=PredictionRecords(settings.kafka.topic(Topic.PREDICTIONS), "http"),
            producer_factory=self._producer_factory,
        )

    def record(
        self,
        champion: Champion,
        rows: Sequence[Mapping[str, FeatureValue]],
        row_ids: Sequence[str],
        predictions: Sequence[float],
        latency_ms: float,
    ) -> None:
        """Count an answer's predictions and queue one PredictionEvent per row."""
        outputs = self._outputs(champion)
        outputs.predictions.inc(len(predictions))
        for prediction in predictions:
            outputs.values.observe(prediction)
        if self.publisher is not None:
            self.publisher.publish_predictions(
                Answer(
                    outputs.model, time.time_ns() // 1000, latency_ms, row_ids, rows, predictions
                )
            )

    def _outputs(self, champion: Champion) -> _ChampionOutputs:
        # Resolved once per model version: labels() takes a lock and hashes the labels.
        key = (champion.name, champion.version)
        outputs = self._champion_outputs.get(key)
        if outputs is None:
            outputs = self._champion_outputs[key] = _ChampionOutputs(
                self.metrics.predictions.labels(champion.name, str(champion.version)),
                self.metrics.prediction_values.model(
                    champion.name, self.model(champion.name).spec.prediction_buckets
                ),
                ModelKey(champion.name, champion.version, champion.run_id),
            )
        return outputs

    def publish_label(self, event: Event) -> None:
        """Queue a ground-truth event for the labels topic."""
        if self.publisher is None:
            raise RequestProblemError(
                409, [Problem("body", "publishing is off on this gateway (GATEWAY_PUBLISH)")]
            )
        self.publisher.publish(self.labels_topic, event)

    @property
    def model_events_state(self) -> str:
        """following, connecting or off."""
        return (self.follower.state if self.follower else FollowerState.OFF).value

    @property
    def requires_api_key(self) -> bool:
        """Whether /predict and /feedback need one of the configured API keys."""
        return bool(self._api_keys)

    def check_api_key(self, presented: str | None) -> None:
        """Refuse a request without one of the configured API keys (when any is configured)."""
        if not self._api_keys:
            return
        if presented is None:
            raise RequestProblemError(401, [Problem("X-API-Key", "an API key is required")])
        candidate = presented.encode()
        # Compare with every key in constant time: the answer does not leak which was close.
        if not any(hmac.compare_digest(candidate, key) for key in self._api_keys):
            raise RequestProblemError(401, [Problem("X-API-Key", "unknown API key")])

    def check_admin(self, authorization: str | None) -> None:
        """Refuse an admin request without the bearer token."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestProblemError(401, [Problem("Authorization", "a bearer token is required")])
        if not hmac.compare_digest(token.encode(), self._admin_token):
            raise RequestProblemError(403, [Problem("Authorization", "wrong admin token")])

    def _model_loaded(self, name: str, event: LoadEvent) -> None:
        self.metrics.record_load(event)
        served = self.models.get(name)
        champion = served.holder.current if served is not None else None
        if event.outcome is LoadOutcome.LOADED and champion is not None:
            self.metrics.record_champion(champion)
