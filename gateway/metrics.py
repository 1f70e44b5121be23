"""Prometheus metrics of the gateway, on a registry of its own (one per app)."""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from driftloop.serving.champion import Champion, LoadEvent
from gateway.publishing import PublisherState, PublisherStatus
from schemas.events import ChallengerShadowed, ModelDecision, ModelPromoted, ModelRolledBack

# Request latency: the gateway answers in about a millisecond; the tail matters to 100 ms.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class GatewayMetrics:
    """Every metric the gateway exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to response, by route template, method and status.",
            ("route", "method", "status"),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.predictions = Counter(
            "gateway_predictions",
            "Rows scored, by model name and version.",
            ("model_name", "model_version"),
            registry=registry,
        )
        self.prediction_values = PredictionHistograms()
        registry.register(self.prediction_values)
        self.relay_restarts = Counter(
            "gateway_relay_restarts",
            "Times the publishing relay process exited unexpectedly and was started again "
            "(the events it held in memory were lost; alert on any increase).",
            registry=registry,
        )
        # The publisher's counts live in the publisher (in this process or in the relay's);
        # this collector exports whatever it reports at scrape time.
        self.publisher_status: Callable[[], PublisherStatus | None] = lambda: None
        registry.register(_PublisherCollector(lambda: self.publisher_status()))
        self.model_loads = Counter(
            "gateway_model_loads",
            "Model load attempts, by outcome (loaded, unchanged, failed), source and reason.",
            ("outcome", "source", "reason"),
            registry=registry,
        )
        self.model_info = Gauge(
            "gateway_model_info",
            "The serving model: 1 for the current name/version/run, absent before any load.",
            ("model_name", "model_version", "run_id"),
            registry=registry,
        )
        self.model_loaded_at = Gauge(
            "gateway_model_loaded_timestamp_seconds",
            "When the serving model was loaded (Unix time).",
            ("model_name",),
            registry=registry,
        )
        self.model_version = Gauge(
            "gateway_model_version",
            "Registry version of the serving model, absent before any load.",
            ("model_name",),
            registry=registry,
        )
        self.model_registered_at = Gauge(
            "gateway_model_registered_timestamp_seconds",
            "When the serving model version was registered (Unix time): time() minus this is "
            "the model's age. Absent while the registry's date is unknown.",
            ("model_name",),
            registry=registry,
        )
        # The gateway_model_info labels of each model's serving version, removed on a swap.
        self._info_labels: dict[str, tuple[str, str, str]] = {}
        self.model_decisions = Counter(
            "gateway_model_decisions",
            "Model decisions read from model.events, by model and decision (promoted, rejected, "
            "shadowed, rolled_back).",
            ("model_name", "decision"),
            registry=registry,
        )

    def record_load(self, event: LoadEvent) -> None:
        """Count one model load attempt (the champion holder's listener)."""
        # Reasons are a small fixed set (start, poll, model_event, admin), safe as a label.
        self.model_loads.labels(event.outcome.value, event.source.value, event.reason).inc()

    def record_champion(self, champion: Champion) -> None:
        """Make ``champion`` its model's serving version in ``gateway_model_info`` and its
        siblings (each served model has its own series)."""
        name = champion.name
        previous = self._info_labels.pop(name, None)
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.model_info.remove(*previous)
        labels = (name, str(champion.version), champion.run_id)
        self.model_info.labels(*labels).set(1)
        self._info_labels[name] = labels
        self.model_loaded_at.labels(name).set(champion.loaded_at.timestamp())
        self.model_version.labels(name).set(champion.version)
        if champion.registered_at is not None:
            self.model_registered_at.labels(name).set(champion.registered_at.timestamp())
        else:
            with contextlib.suppress(KeyError):
                self.model_registered_at.remove(name)

    def expect_decisions(self, model_name: str) -> None:
        """Export the decision counters of ``model_name`` at 0 before its first decision."""
        # An increase() over a counter that first appears at 1 is 0: the first promotion after
        # a restart would be missed by the dashboards' annotations.
        for decision in ("promoted", "rejected", "shadowed", "rolled_back"):
            self.model_decisions.labels(model_name, decision)

    def record_decision(self, event: ModelDecision) -> None:
        """Count one decision read from model.events (promoted, rejected, shadowed,
        rolled_back)."""
        if isinstance(event, ModelPromoted):
            decision = "promoted"
        elif isinstance(event, ModelRolledBack):
            decision = "rolled_back"
        elif isinstance(event, ChallengerShadowed):
            decision = "shadowed"
        else:
            decision = "rejected"
        self.model_decisions.labels(event.model_name, decision).inc()


class PredictionHistogram:
    """One model's served predictions: counts per bucket (not cumulative) and their sum.

    Observed on the event loop's thread only; a scrape reads the counts from another thread,
    and the count it reports is the sum of the buckets it read, so it matches them.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one prediction (``le`` buckets: a value on a bound counts in that bound's)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class PredictionHistograms(Collector):
    """``gateway_prediction_value``: a histogram per served model, each with the buckets its
    declaration names or its task's (``FeatureSpec.prediction_buckets``).

    prometheus_client gives every series of a histogram the same buckets, which cannot hold
    bike counts and probabilities at once; Prometheus itself takes ``le`` sets per series.
    """

    def __init__(self) -> None:
        self._models: dict[str, PredictionHistogram] = {}

    def model(self, name: str, bounds: tuple[float, ...]) -> PredictionHistogram:
        """The histogram of model ``name``: its first bounds stay (a series keeps its ``le``)."""
        histogram = self._models.get(name)
        if histogram is None:
            histogram = self._models[name] = PredictionHistogram(bounds)
        return histogram

    def collect(self) -> Iterator[Metric]:
        """The family, with one series per model that has a histogram."""
        family = HistogramMetricFamily(
            "gateway_prediction_value",
            "Distribution of the predicted values, by model (buckets from its declaration, "
            "else its task's).",
            labels=["model_name"],
        )
        for name, histogram in sorted(self._models.items()):
            counts = list(histogram.counts)
            cumulative = list(itertools.accumulate(counts))
            bounds = [*(str(bound) for bound in histogram.bounds), "+Inf"]
            family.add_metric([name], list(zip(bounds, cumulative, strict=True)), histogram.total)
        yield family


class _PublisherCollector(Collector):
    """The publisher's state and counts as Prometheus metrics, read at each scrape."""

    def __init__(self, status: Callable[[], PublisherStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """One family per figure of the publisher's status (zeros while publishing is off)."""
        status = self._status() or PublisherStatus(state=PublisherState.STOPPED)
        published = CounterMetricFamily(
            "gateway_kafka_published", "Events acknowledged by Kafka, by topic.", labels=["topic"]
        )
        for topic, count in sorted(status.published.items()):
            published.add_metric([topic], count)
        errors = CounterMetricFamily(
            "gateway_kafka_publish_errors",
            "Events Kafka did not acknowledge in time (they go to the spool), by topic.",
            labels=["topic"],
        )
        for topic, count in sorted(status.publish_errors.items()):
            errors.add_metric([topic], count)
        yield published
        yield errors
        yield GaugeMetricFamily(
            "gateway_spool_depth", "Events waiting in the on-disk spool.", status.spool_depth
        )
        yield GaugeMetricFamily(
            "gateway_spool_capacity",
            "Events the spool holds at most (GATEWAY_SPOOL_MAX_RECORDS); beyond it they drop.",
            status.spool_capacity,
        )
        yield CounterMetricFamily(
            "gateway_spooled_events", "Events written to the spool.", status.spooled
        )
        yield CounterMetricFamily(
            "gateway_spool_dropped_events",
            "Events lost because the spool was full (alert on any increase).",
            status.spool_dropped,
        )
        yield GaugeMetricFamily(
            "gateway_kafka_up",
            "1 while events go straight to Kafka, 0 while they are spooled.",
            float(status.state is PublisherState.DIRECT),
        )
