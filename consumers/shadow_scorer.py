"""shadow-scorer: versions that do not serve, scored on the predictions stream; the live judge.

Consumes ``predictions`` in its own group, off the request path: the gateway and the batch
scorer never wait for it. Each batch's rows are scored by every shadow version of their model
(``driftloop.serving.shadow``: the challenger, the champion's predecessor, the first
champion), with the serving path's native LightGBM loader, and written to
``shadow_predictions`` with their role (``driftloop.storage.shadow_log``; idempotent by request
id and version) before the offsets are committed. The versions in shadow are read from the
registry every ``SHADOW_SCORER_PLAN_POLL_SECONDS`` and at once on a model event.

One replica at a time (a Postgres advisory lock) also runs the live judge
(``driftloop.training.live_judge``): rollback of a promotion that loses on live labelled rows
(``ModelRolledBack``), promotion of a challenger waiting in shadow, and the counterfactual
accounting exported to Prometheus. Run with ``python -m consumers.shadow_scorer``; metrics on
``SHADOW_SCORER_METRICS_PORT`` (9105).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Final

from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from consumers.service import serve
from driftloop.events import kafka
from driftloop.events.consumer_loop import (
    DUPLICATES,
    RECORDS_OUT,
    WRITE_SECONDS,
    ConsumerLoop,
    Delivery,
    LoopOptions,
    install_stop_signals,
)
from driftloop.events.producer import DeliveryError, EventProducer
from driftloop.leader import LeaderLock, run_as_leader
from driftloop.serving.champion import ModelRegistry
from driftloop.serving.hot_swap import ModelEventFollower
from driftloop.serving.shadow import ShadowModels, key_in_sample, resolve_plan
from driftloop.settings import (
    KafkaSettings,
    MlflowSettings,
    ModelNames,
    PostgresSettings,
    ServiceSettings,
    chosen_models,
)
from driftloop.storage.database import UNAVAILABLE_ERRORS
from driftloop.storage.migrations import SCHEMA_NAME
from driftloop.storage.shadow_log import ShadowLog, ShadowRole, open_shadow_log
from driftloop.training.live_judge import Judgement, LiveJudge
from schemas.events import TOPIC_EVENTS, ModelDecision, PredictionEvent
from schemas.features import FeatureSpec
from schemas.topics import Topic

NAME: Final = "shadow-scorer"
JUDGE_LOCK: Final = "shadow-scorer-judge"
log = logging.getLogger(NAME)

SHADOW_ROWS = Counter(
    "driftloop_shadow_predictions_total",
    "Shadow predictions logged (first time; replays not counted), by model and role.",
    ["model", "role"],
)
LIVE_ERROR = Gauge(
    "driftloop_live_error",
    "The promotion metric of the served predictions on the labelled rows of the model's "
    "latest window that had any (span: the declaration's monitoring.window or "
    "SHADOW_SCORER_WINDOW_SECONDS; its newest 20,000 labelled rows at most).",
    ["model", "metric"],
)
LIVE_LABELLED_ROWS = Gauge(
    "driftloop_live_labelled_rows", "Labelled rows of that window.", ["model"]
)
COUNTERFACTUAL_SERVED_ERROR = Gauge(
    "driftloop_counterfactual_served_error",
    "The served predictions' metric on the window's labelled rows the baseline also predicted.",
    ["model", "baseline", "metric"],
)
COUNTERFACTUAL_BASELINE_ERROR = Gauge(
    "driftloop_counterfactual_baseline_error",
    "The baseline version's metric on the same rows (previous_champion, first_champion).",
    ["model", "baseline", "metric"],
)
COUNTERFACTUAL_LIFT = Gauge(
    "driftloop_counterfactual_lift",
    "Relative improvement of the served predictions over the baseline on the same rows "
    "(0.1: 10 % lower error; negative: the baseline would have done better).",
    ["model", "baseline"],
)
COUNTERFACTUAL_ROWS = Gauge(
    "driftloop_counterfactual_rows",
    "Labelled rows of the window compared with the baseline.",
    ["model", "baseline"],
)
BASELINE_VERSION = Gauge(
    "driftloop_counterfactual_baseline_version",
    "Registry version of each baseline.",
    ["model", "baseline"],
)
LIVE_VERDICTS = Counter(
    "driftloop_live_verdicts_total",
    "Live verdicts applied, by kind (rollback, challenger) and action (keep, swap).",
    ["model", "kind", "action"],
)
LIVE_PROGRESS = Gauge(
    "driftloop_live_judged_rows",
    "Labelled rows gathered toward the pending live verdict, by kind (rollback, challenger); "
    "0 when none is pending.",
    ["model", "kind"],
)
BASELINES: Final = ("previous_champion", "first_champion")
VERDICT_KINDS: Final = ("rollback", "challenger")

Seconds = Annotated[float, Field(gt=0)]


class ShadowScorerSettings(ServiceSettings):
    """The shadow scorer and live judge (``SHADOW_SCORER_*``) and the connections it uses."""

    model_config = SettingsConfigDict(env_prefix="SHADOW_SCORER_")

    group: str = Field(
        default="shadow-scorer",
        description="SHADOW_SCORER_GROUP: Kafka consumer group (default shadow-scorer).",
    )
    db_schema: str = Field(
        default="public",
        pattern=SCHEMA_NAME.pattern,
        description="SHADOW_SCORER_DB_SCHEMA: Postgres schema of the log tables (default "
        "public; tests use one per test).",
    )
    models: ModelNames = Field(
        default=(),
        description="SHADOW_SCORER_MODELS: comma-separated registered models judged (default "
        "empty: the registered_model_name of every declaration in schemas/models).",
    )
    max_batch: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=5000,
        description="SHADOW_SCORER_MAX_BATCH: predictions per micro-batch (default 5000).",
    )
    poll_timeout_ms: Annotated[int, Field(ge=1)] = Field(
        default=200,
        description="SHADOW_SCORER_POLL_TIMEOUT_MS: longest wait for a batch (default 200).",
    )
    plan_poll_seconds: Seconds = Field(
        default=15.0,
        description="SHADOW_SCORER_PLAN_POLL_SECONDS: how often the versions in shadow are "
        "read from the registry; a model event reads them at once (default 15).",
    )
    sample_share: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0,
        description="SHADOW_SCORER_SAMPLE_SHARE: share of the requests scored in shadow, "
        "chosen by a hash of the request id so every version scores the same ones (default 1: "
        "all). Lower it when the scorer shares cores with the gateway: the live evidence then "
        "gathers at this share of the traffic's pace.",
    )
    judge_interval_seconds: Seconds = Field(
        default=5.0,
        description="SHADOW_SCORER_JUDGE_INTERVAL_SECONDS: how often the live judge runs over "
        "the models (default 5).",
    )
    judge_enabled: bool = Field(
        default=True,
        description="SHADOW_SCORER_JUDGE_ENABLED: run the live judge (rollback, shadow "
        "promotion, counterfactual metrics) when this replica holds its lock (default true).",
    )
    window_seconds: Seconds | None = Field(
        default=None,
        description="SHADOW_SCORER_WINDOW_SECONDS: span of the counterfactual window, "
        "overriding each declaration's monitoring.window (default unset). For replays faster "
        "than real time, such as the demo's.",
    )
    model_cache_dir: Path = Field(
        default=Path(".cache") / "shadow-scorer" / "models",
        description="SHADOW_SCORER_MODEL_CACHE_DIR: downloaded shadow versions (default "
        ".cache/shadow-scorer/models).",
    )
    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        default=9105,
        description="SHADOW_SCORER_METRICS_PORT: Prometheus /metrics port (default 9105; 0 "
        "picks a free port).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)

    def window(self, spec: FeatureSpec) -> timedelta:
        """The counterfactual window's span for ``spec``."""
        if self.window_seconds is not None:
            return timedelta(seconds=self.window_seconds)
        return spec.monitoring.window


class ShadowScorer:
    """The Kafka transport of shadow scoring: predictions in, shadow rows in Postgres out."""

    def __init__(self, models: ShadowModels, shadow_log: ShadowLog, client: MlflowClient) -> None:
        self.models = models
        self.shadow_log = shadow_log
        self.client = client
        self.without_champion: set[str] = set()
        """Models seen on the stream with no champion: nothing to score in shadow until the
        plans' poll finds one (not asked of the registry at every batch)."""

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, (*UNAVAILABLE_ERRORS, KafkaError, DeliveryError, MlflowException))

    async def refresh(self, model_name: str) -> None:
        """Read the model's versions in shadow from the registry and load them."""
        plan = await asyncio.to_thread(resolve_plan, self.client, model_name)
        if plan is None:
            self.without_champion.add(model_name)
            return
        self.without_champion.discard(model_name)
        await self.models.apply(plan)

    async def refresh_known(self) -> None:
        """Refresh every model seen so far; a registry failure keeps the plans it had."""
        for model_name in [*self.models.plans, *self.without_champion]:
            try:
                await self.refresh(model_name)
            except (MlflowException, OSError) as error:
                log.warning("shadow plan of %s not refreshed: %s", model_name, error)

    async def write(self, deliveries: Sequence[Delivery[PredictionEvent]]) -> None:
        if not deliveries:
            return
        events = [delivery.event for delivery in deliveries]
        seen = {event.model_name for event in events}
        for model_name in seen - set(self.models.plans) - self.without_champion:
            # First rows of a model: its plan before its rows (an unreachable registry is
            # transient, and the batch is retried rather than logged without its shadows).
            await self.refresh(model_name)
        scored = await asyncio.to_thread(self.models.score, events)
        started = time.perf_counter()
        inserted = await self.shadow_log.write(scored)
        WRITE_SECONDS.labels(NAME, "postgres").observe(time.perf_counter() - started)
        RECORDS_OUT.labels(NAME, "postgres").inc(inserted)
        DUPLICATES.labels(NAME, "postgres").inc(len(scored) - inserted)
        if inserted == len(scored):
            # The common case; after a replay the roles of the new rows are not told apart.
            counts: dict[tuple[str, ShadowRole], int] = {}
            for row in scored:
                counts[(row.model_name, row.role)] = counts.get((row.model_name, row.role), 0) + 1
            for (model_name, role), count in counts.items():
                SHADOW_ROWS.labels(model_name, role.value).inc(count)

    async def on_assigned(self, consumer: Any, partitions: frozenset[TopicPartition]) -> None:
        """Nothing to restore: every batch is written before its commit."""

    async def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        """Nothing to flush: every batch is written before its commit."""


def export(judgement: Judgement) -> None:
    """The judgement's figures as Prometheus metrics (a window without labelled rows leaves
    the previous window's figures in place)."""
    name = judgement.model_name
    for kind, verdict in (("rollback", judgement.rollback), ("challenger", judgement.challenger)):
        waiting = verdict is not None and verdict.action.value == "wait"
        LIVE_PROGRESS.labels(name, kind).set(verdict.rows if waiting and verdict else 0)
        if verdict is not None and not waiting:
            LIVE_VERDICTS.labels(name, kind, verdict.action.value).inc()
    window = judgement.window
    if window is None or not window.labelled_rows:
        return
    metric = window.metric.name
    LIVE_ERROR.labels(name, metric).set(window.served_score)
    LIVE_LABELLED_ROWS.labels(name).set(window.labelled_rows)
    for baseline in BASELINES:
        figures = window.baselines.get(baseline)
        if figures is None:
            for gauge in (COUNTERFACTUAL_SERVED_ERROR, COUNTERFACTUAL_BASELINE_ERROR):
                with contextlib.suppress(KeyError):
                    gauge.remove(name, baseline, metric)
            for gauge in (COUNTERFACTUAL_LIFT, COUNTERFACTUAL_ROWS, BASELINE_VERSION):
                with contextlib.suppress(KeyError):
                    gauge.remove(name, baseline)
            continue
        COUNTERFACTUAL_SERVED_ERROR.labels(name, baseline, metric).set(figures.served_score)
        COUNTERFACTUAL_BASELINE_ERROR.labels(name, baseline, metric).set(figures.baseline_score)
        if math.isfinite(figures.lift):
            COUNTERFACTUAL_LIFT.labels(name, baseline).set(figures.lift)
        COUNTERFACTUAL_ROWS.labels(name, baseline).set(figures.rows)
        BASELINE_VERSION.labels(name, baseline).set(figures.baseline_version)


async def judge_forever(
    settings: ShadowScorerSettings,
    judge: LiveJudge,
    models: ShadowModels,
    refresh: Callable[[str], Awaitable[None]],
) -> None:
    """Judge every model every interval (the configured or declared ones, and any other whose
    predictions were seen); a failing model is logged and tried next round."""
    configured = chosen_models(settings.models)
    for name in configured:
        # At 0 before the first row, so a panel shows 0 rather than no data.
        for role in ShadowRole:
            SHADOW_ROWS.labels(name, role.value)
        for kind in VERDICT_KINDS:
            LIVE_PROGRESS.labels(name, kind).set(0)
            # At 0 before the first verdict, so increase() sees the first rollback.
            for action in ("keep", "swap"):
                LIVE_VERDICTS.labels(name, kind, action)
    while True:
        for name in dict.fromkeys([*configured, *models.plans]):
            try:
                judgement = await judge.judge(name)
            except (*UNAVAILABLE_ERRORS, MlflowException, KafkaError, DeliveryError) as error:
                log.warning("live judge of %s skipped this round: %s", name, error)
                continue
            if judgement is None:
                continue
            export(judgement)
            if judgement.published:
                # The aliases moved: the versions in shadow change with them.
                await refresh(name)
        await asyncio.sleep(settings.judge_interval_seconds)


async def run_shadow_scorer(settings: ShadowScorerSettings) -> None:
    """Run the shadow scorer (and, when leading, the live judge) until SIGTERM/SIGINT."""
    predictions_topic = settings.kafka.topic(Topic.PREDICTIONS)
    options = LoopOptions(
        name=NAME,
        group=settings.group,
        topics={predictions_topic: TOPIC_EVENTS[Topic.PREDICTIONS]},
        dead_letter_topics={predictions_topic: settings.kafka.topic(Topic.PREDICTIONS.dead_letter)},
        max_batch=settings.max_batch,
        poll_timeout_ms=settings.poll_timeout_ms,
        # A share below 1: the records not in the sample are skipped by their key, undecoded.
        keep_key=None
        if settings.sample_share == 1
        else partial(key_in_sample, share=settings.sample_share),
    )
    uri = settings.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = ShadowModels(ModelRegistry(uri), settings.model_cache_dir, share=settings.sample_share)
    async with AsyncExitStack() as stack:
        shadow_log = await open_shadow_log(settings.postgres, settings.db_schema)
        stack.push_async_callback(shadow_log.close)
        scorer = ShadowScorer(models, shadow_log, client)

        async def on_model_event(model_name: str) -> None:
            with contextlib.suppress(MlflowException, OSError):
                await scorer.refresh(model_name)

        follower = ModelEventFollower(settings.kafka, on_model_event, reader=NAME)
        stack.push_async_callback(_cancel, asyncio.create_task(follower.run(), name="events"))
        stack.push_async_callback(
            _cancel,
            asyncio.create_task(_poll_plans(scorer, settings.plan_poll_seconds), name="plans"),
        )
        producer = EventProducer(settings.kafka, NAME)
        await producer.start()
        stack.push_async_callback(producer.close)
        consumer = kafka.consumer(settings.kafka, settings.group)
        await kafka.start_with_retry(consumer, settings.kafka)
        stack.push_async_callback(consumer.stop)
        loop = ConsumerLoop(options, consumer, producer, scorer)
        install_stop_signals(loop.stop)
        judging: asyncio.Task[None] | None = None
        if settings.judge_enabled:
            model_events = settings.kafka.topic(Topic.MODEL_EVENTS)

            async def publish(event: ModelDecision) -> None:
                await producer.send_event(model_events, event)

            judge = LiveJudge(
                client, shadow_log, publish, models.declaration, window=settings.window
            )
            # One judge per log schema and topic prefix: tests run their own beside the stack's.
            lock = LeaderLock(
                settings.postgres,
                f"{JUDGE_LOCK}:{settings.db_schema}:{settings.kafka.topic_prefix}",
            )
            judging = asyncio.create_task(
                run_as_leader(lock, lambda: judge_forever(settings, judge, models, on_model_event)),
                name="live-judge",
            )
            # A judge that stops (its lock lost, a bug) stops the process: its supervisor
            # starts it again as a standby, as the drift-monitor's does.
            judging.add_done_callback(lambda _: loop.stop())
            stack.push_async_callback(_cancel, judging)
        await loop.run()
        if judging is not None and judging.done() and not judging.cancelled():
            judging.result()
        log.info("stopped cleanly")


async def _poll_plans(scorer: ShadowScorer, interval_seconds: float) -> None:
    while True:
        await asyncio.sleep(interval_seconds)
        await scorer.refresh_known()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m consumers.shadow_scorer``."""
    serve("consumers.shadow_scorer", ShadowScorerSettings, run_shadow_scorer, argv=argv)


if __name__ == "__main__":
    main()
