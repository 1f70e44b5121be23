"""Storage benchmark (issue 18): the Parquet layout after compaction, and a long window through
DuckDB against today's pandas path, on the dev stack's Postgres and S3 server.

1. Writes ``--rows`` predictions of the bikeshare declaration (11 features, values resampled
   from the bundled Bike Sharing data) as the feature-logger does: one committed file per
   flush and model-hour (``--flushes-per-hour`` files an hour), in a schema and key prefix of
   their own, half of the rows labelled (label files).
2. Compacts them (``driftloop.storage.compaction``) and prints bytes per row and files per
model-hour before and after (targets: at most 60 bytes a row, at most 2 files per model-hour).
3. Reads the whole span as one window, in interleaved rounds, each path in a fresh process
   so its peak memory (max RSS) is its own: ``duckdb`` (``load_duckdb_window``) and ``pandas``
   (``load_parquet_window``, the reference). Prints best seconds and peak MiB of each and the
   ratios (targets: pandas / duckdb >= 5x in time, duckdb / pandas <= 0.5x in memory).

Not measured here (left out): Postgres size under retention over simulated days, and reports
against Parquet.

    make up
    uv run python bench/storage.py [--rows 2000000] [--hours 24] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings
from driftloop.storage.compaction import compact
from driftloop.storage.database import open_migrated_pool
from driftloop.storage.featurestore import BASE_SCHEMA, PartitionKey, feature_column, parquet_file
from driftloop.storage.label_files import LABEL_SCHEMA, label_file_key
from driftloop.storage.objectstore import s3_client
from driftloop.training.trainer import read_dataset
from schemas.features import load_feature_spec

START = datetime(2026, 11, 1, tzinfo=UTC)
RESULTS = Path(__file__).parent / "results"

# One path in a process of its own: prints seconds and the process's peak RSS as JSON.
READER = """
import asyncio, json, resource, sys, time
from datetime import datetime
from driftloop.storage import lake
from driftloop.storage.database import create_pool
from driftloop.drift.parquet_windows import load_duckdb_window, load_parquet_window
from driftloop.storage.objectstore import s3_client
from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings
from schemas.features import load_feature_spec

engine, schema, start, end = sys.argv[1:5]
start, end = datetime.fromisoformat(start), datetime.fromisoformat(end)

async def main():
    spec = load_feature_spec("bikeshare")
    objects = load_settings(ObjectStoreSettings)
    pool = await create_pool(load_settings(PostgresSettings), schema=schema)
    async with s3_client(objects) as s3:
        began = time.perf_counter()
        if engine == "duckdb":
            frame = await load_duckdb_window(pool, lake.s3_filesystem(objects), objects.data_bucket,
                                             spec, "bikeshare", 1, start=start, end=end)
        else:
            frame = await load_parquet_window(pool, s3, objects.data_bucket, spec, "bikeshare", 1,
                                              start=start, end=end)
        seconds = time.perf_counter() - began
    await pool.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "rows": len(frame),
                      "labelled": int(frame["bikers"].notna().sum())}))

asyncio.run(main())
"""


def synthetic_rows(rows: int, rng: np.random.Generator) -> dict[str, list[object]]:
    """Feature columns resampled from the seed data, so types and cardinalities are real."""
    spec = load_feature_spec("bikeshare")
    seed = read_dataset(spec)
    picked = seed.sample(n=rows, replace=True, random_state=int(rng.integers(2**31)))
    return {feature_column(name): picked[name].tolist() for name in spec.feature_names}


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
    features = synthetic_rows(per_file, rng)
    types = {
        feature_column(f.name): pa.float64() if f.dtype == "float" else None for f in spec.features
    }
    labels: dict[object, dict[str, list[object]]] = {}
    async with s3_client(objects) as s3:
        offset = 0
        for hour in range(hours):
            base = START + timedelta(hours=hour)
            day = labels.setdefault(base.date(), {name: [] for name in LABEL_SCHEMA.names})
            for flush in range(flushes):
                ids = [f"{schema}-{offset + i}" for i in range(per_file)]
                moments = [
                    base + timedelta(seconds=int(s)) for s in rng.integers(0, 3600, per_file)
                ]
                columns: dict[str, object] = {
                    "request_id": ids,
                    "event_id": [str(uuid.uuid4()) for _ in ids],
                    "predicted_at": moments,
                    "model_name": ["bikeshare"] * per_file,
                    "model_version": [1] * per_file,
                    "run_id": ["bench"] * per_file,
                    "prediction": rng.gamma(2.0, 60.0, per_file).tolist(),
                    "latency_ms": rng.gamma(2.0, 0.5, per_file).tolist(),
                    "source": ["http"] * per_file,
                    "kafka_partition": [hour % 3] * per_file,
                    "kafka_offset": list(range(offset, offset + per_file)),
                }
                table = pa.table(columns, schema=BASE_SCHEMA)
                for name, values in features.items():
                    table = table.append_column(name, pa.array(values, type=types[name]))
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
                half = slice(0, per_file, 2)
                day["request_id"] += ids[half]
                day["predicted_at"] += moments[half]
                day["model_version"] += [1] * len(ids[half])
                day["label"] += rng.gamma(2.0, 60.0, len(ids[half])).tolist()
                day["observed_at"] += moments[half]
                offset += per_file
        for moment, columns_of_day in labels.items():
            sink = io.BytesIO()
            pq.write_table(pa.table(columns_of_day, schema=LABEL_SCHEMA), sink, compression="zstd")
            label_key = label_file_key(f"{prefix}labels/", "bikeshare", moment)  # type: ignore[arg-type]
            await s3.put_object(Bucket=objects.data_bucket, Key=label_key, Body=sink.getvalue())
            await pool.execute(
                "INSERT INTO label_files (model_name, day, object_key, row_count, watermark) "
                "VALUES ('bikeshare', $1, $2, $3, now())",
                moment,
                label_key,
                len(columns_of_day["request_id"]),
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


def read_once(engine: str, schema: str, start: datetime, end: datetime) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", READER, engine, schema, start.isoformat(), end.isoformat()],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def drop(schema: str) -> None:
    pool = await open_migrated_pool(load_settings(PostgresSettings), schema)
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--flushes-per-hour", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the schema and objects")
    arguments = parser.parse_args()
    schema = f"bench_storage_{uuid.uuid4().hex[:8]}"
    prefix = f"bench/{schema}/features/"
    figures: dict[str, object] = {"rows": arguments.rows, "hours": arguments.hours}
    try:
        files, written = asyncio.run(
            write_layout(
                schema, prefix, arguments.rows, arguments.hours, arguments.flushes_per_hour
            )
        )
        rows = arguments.rows // (arguments.hours * arguments.flushes_per_hour) * files
        print(
            f"wrote {rows:,} rows in {files} flush files: {written / rows:.1f} bytes/row, "
            f"{arguments.flushes_per_hour} files per model-hour"
        )
        seconds, after, size, most = asyncio.run(compact_layout(schema))
        print(
            f"compacted in {seconds:.1f}s: {after} files, {size / rows:.1f} bytes/row "
            f"(target <= 60), at most {most} files per model-hour (target <= 2)"
        )
        figures |= {
            "bytes_per_row_flushed": written / rows,
            "bytes_per_row_compacted": size / rows,
            "files_per_model_hour": most,
            "compaction_seconds": seconds,
        }
        start, end = START, START + timedelta(hours=arguments.hours)
        runs: dict[str, list[dict[str, float]]] = {"duckdb": [], "pandas": []}
        for _ in range(arguments.rounds):
            for engine in runs:
                runs[engine].append(read_once(engine, schema, start, end))
        best = {engine: min(r["seconds"] for r in results) for engine, results in runs.items()}
        peak = {engine: min(r["peak_mib"] for r in results) for engine, results in runs.items()}
        for engine in runs:
            print(
                f"{engine:7s} window of {int(runs[engine][0]['rows']):,} rows "
                f"({int(runs[engine][0]['labelled']):,} labelled): best {best[engine]:.2f}s, "
                f"peak {peak[engine]:.0f} MiB"
            )
        print(
            f"pandas / duckdb time: {best['pandas'] / best['duckdb']:.2f}x (target >= 5x); "
            f"duckdb / pandas peak memory: {peak['duckdb'] / peak['pandas']:.2f}x "
            "(target <= 0.5x); "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        figures |= {"runs": runs, "load_average": os.getloadavg()[0]}
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"storage-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
        out.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures in {out}")
    finally:
        if not arguments.keep:
            asyncio.run(drop(schema))


if __name__ == "__main__":
    main()
