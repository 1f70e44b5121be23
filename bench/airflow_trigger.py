"""Airflow trigger latency: REST trigger -> DAG run started, and -> finished (p50 of N runs).

    uv run python bench/airflow_trigger.py [--runs 5] [--dag platform_healthcheck] [--poll 0.25]

Runs are triggered one after another with ``driftloop.orchestration.airflow.AirflowClient`` (the
retrain trigger's client), each with a fresh ``bench-…`` run id, and polled until they finish.
"started" and "finished" are Airflow's own ``start_date`` / ``end_date`` minus the wall-clock
time the trigger request was sent (same machine, same clock); "seen" columns are when a poll
first observed the state, which adds up to one poll interval. The default DAG is the one-task
``platform_healthcheck`` (the retrain DAG's own run time is its training, not the trigger's).
Reference (DESIGN.md, a machine like ours): trigger to a one-task DAG's success took 2-7 s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from driftloop.orchestration.airflow import AirflowClient
from driftloop.settings import AirflowApiSettings, load_settings

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_SUCCESS_SECONDS = (2.0, 7.0)


@dataclass(frozen=True, slots=True)
class Sample:
    run_id: str
    state: str
    request_seconds: float
    to_started: float
    to_finished: float
    queued_to_started: float
    seen_running: float
    seen_finished: float


async def measure_one(client: AirflowClient, dag_id: str, poll: float, give_up: float) -> Sample:
    run_id = f"bench-{uuid.uuid4().hex[:12]}"
    sent_at = datetime.now(UTC)
    started = time.perf_counter()
    await client.trigger_dag_run(dag_id, run_id, {"bench": True})
    request_seconds = time.perf_counter() - started
    seen_running = float("nan")
    while True:
        run = await client.get_dag_run(dag_id, run_id)
        elapsed = time.perf_counter() - started
        if run.start_date is not None and math.isnan(seen_running):
            seen_running = elapsed
        if run.finished:
            break
        if elapsed > give_up:
            raise TimeoutError(f"{dag_id}/{run_id} still {run.state} after {give_up:.0f}s")
        await asyncio.sleep(poll)
    assert run.start_date is not None
    assert run.end_date is not None
    return Sample(
        run_id=run_id,
        state=run.state,
        request_seconds=request_seconds,
        to_started=(run.start_date - sent_at).total_seconds(),
        to_finished=(run.end_date - sent_at).total_seconds(),
        queued_to_started=(
            (run.start_date - run.queued_at).total_seconds() if run.queued_at else float("nan")
        ),
        seen_running=seen_running,
        seen_finished=elapsed,
    )


async def bench(settings: AirflowApiSettings, dag_id: str, runs: int, poll: float) -> list[Sample]:
    samples = []
    async with AirflowClient(settings, timeout_seconds=30) as client:
        for index in range(runs):
            sample = await measure_one(client, dag_id, poll, give_up=300)
            samples.append(sample)
            print(
                f"run {index + 1}/{runs} {sample.run_id}: {sample.state}, "
                f"POST {sample.request_seconds * 1000:.0f} ms, started +{sample.to_started:.2f}s, "
                f"finished +{sample.to_finished:.2f}s"
            )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dag", default="platform_healthcheck")
    parser.add_argument("--poll", type=float, default=0.25, help="poll interval, seconds")
    args = parser.parse_args()
    settings = load_settings(AirflowApiSettings)
    load_before = os.getloadavg()
    samples = asyncio.run(bench(settings, args.dag, args.runs, args.poll))
    load_after = os.getloadavg()

    def p50(name: str) -> float:
        return float(statistics.median(getattr(sample, name) for sample in samples))

    rows = [
        ("POST dagRuns (client)", "request_seconds"),
        ("trigger -> started (Airflow start_date)", "to_started"),
        ("trigger -> finished (Airflow end_date)", "to_finished"),
        ("queued -> started (Airflow's own)", "queued_to_started"),
        ("trigger -> running seen by a poll", "seen_running"),
        ("trigger -> finished seen by a poll", "seen_finished"),
    ]
    print(f"\n{args.dag}, {len(samples)} runs, poll {args.poll}s")
    print(f"{'measure':42} {'p50':>8} {'min':>8} {'max':>8}")
    for label, name in rows:
        values = [getattr(sample, name) for sample in samples]
        print(f"{label:42} {p50(name):8.2f} {min(values):8.2f} {max(values):8.2f}")
    low, high = REFERENCE_SUCCESS_SECONDS
    finished = p50("to_finished")
    print(
        f"reference trigger -> success: {low:.0f}-{high:.0f} s (DESIGN.md); this run p50 "
        f"{finished:.2f} s = {finished / low:.2f}x the low end, {finished / high:.2f}x the high"
    )
    before = " ".join(f"{value:.2f}" for value in load_before)
    after = " ".join(f"{value:.2f}" for value in load_after)
    print(f"load average (1/5/15 min) before: {before}, after: {after}")
    if any(sample.state != "success" for sample in samples):
        print("warning: not every run succeeded", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = RESULTS / f"airflow-trigger-{stamp}.json"
    output.write_bytes(
        orjson.dumps(
            {
                "dag_id": args.dag,
                "poll_seconds": args.poll,
                "load_before": load_before,
                "load_after": load_after,
                "samples": [asdict(sample) for sample in samples],
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"results: {output.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
