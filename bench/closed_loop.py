"""Closed-loop latency on this machine: first drifted window logged -> new champion served.

    make up && uv run python bench/closed_loop.py [--runs 1] [--hours-per-second 40]

Against the running native stack and its own services (gateway, feature-logger, drift-monitor,
retrain-trigger, Airflow ``retrain_model``), exactly as ``make demo`` runs them: each run
trains a fresh January-March champion of ``bikeshare`` (``--force``), replays April-June
through the gateway with labels, and follows the loop with
``driftloop_tools.demo.loop_watch`` until the gateway serves the promoted version. It prints
the time of each stage from the end of the
first drifted window (the moment its last row was logged), the loop's total against the
3-minute target, and, as the reference measured in the same run, Airflow's own overhead: a
one-task DAG (``platform_healthcheck``) from trigger to finish. Results go to
``bench/results/closed_loop-<time>.json``.

The stack's retrain-trigger applies its cooldown in prediction time (RETRAIN_TRIGGER_COOLDOWN_*
in .env.example): the replays here log at the wall clock, so runs closer together than the
cooldown are refused by it, and the script waits it out between runs (``--pause``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson

from driftloop.drift.store import open_drift_store
from driftloop.orchestration.airflow import AirflowClient
from driftloop.orchestration.ledger import open_retrain_ledger
from driftloop.settings import load_settings
from driftloop.training.bootstrap import bootstrap_model
from driftloop_tools.cli.model import announce_promotion
from driftloop_tools.demo.loop_watch import LoopTimeline, LoopWatcher
from driftloop_tools.demo.replay import Replayer, day_of_year, load_replay_hours, new_replay_id
from driftloop_tools.stack.settings import StackSettings
from schemas.features import load_feature_spec

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS = 180.0
SPEC = load_feature_spec("bikeshare")


@dataclass(frozen=True, slots=True)
class LoopRun:
    loop_seconds: float | None
    stages: list[tuple[str, float]]
    new_version: int | None


async def one_loop(stack: StackSettings, hours_per_second: float, give_up: float) -> LoopRun:
    model = SPEC.registered_model_name
    result = await asyncio.to_thread(
        bootstrap_model, SPEC, tracking_uri=stack.mlflow.tracking_uri, force=True
    )
    await announce_promotion(result, stack.kafka)
    hours = load_replay_hours(SPEC, first_day=day_of_year("04-01"), last_day=day_of_year("06-30"))
    drift_store = await open_drift_store(stack.postgres, give_up_after_seconds=30)
    ledger = await open_retrain_ledger(stack.postgres, give_up_after_seconds=30)
    timeline = LoopTimeline()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}", timeout=30) as gateway,
        AirflowClient(stack.airflow, attempts=1) as airflow,
    ):
        watcher = LoopWatcher(model, stack.kafka, drift_store, ledger, airflow, gateway)
        await watcher.baseline()
        ready = asyncio.Event()
        watching = asyncio.create_task(watcher.run(ready))
        await asyncio.wait_for(ready.wait(), timeout=60)
        while True:  # the gateway swaps to the fresh champion on its ModelPromoted
            current = (await gateway.get("/models/current")).json().get("version")
            if current == result.model.version:
                break
            await asyncio.sleep(0.5)
        replayer = Replayer(
            gateway, hours, replay_id=new_replay_id(), hours_per_second=hours_per_second
        )
        replaying = asyncio.create_task(replayer.run())
        deadline = time.monotonic() + give_up
        try:
            while timeline.loop_seconds() is None and time.monotonic() < deadline:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=1.0)
                except TimeoutError:
                    continue
                timeline.observe(item)
        finally:
            replaying.cancel()
            watching.cancel()
            await asyncio.gather(replaying, watching, return_exceptions=True)
            await drift_store.close()
            await ledger.close()
    promoted = timeline.promoted.model_version if timeline.promoted else None
    return LoopRun(timeline.loop_seconds(), timeline.stages(), promoted)


async def airflow_overhead(stack: StackSettings) -> float:
    """Trigger -> finished of the one-task platform_healthcheck DAG, seconds."""
    async with AirflowClient(stack.airflow) as client:
        run_id = f"bench-loop-{uuid.uuid4().hex[:10]}"
        started = time.perf_counter()
        await client.trigger_dag_run("platform_healthcheck", run_id, {"bench": True})
        while True:
            if (await client.get_dag_run("platform_healthcheck", run_id)).finished:
                return time.perf_counter() - started
            await asyncio.sleep(0.25)


async def main(runs: int, hours_per_second: float, give_up: float, pause: float) -> None:
    stack = load_settings(StackSettings)
    loops: list[LoopRun] = []
    for index in range(runs):
        if index:
            print(f"waiting {pause:.0f} s for the retrain-trigger's cooldown")
            await asyncio.sleep(pause)
        loop = await one_loop(stack, hours_per_second, give_up)
        loops.append(loop)
        print(f"run {index + 1}:")
        for stage, seconds in loop.stages:
            print(f"  {stage:<34} {seconds:7.1f} s")
        if loop.loop_seconds is None:
            print(f"  the loop did not close within {give_up:.0f} s")
    reference = await airflow_overhead(stack)
    closed = [loop.loop_seconds for loop in loops if loop.loop_seconds is not None]
    print()
    if closed:
        median = statistics.median(closed)
        print(
            f"first drifted window logged -> new champion served: median {median:.1f} s over "
            f"{len(closed)}/{runs} runs; target {TARGET_SECONDS:.0f} s -> "
            f"{median / TARGET_SECONDS:.2f}x of the target "
            f"({'met' if median <= TARGET_SECONDS else 'MISSED'})"
        )
        print(
            f"reference, same run: a one-task Airflow DAG takes {reference:.1f} s from trigger "
            f"to finish; the loop is {median / reference:.1f}x that"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"closed_loop-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_bytes(
        orjson.dumps(
            {
                "runs": [
                    {
                        "loop_seconds": loop.loop_seconds,
                        "stages": loop.stages,
                        "new_version": loop.new_version,
                    }
                    for loop in loops
                ],
                "airflow_one_task_dag_seconds": reference,
                "target_seconds": TARGET_SECONDS,
                "hours_per_second": hours_per_second,
                "load_average": os.getloadavg(),
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"results: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--hours-per-second", type=float, default=40.0)
    parser.add_argument("--give-up", type=float, default=420.0, help="seconds per run")
    parser.add_argument("--pause", type=float, default=130.0, help="seconds between runs")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.hours_per_second, args.give_up, args.pause))
