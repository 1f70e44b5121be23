"""Storage benchmark (issue 18), on the dev stack's Postgres and S3 server, in a schema and
key prefix of its own.

Long windows (default mode):

1. Writes ``--rows`` predictions of the bikeshare declaration (11 features, values resampled
   from the bundled Bike Sharing data) as the feature-logger lays them out: one committed file
   per flush and model-hour (``--flushes-per-hour`` files an hour), half of the rows labelled
   (label files).
2. Compacts them (``driftloop.storage.compaction``; skipped with ``--no-compaction``) and
   prints bytes per row and files per model-hour (targets: at most 60 bytes a row, at most 2
   files per model-hour).
3. Runs the drift check over the whole span, in interleaved rounds, each path in a fresh
   process so its peak memory (max RSS) is its own: ``duckdb`` (the sketch and a sample built
   in DuckDB, ``sketch_duckdb_window``) and ``pandas`` (every row loaded, then sketched in
   Python: the reference), both judged by ``judge_window``. Prints best seconds and peak MiB
   of each, whether both verdicts agree, and the ratios (targets: pandas / duckdb >= 5x in
   time, duckdb / pandas <= 0.5x in memory).

``--sustained``: simulated days at a fixed rate through the feature-logger's write path, the
drift monitor and storage maintenance, with the declaration's hot retention set to
``--hot-days``; prints per day the Postgres size (flat once retention applies) and the
reports' storage against the Parquet of the same rows (target: at most 10 %).

    make up
    uv run python bench/storage.py --rows 10000000 --hours 24 --flushes-per-hour 1 --no-compaction
    uv run python bench/storage.py --sustained --days 8 --rows-per-day 50000 --hot-days 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from aiokafka import TopicPartition

from driftloop.drift.baseline import DriftBaseline
from driftloop.drift.monitor import DriftMonitor, MonitorOptions
from driftloop.drift.reports import ReportDocuments, ReportKeys, put_report
from driftloop.drift.store import DriftStore
from driftloop.events.consumer_loop import Delivery
from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings
from driftloop.storage.compaction import compact
from driftloop.storage.database import open_migrated_pool
from driftloop.storage.featurestore import (
    BASE_SCHEMA,
    FeatureStore,
    PartitionKey,
    feature_column,
    parquet_file,
)
from driftloop.storage.hot_store import hot_retention
from driftloop.storage.label_files import LABEL_SCHEMA, label_file_key
from driftloop.storage.maintenance import (
    ModelRetention,
    ParquetTarget,
    StoragePolicy,
    maintain_storage,
)
from driftloop.storage.objectstore import s3_client
from driftloop.storage.prediction_log import open_prediction_log
from driftloop.training.trainer import read_dataset
from schemas.events import DriftDetected, GroundTruth, PredictionEvent
from schemas.features import FeatureSpec, load_feature_spec

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

START = datetime(2026, 11, 1, tzinfo=UTC)
REFERENCE: Final = ("2011-01-01", "2011-04-01")
"""The champion's reference: the seed data's January to March."""
RESULTS = Path(__file__).parent / "results"

# One drift check in a process of its own: prints seconds, the process's peak RSS and the
# verdict as JSON. Both paths calibrate the same reference first (outside the timing) and judge
# with the same code (``judge_window``: the verdict from the window's sketch, Evidently's
# report and the quality on a sample of REPORT_SAMPLE_ROWS rows); they differ in how the window
# is read and sketched: ``duckdb`` builds the sketch and the sample inside DuckDB
# (``sketch_duckdb_window``), ``pandas`` loads every row (``load_parquet_window``, labels looked
# up in Postgres) and sketches the frame in Python (``sketch_frame``).
READER = """
import asyncio, json, resource, sys, time
from datetime import datetime
import numpy as np
from driftloop.drift.assessment import WindowBounds
from driftloop.drift.baseline import calibrate, prepare
from driftloop.drift.monitor import judge_window
from driftloop.drift.parquet_windows import (
    load_parquet_window, sketch_duckdb_window, sketch_frame)
from driftloop.drift.policy import DriftPolicy
from driftloop.storage import lake
from driftloop.storage.database import create_pool
from driftloop.storage.objectstore import s3_client
from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings
from driftloop.training.trainer import read_dataset
from schemas.features import load_feature_spec

engine, schema, start, end, sample_rows = sys.argv[1:6]
start, end = datetime.fromisoformat(start), datetime.fromisoformat(end)
sample_rows = int(sample_rows)

async def main():
    spec = load_feature_spec("bikeshare")
    policy = DriftPolicy()
    reference = read_dataset(spec, since="2011-01-01", until="2011-04-01")
    reference["prediction"] = np.random.default_rng(1).gamma(2.0, 60.0, len(reference))
    prepared = prepare(calibrate(spec, reference, policy), reference)
    layout = prepared.baseline.layout
    objects = load_settings(ObjectStoreSettings)
    pool = await create_pool(load_settings(PostgresSettings), schema=schema)
    async with s3_client(objects) as s3:
        began = time.perf_counter()
        if engine == "duckdb":
            window = await sketch_duckdb_window(
                pool, lake.s3_filesystem(objects), objects.data_bucket, spec, layout,
                "bikeshare", 1, start=start, end=end, sample_rows=sample_rows)
        else:
            frame = await load_parquet_window(pool, s3, objects.data_bucket, spec, "bikeshare", 1,
                                              start=start, end=end)
            window = sketch_frame(layout, frame, sample_rows=sample_rows)
            del frame
        read = time.perf_counter() - began
        assessment, documents, _ = judge_window(
            spec, reference, prepared, window.sketch, window.sample, policy,
            model_name="bikeshare", model_version=1, window=WindowBounds(start=start, end=end),
            clean_html_share=1.0)
        seconds = time.perf_counter() - began
    await pool.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "seconds": seconds, "read_and_sketch_seconds": read, "peak_mib": peak,
        "rows": window.sketch.rows, "sample_rows": len(window.sample),
        "labelled_in_sample": int(window.sample["bikers"].notna().sum()),
        "drift_share": assessment.drift_share, "drifted": assessment.drifted,
        "scores": {f.name: f.score for f in (*assessment.features, assessment.prediction) if f},
    }))

asyncio.run(main())
"""


_HEX: Final = np.array([f"{i:02x}" for i in range(256)], dtype="S2")


def random_uuids(rng: np.random.Generator, count: int) -> pa.Array:
    """``count`` random 32-hex-digit ids (the entropy of the logger's uuid4 event ids)."""
    pairs = _HEX[rng.integers(0, 256, (count, 16), dtype=np.uint8)]
    return pa.array(pairs.view("S32").ravel()).cast(pa.string())


def feature_columns(
    seed: dict[str, np.ndarray], rng: np.random.Generator, count: int
) -> dict[str, pa.Array]:
    """Feature columns resampled from the seed data, so types and cardinalities are real."""
    picked = rng.integers(0, len(next(iter(seed.values()))), count)
    return {name: pa.array(values[picked]) for name, values in seed.items()}


async def write_layout(
    schema: str, prefix: str, rows: int, hours: int, flushes: int
) -> tuple[int, int]:
    """Flush files and label files of ``rows`` predictions over ``hours``; (files, bytes)."""
    spec = load_feature_spec("bikeshare")
    objects = load_settings(ObjectStoreSettings)
    pool = await open_migrated_pool(load_settings(PostgresSettings), schema)
    rng = np.random.default_rng(18)
    per_file = rows // (hours * flushes)
    total_bytes = files = 0
    data = read_dataset(spec)
    seed = {
        feature_column(f.name): data[f.name].to_numpy(np.float64 if f.dtype == "float" else None)
        for f in spec.features
    }
    labels: dict[object, list[pa.Table]] = {}
    async with s3_client(objects) as s3:
        offset = 0
        for hour in range(hours):
            base = START + timedelta(hours=hour)
            for flush in range(flushes):
                numbers = pa.array(np.arange(offset, offset + per_file))
                ids = pc.binary_join_element_wise(f"{schema}-", pc.cast(numbers, pa.string()), "")
                seconds = rng.integers(0, 3600, per_file) * 1_000_000
                moments = pa.array(
                    np.datetime64(base.replace(tzinfo=None), "us") + seconds.astype("m8[us]"),
                    type=pa.timestamp("us", tz="UTC"),
                )
                columns: dict[str, object] = {
                    "request_id": ids,
                    "event_id": random_uuids(rng, per_file),
                    "predicted_at": moments,
                    "model_name": pa.repeat("bikeshare", per_file),
                    "model_version": np.ones(per_file, dtype=np.int32),
                    "run_id": pa.repeat("bench", per_file),
                    "prediction": rng.gamma(2.0, 60.0, per_file),
                    "latency_ms": rng.gamma(2.0, 0.5, per_file),
                    "source": pa.repeat("http", per_file),
                    "kafka_partition": np.full(per_file, hour % 3, dtype=np.int32),
                    "kafka_offset": np.arange(offset, offset + per_file),
                }
                table = pa.table(columns, schema=BASE_SCHEMA)
                for name, values in feature_columns(seed, rng, per_file).items():
                    table = table.append_column(name, values)
                key = PartitionKey("bikeshare", base.date(), base.hour)
                object_key = key.object_key(prefix, f"flush-{hour:04d}-{flush:03d}")
                document = orjson.dumps(
                    {f"predictions:{hour % 3}": [offset, offset + per_file - 1]}
                )
                body = parquet_file(table, document)
                await s3.put_object(Bucket=objects.data_bucket, Key=object_key, Body=body)
                await pool.execute(
                    "INSERT INTO feature_files (object_key, flush_id, model_name, partition_date, "
                    "partition_hour, row_count, offsets) "
                    "VALUES ($1, $2, 'bikeshare', $3, $4, $5, $6)",
                    object_key,
                    object_key,
                    key.day,
                    key.hour,
                    per_file,
                    document.decode(),
                )
                files += 1
                total_bytes += len(body)
                half = np.arange(0, per_file, 2)
                labels.setdefault(base.date(), []).append(
                    pa.table(
                        {
                            "request_id": ids.take(half),
                            "predicted_at": moments.take(half),
                            "model_version": np.ones(len(half), dtype=np.int32),
                            "label": rng.gamma(2.0, 60.0, len(half)),
                            "observed_at": moments.take(half),
                        },
                        schema=LABEL_SCHEMA,
                    )
                )
                offset += per_file
        for moment, parts in labels.items():
            sink = io.BytesIO()
            day_table = pa.concat_tables(parts)
            pq.write_table(day_table, sink, compression="zstd")
            label_key = label_file_key(f"{prefix}labels/", "bikeshare", moment)  # type: ignore[arg-type]
            await s3.put_object(Bucket=objects.data_bucket, Key=label_key, Body=sink.getvalue())
            await pool.execute(
                "INSERT INTO label_files (model_name, day, object_key, row_count, watermark) "
                "VALUES ('bikeshare', $1, $2, $3, now())",
                moment,
                label_key,
                day_table.num_rows,
            )
    await pool.close()
    return files, total_bytes


async def compact_layout(schema: str) -> tuple[float, int, int, int]:
    """Compaction of every hour: (seconds, files after, bytes after, max files per hour)."""
    objects = load_settings(ObjectStoreSettings)
    pool = await open_migrated_pool(load_settings(PostgresSettings), schema)
    async with s3_client(objects) as s3:
        began = time.perf_counter()
        while (
            await compact(pool, s3, objects.data_bucket, settle=timedelta(0), max_hours=1000)
        ).hours:
            pass
        seconds = time.perf_counter() - began
        keys = [
            row["object_key"] for row in await pool.fetch("SELECT object_key FROM feature_files")
        ]
        size = 0
        for key in keys:
            size += (await s3.head_object(Bucket=objects.data_bucket, Key=key))["ContentLength"]
    most = await pool.fetchval(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM feature_files "
        "GROUP BY model_name, partition_date, partition_hour) per_hour"
    )
    await pool.close()
    return seconds, len(keys), size, int(most)


def read_once(
    engine: str, schema: str, start: datetime, end: datetime, sample_rows: int
) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            READER,
            engine,
            schema,
            start.isoformat(),
            end.isoformat(),
            str(sample_rows),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def drop(schema: str, prefix: str) -> None:
    """Drop the bench's schema and delete its objects."""
    pool = await open_migrated_pool(load_settings(PostgresSettings), schema)
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()
    objects = load_settings(ObjectStoreSettings)
    async with s3_client(objects) as s3:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=objects.data_bucket, Prefix=prefix
        )
        async for page in pages:
            for item in page.get("Contents", []):
                await s3.delete_object(Bucket=objects.data_bucket, Key=item["Key"])


def long_window(arguments: argparse.Namespace, schema: str) -> dict[str, object]:
    """The drift check over the whole span, both paths, interleaved rounds; prints figures."""
    start, end = START, START + timedelta(hours=arguments.hours)
    runs: dict[str, list[dict[str, Any]]] = {"duckdb": [], "pandas": []}
    for _ in range(arguments.rounds):
        for engine in runs:
            runs[engine].append(read_once(engine, schema, start, end, arguments.sample_rows))
            print(f"  {engine}: {json.dumps(runs[engine][-1])}", flush=True)
    best = {engine: min(r["seconds"] for r in results) for engine, results in runs.items()}
    peak = {engine: min(r["peak_mib"] for r in results) for engine, results in runs.items()}
    for engine in runs:
        first = runs[engine][0]
        print(
            f"{engine:7s} drift check over {first['rows']:,} rows (sample {first['sample_rows']:,}"
            f", {first['labelled_in_sample']:,} labelled): best {best[engine]:.2f}s, "
            f"peak {peak[engine]:.0f} MiB, drift share {first['drift_share']:.2f}"
        )
    same = all(
        run["rows"] == runs["pandas"][0]["rows"]
        and run["drift_share"] == runs["pandas"][0]["drift_share"]
        and all(
            abs(score - runs["pandas"][0]["scores"][name]) <= 1e-9
            for name, score in run["scores"].items()
        )
        for results in runs.values()
        for run in results
    )
    print(
        f"pandas / duckdb time: {best['pandas'] / best['duckdb']:.2f}x (target >= 5x); "
        f"duckdb / pandas peak memory: {peak['duckdb'] / peak['pandas']:.2f}x "
        f"(target <= 0.5x); same verdict and scores (1e-9): {same}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    return {"runs": runs, "same_verdict": same, "load_average": os.getloadavg()}


# --- sustained run over simulated days: Postgres under retention, reports against Parquet ---


def declaration(hot: timedelta) -> FeatureSpec:
    """The bikeshare declaration with the bench's hot retention (``retention.hot``), the way an
    operator declares one; its other retention (reports, HTML budget, Parquet) as declared."""
    document = load_feature_spec("bikeshare").model_dump(mode="json")
    document["retention"]["hot"] = f"P{hot.days}D"
    return FeatureSpec.model_validate(document)


class TopicStart:
    """The consumer ``FeatureStore.restore`` asks on assignment: a fresh group on a topic that
    starts at offset 0 (the bench's deliveries are numbered from there)."""

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        return None


@dataclass(slots=True)
class BenchChampion:
    """The monitor's ``ChampionSource`` for one version served from memory (no MLflow): the
    declaration, and the seed data's Jan-Mar as its reference; the monitor calibrates it."""

    spec: FeatureSpec
    reference_frame: pd.DataFrame

    def champion_version(self, model_name: str) -> int | None:
        return 1

    def newest_version(self, model_name: str) -> int | None:
        return 1

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        return self.reference_frame

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        return self.spec

    def baseline(self, model_name: str, version: int) -> DriftBaseline | None:
        return None


async def postgres_bytes(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    """Bytes of the hot tables' partitions, of every table of the schema, of the drift
    sketches (slices of windows not judged yet), and the partitions."""
    row = await pool.fetchrow(
        """
        SELECT coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE i.inhrelid IS NOT NULL),
                        0) AS hot,
               coalesce(sum(pg_total_relation_size(c.oid))
                        FILTER (WHERE c.relname = 'drift_sketches'), 0) AS sketches,
               coalesce(sum(pg_total_relation_size(c.oid)), 0) AS schema,
               count(i.inhrelid) AS partitions
        FROM pg_class c
        LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
          AND i.inhparent IN ('prediction_log'::regclass, 'labels'::regclass)
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
        """
    )
    assert row is not None
    return int(row["hot"]), int(row["schema"]), int(row["sketches"]), int(row["partitions"])


async def object_bytes(s3: S3Client, bucket: str, prefix: str) -> dict[str, int]:
    """Bytes under ``prefix`` by kind: feature files, label files, report JSON, report HTML."""
    sizes = {"features": 0, "labels": 0, "report_json": 0, "report_html": 0}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    async for page in pages:
        for item in page.get("Contents", []):
            key, size = item["Key"], item["Size"]
            if "/drift-reports/" in key:
                sizes["report_html" if key.endswith(".html.gz") else "report_json"] += size
            elif "/labels/" in key:
                sizes["labels"] += size
            else:
                sizes["features"] += size
    return sizes


async def committed_parquet_bytes(pool: asyncpg.Pool, s3: S3Client, bucket: str) -> int:
    """Bytes of the files the manifests list (replaced files awaiting deletion left out)."""
    keys = [r["object_key"] for r in await pool.fetch("SELECT object_key FROM feature_files")]
    keys += [r["object_key"] for r in await pool.fetch("SELECT object_key FROM label_files")]
    total = 0
    for key in keys:
        total += (await s3.head_object(Bucket=bucket, Key=key))["ContentLength"]
    return total


def day_of_events(
    spec: FeatureSpec,
    seed: pd.DataFrame,
    rng: np.random.Generator,
    day_start: datetime,
    rows: int,
    offset: int,
) -> tuple[list[Delivery[PredictionEvent]], list[GroundTruth]]:
    """A simulated day at a fixed rate (``rows`` evenly spaced), features and labels resampled
    from the seed data; every other row labelled an hour after its prediction."""
    records = seed.sample(n=rows, replace=True, random_state=int(rng.integers(2**31)))
    features: list[dict[str, Any]] = records[list(spec.feature_names)].to_dict("records")  # type: ignore[assignment]
    truth = records[spec.target.name].to_numpy(np.float64)
    predictions = rng.gamma(2.0, 60.0, rows)
    step = timedelta(days=1) / rows
    deliveries, labels = [], []
    for index, row in enumerate(features):
        moment = day_start + index * step
        event = PredictionEvent(
            request_id=f"bench-{offset + index}",
            model_name="bikeshare",
            model_version=1,
            run_id="0" * 32,
            features=row,
            prediction=float(predictions[index]),
            latency_ms=1.0,
            source="http",
            occurred_at=moment,
        )
        deliveries.append(Delivery(event, "predictions", 0, offset + index))
        if index % 2 == 0:
            observed = moment + timedelta(hours=1)
            labels.append(
                GroundTruth(
                    request_id=event.request_id,
                    label=float(truth[index]),
                    observed_at=observed,
                    occurred_at=observed,
                )
            )
    return deliveries, labels


async def sustained(arguments: argparse.Namespace, schema: str, prefix: str) -> dict[str, object]:
    """Simulated days through the real write path, monitor and maintenance; prints per day."""
    hot = timedelta(days=arguments.hot_days)
    spec = declaration(hot)
    window = timedelta(hours=arguments.window_hours)
    # Stable traffic: the reference's own months, so most windows are clean (JSON only, a
    # share of HTML); drifting: the whole year against Jan-Mar, every window keeps its HTML.
    if arguments.traffic == "drifting":
        seed = read_dataset(spec)
    else:
        seed = read_dataset(spec, since=REFERENCE[0], until=REFERENCE[1])
    reference = read_dataset(spec, since=REFERENCE[0], until=REFERENCE[1])
    reference["prediction"] = np.random.default_rng(1).gamma(2.0, 60.0, len(reference))
    objects = load_settings(ObjectStoreSettings)
    bucket = objects.data_bucket
    # The logger's own pool: its sessions have the staging tables the writes copy into.
    prediction_log = await open_prediction_log(load_settings(PostgresSettings), schema, max_size=3)
    pool = prediction_log.pool
    rng = np.random.default_rng(18)
    simulated = START
    policy = StoragePolicy(
        hot_retention=hot_retention([spec]),
        ahead_days=arguments.ahead_days,
        compaction_settle=timedelta(minutes=10),
        labels_prefix=f"{prefix}labels/",
        # The logger's writes here are done before maintenance runs, and simulated hours pass
        # in seconds: no commit can still be in flight behind the label files' watermark.
        label_commit_margin=timedelta(0),
        models=(ModelRetention.of(spec),),
        report_prefix=f"{prefix}drift-reports/",
    )
    days: list[dict[str, object]] = []
    async with s3_client(objects) as s3:
        store = FeatureStore(
            pool,
            s3,
            bucket,
            f"{prefix}features/",
            flush_interval_seconds=0.0,
            max_buffered_rows=10**7,
            specs=[spec],
        )
        await store.restore(TopicStart(), [TopicPartition("predictions", 0)])

        async def store_report(json_key: str, html_key: str, documents: ReportDocuments) -> str:
            return await put_report(s3, bucket, ReportKeys(json=json_key, html=html_key), documents)

        async def publish(event: DriftDetected) -> None:
            return None

        monitor = DriftMonitor(
            store=DriftStore(pool),
            champions=BenchChampion(spec, reference),
            publish=publish,
            store_report=store_report,
            models=["bikeshare"],
            options=MonitorOptions(
                window=window,
                settle=timedelta(seconds=10),
                report_prefix=f"{prefix}drift-reports/",
            ),
            clock=lambda: simulated,
        )
        await monitor.check("bikeshare")  # calibrates and publishes the layout the logger reads
        windows = 0
        offset = 0
        print(
            f"sustained: {arguments.days} simulated days of {arguments.rows_per_day:,} rows "
            f"({arguments.rows_per_day / 86400:.2f}/s), hot retention {hot.days} days "
            f"(declared), windows of {window}, maintenance every simulated hour",
            flush=True,
        )
        for day in range(arguments.days):
            day_start = START + timedelta(days=day)
            deliveries, labels = day_of_events(
                spec, seed, rng, day_start, arguments.rows_per_day, offset
            )
            offset += len(deliveries)
            per_hour = math.ceil(len(deliveries) / 24)
            for hour in range(24):
                batch = deliveries[hour * per_hour : (hour + 1) * per_hour]
                # Labels arrive an hour after their prediction: this hour's are the last hour's.
                due = [
                    label
                    for label in labels
                    if day_start + timedelta(hours=hour)
                    <= label.observed_at
                    < day_start + timedelta(hours=hour + 1)
                ]
                for first in range(0, max(len(batch), 1), arguments.batch_rows):
                    chunk = batch[first : first + arguments.batch_rows]
                    counts = await prediction_log.write(chunk, due if first == 0 else [])
                    store.add(chunk, counts.first_records)
                await store.flush()
                simulated = day_start + timedelta(hours=hour + 1, seconds=30)
                while await monitor.check("bikeshare") is not None:
                    windows += 1
                await maintain_storage(pool, ParquetTarget(s3, bucket), policy, now=simulated)
            hot_bytes, schema_bytes, sketch_bytes, partitions = await postgres_bytes(pool)
            hot_rows = await pool.fetchval("SELECT count(*) FROM prediction_log")
            sizes = await object_bytes(s3, bucket, prefix)
            parquet = await committed_parquet_bytes(pool, s3, bucket)
            reports = sizes["report_json"] + sizes["report_html"]
            figures = {
                "day": day + 1,
                "rows_logged": offset,
                "hot_rows": hot_rows,
                "postgres_hot_bytes": hot_bytes,
                "postgres_schema_bytes": schema_bytes,
                "drift_sketches_bytes": sketch_bytes,
                "partitions": partitions,
                "parquet_bytes": parquet,
                "report_json_bytes": sizes["report_json"],
                "report_html_bytes": sizes["report_html"],
                "windows": windows,
            }
            days.append(figures)
            print(
                f"day {day + 1}: {offset:,} rows logged, {hot_rows:,} in Postgres "
                f"({partitions} partitions): hot tables {hot_bytes / 2**20:.1f} MiB, schema "
                f"{schema_bytes / 2**20:.1f} MiB (drift_sketches {sketch_bytes / 2**20:.1f}); "
                f"Parquet {parquet / 2**20:.1f} MiB "
                f"({parquet / offset:.1f} bytes/row); reports {reports / 2**20:.2f} MiB "
                f"({windows} windows: JSON {sizes['report_json'] / 2**10:.0f} KiB, HTML.gz "
                f"{sizes['report_html'] / 2**10:.0f} KiB) = {reports / parquet:.1%} of Parquet",
                flush=True,
            )
    await pool.close()
    retained = [d["postgres_hot_bytes"] for d in days[arguments.hot_days + 1 :]]
    if retained:
        low, high = min(retained), max(retained)  # type: ignore[type-var]
        print(
            f"Postgres hot tables once retention applies (days {arguments.hot_days + 2}-"
            f"{arguments.days}): {low / 2**20:.1f} to {high / 2**20:.1f} MiB "  # type: ignore[operator]
            f"(spread {(high - low) / high:.1%})"  # type: ignore[operator]
        )
    return {"sustained": days}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--flushes-per-hour", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=10_000,
        help="rows of the report's sample (as DRIFT_MONITOR_REPORT_SAMPLE_ROWS)",
    )
    parser.add_argument(
        "--no-compaction",
        action="store_true",
        help="skip the compaction step (with --flushes-per-hour 1 the layout is already one "
        "file per model-hour)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the schema and objects")
    parser.add_argument(
        "--sustained",
        action="store_true",
        help="instead: simulated days through the logger's write path, the drift monitor and "
        "storage maintenance; Postgres size and reports against Parquet per day",
    )
    parser.add_argument("--days", type=int, default=8, help="--sustained: simulated days")
    parser.add_argument("--rows-per-day", type=int, default=200_000)
    parser.add_argument("--hot-days", type=int, default=2, help="declared retention.hot")
    parser.add_argument("--ahead-days", type=int, default=1, help="partitions made ahead")
    parser.add_argument("--window-hours", type=int, default=6, help="drift window")
    parser.add_argument("--batch-rows", type=int, default=5_000, help="rows per logger write")
    parser.add_argument("--traffic", choices=["stable", "drifting"], default="stable")
    arguments = parser.parse_args()
    schema = f"bench_storage_{uuid.uuid4().hex[:8]}"
    prefix = f"bench/{schema}/"
    figures: dict[str, object] = {
        "rows": arguments.rows,
        "hours": arguments.hours,
        "started": datetime.now(UTC).isoformat(),
        "load_average_at_start": os.getloadavg(),
    }
    if arguments.sustained:
        try:
            figures |= asyncio.run(sustained(arguments, schema, prefix))
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"storage-sustained-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
            out.write_text(json.dumps(figures, indent=2, default=str))
            print(f"figures in {out}")
        finally:
            if not arguments.keep:
                asyncio.run(drop(schema, prefix))
        return
    try:
        began = time.perf_counter()
        files, written = asyncio.run(
            write_layout(
                schema,
                f"{prefix}features/",
                arguments.rows,
                arguments.hours,
                arguments.flushes_per_hour,
            )
        )
        rows = arguments.rows // (arguments.hours * arguments.flushes_per_hour) * files
        print(
            f"wrote {rows:,} rows in {files} flush files in {time.perf_counter() - began:.0f}s: "
            f"{written / rows:.1f} bytes/row, {arguments.flushes_per_hour} files per model-hour",
            flush=True,
        )
        figures |= {"bytes_per_row_flushed": written / rows}
        if not arguments.no_compaction:
            seconds, after, size, most = asyncio.run(compact_layout(schema))
            print(
                f"compacted in {seconds:.1f}s: {after} files, {size / rows:.1f} bytes/row "
                f"(target <= 60), at most {most} files per model-hour (target <= 2)",
                flush=True,
            )
            figures |= {
                "bytes_per_row_compacted": size / rows,
                "files_per_model_hour": most,
                "compaction_seconds": seconds,
            }
        figures |= long_window(arguments, schema)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"storage-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
        out.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures in {out}")
    finally:
        if not arguments.keep:
            asyncio.run(drop(schema, prefix))


if __name__ == "__main__":
    main()
