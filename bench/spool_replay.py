"""Spool replay: how fast the gateway's publisher empties its spool once Kafka is back, against
its direct path (an empty spool) in the same run.

    uv run python bench/spool_replay.py [--events 200000] [--rate 5000]

Three runs of the gateway's ``EventPublisher`` against the dev stack's Kafka, each on a topic
of its own, with prediction events as the gateway writes them (about 480 bytes):

- direct: the spool is empty; ``--events`` events are handed to the publisher at once;
- replay: the spool holds ``--events`` events when the publisher starts;
- replay under traffic: the same, while new events arrive at ``--rate`` a second. They go to
  the spool behind the old ones (its order is arrival order), so the spool drains only if
  replay outruns the traffic; the run lasts until it is empty.

Each run's time ends when Kafka has acknowledged every event (and the spool is empty). The
topic is then read back: every request id must be there (delivery is at least once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from driftloop.events import kafka
from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings, load_settings
from gateway.publishing import EventPublisher, ModelKey, PredictionRecords, datetime_of
from schemas.topics import Topic

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
MODEL = ModelKey("bikeshare", 1, "0" * 32)
ROW = {
    "season": 2, "mnth": "May", "hr": 17, "holiday": 0, "weekday": 3, "workingday": 1,
    "weathersit": 1, "temp": 0.62, "atemp": 0.6, "hum": 0.55, "windspeed": 0.19,
}  # fmt: skip
_SPOOL_CHUNK = 10_000
_TICK_SECONDS = 0.01
_TIMEOUT_SECONDS = 600.0


@dataclass
class Run:
    """One run's figures."""

    name: str
    events: int
    seconds: float
    read_back: int = 0
    missing: int = 0

    @property
    def rate(self) -> float:
        """Events acknowledged per second."""
        return self.events / self.seconds


def records(topic: str, prefix: str, count: int, start: int = 0) -> list[SpoolRecord]:
    """``count`` prediction events with request ids ``<prefix>-<n>``."""
    encode = PredictionRecords(topic, "http").record
    at = datetime_of(time.time_ns() // 1000)
    return [
        encode(MODEL, at, f"{prefix}-{n:08d}", ROW, 100.0 + n % 500, 1.5)
        for n in range(start, start + count)
    ]


async def until(condition: Callable[[], bool]) -> None:
    """Wait, polling, until ``condition()`` holds (at most ``_TIMEOUT_SECONDS``)."""
    deadline = time.monotonic() + _TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the publisher did not finish within {_TIMEOUT_SECONDS:.0f} s")
        await asyncio.sleep(_TICK_SECONDS)


def publisher(settings: KafkaSettings, spool: Spool) -> EventPublisher:
    """The gateway's publisher with the gateway's default timeout."""
    return EventPublisher(settings, spool, timeout_seconds=10.0, client_name="bench-replay")


async def direct(settings: KafkaSettings, work: Path, events: int) -> Run:
    """Hand every event to a publisher whose spool is empty; time until all are acknowledged."""
    topic = settings.topic(Topic.PREDICTIONS)
    batch = records(topic, "direct", events)
    spool = Spool(work / "direct.sqlite3", max_records=events)
    sender = publisher(settings, spool)
    await sender.start(connect_within_seconds=10.0)
    try:
        started = time.perf_counter()
        for record in batch:
            sender.publish_encoded(*record)
        await until(lambda: sender.status().published.get(topic, 0) >= events)
        seconds = time.perf_counter() - started
        if spool.depth:
            raise RuntimeError(f"the direct run spooled {spool.depth} events")
    finally:
        await sender.stop()
        spool.close()
    return Run("direct (empty spool)", events, seconds)


async def replay(settings: KafkaSettings, work: Path, events: int, rate: int, name: str) -> Run:
    """Start a publisher on a spool of ``events``; time until the spool is empty.

    With ``rate``, new events arrive at that rate meanwhile and are counted too.
    """
    topic = settings.topic(Topic.PREDICTIONS)
    spool = Spool(work / f"{name}.sqlite3", max_records=10 * events + 1)
    for start in range(0, events, _SPOOL_CHUNK):
        spool.extend(records(topic, "spooled", min(_SPOOL_CHUNK, events - start), start))
    sender = publisher(settings, spool)
    live = 0
    await sender.start(connect_within_seconds=10.0)
    # From the start on, as in the direct run: the replay begins once the producer is up.
    started = time.perf_counter()
    try:
        while spool.depth:
            if rate:
                due = int((time.perf_counter() - started) * rate) - live
                for record in records(topic, "live", due, live):
                    sender.publish_encoded(*record)
                live += due
            await asyncio.sleep(_TICK_SECONDS)
        total = events + live
        await until(lambda: sender.status().published.get(topic, 0) >= total and not spool.depth)
        seconds = time.perf_counter() - started
    finally:
        await sender.stop()
        spool.close()
    return Run(name, total, seconds)


async def read_back(settings: KafkaSettings, run: Run) -> None:
    """Count the distinct request ids on the run's topic."""
    consumer = AIOKafkaConsumer(
        settings.topic(Topic.PREDICTIONS),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    keys: set[bytes] = set()
    try:
        while len(keys) < run.events:
            batches = await consumer.getmany(timeout_ms=2000, max_records=10_000)
            if not batches:
                break
            for messages in batches.values():
                keys.update(message.key for message in messages if message.key is not None)
    finally:
        await consumer.stop()
    run.read_back, run.missing = len(keys), run.events - len(keys)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5_000, help="live events/s during replay")
    options = parser.parse_args()
    base = load_settings(KafkaSettings)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="spool-replay-") as folder:
        work = Path(folder)
        for name in ("direct", "replay", "replay under traffic"):
            prefix = f"bench-replay-{stamp}-{uuid.uuid4().hex[:6]}."
            settings = base.model_copy(update={"topic_prefix": prefix})
            await kafka.create_topics(settings, [Topic.PREDICTIONS])
            if name == "direct":
                run = await direct(settings, work, options.events)
            else:
                rate = options.rate if name == "replay under traffic" else 0
                run = await replay(settings, work, options.events, rate, name)
            await read_back(settings, run)
            runs.append(run)
            print(f"{run.name}: {run.events:,} events in {run.seconds:.1f} s", flush=True)
    print(f"\nspool replay benchmark {stamp} ({options.events:,} events of ~480 bytes)")
    print(f"{'run':28} {'events':>9} {'seconds':>8} {'events/s':>9} {'read back':>10} missing")
    for run in runs:
        print(
            f"{run.name:28} {run.events:9,} {run.seconds:8.1f} {run.rate:9,.0f} "
            f"{run.read_back:10,} {run.missing:7,}"
        )
    reference = runs[0].rate
    ratios = {"replay": runs[1].rate / reference, "replay_under_traffic": runs[2].rate / reference}
    print(f"\nreplay / direct (events/s)                 {ratios['replay']:.2f}")
    print(
        f"replay under {options.rate:,}/s of traffic / direct  "
        f"{ratios['replay_under_traffic']:.2f}  (drains while traffic < replay rate)"
    )
    document = {
        "stamp": stamp,
        "events": options.events,
        "rate": options.rate,
        "runs": [{**asdict(run), "events_per_second": run.rate} for run in runs],
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"spool-replay-{stamp}.json"
    path.write_text(json.dumps(document, indent=2))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    asyncio.run(main())
