"""One storage maintenance on the real Postgres and S3 server: labels reach Parquet before their
day leaves the hot store, a late label rewrites its day's file, a day whose newest labels are
not in Parquet yet is kept, and files and reports past their retention (or the HTML budget)
are deleted."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from driftloop.drift.reports import report_keys
from driftloop.events.consumer_loop import Delivery
from driftloop.settings import ObjectStoreSettings, PostgresSettings
from driftloop.storage.hot_store import existing_days
from driftloop.storage.label_files import label_file_key
from driftloop.storage.maintenance import (
    ModelRetention,
    ParquetTarget,
    StoragePolicy,
    maintain_storage,
)
from driftloop.storage.objectstore import s3_client
from driftloop.storage.prediction_log import PredictionLog, open_prediction_log
from schemas.events import GroundTruth, PredictionEvent
from tests.integration.test_compaction import ROWS_PER_FILE, Layout, put_flush_file

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 20, 15, 30, tzinfo=UTC)
DAYS = [date(2026, 3, day) for day in (10, 11, 18)]  # two days past a 7-day retention, one inside
PER_DAY = 30
HTML_BYTES = 20_000


def delivery(request_id: str, moment: datetime, offset: int) -> Delivery[PredictionEvent]:
    event = PredictionEvent(
        request_id=request_id,
        model_name="bikeshare",
        model_version=2,
        run_id=uuid.uuid4().hex,
        features={"temp": 0.4},
        prediction=1.0,
        latency_ms=1.0,
        source="batch",
        occurred_at=moment,
    )
    return Delivery(event, "predictions", 0, offset)


@pytest.fixture
async def prediction_log(
    unique: str, postgres_settings: PostgresSettings
) -> AsyncIterator[PredictionLog]:
    log = await open_prediction_log(postgres_settings, unique)
    try:
        yield log
    finally:
        if not os.environ.get("KEEP_TEST_SCHEMA"):
            await log.pool.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await log.close()


async def test_labels_reach_parquet_before_their_day_is_dropped(
    prediction_log: PredictionLog, object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    predictions: list[Delivery[PredictionEvent]] = []
    labels: list[GroundTruth] = []
    for day in DAYS:
        for index in range(PER_DAY):
            request_id = f"{day:%m%d}-{index}"
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(minutes=index)
            predictions.append(delivery(request_id, moment, len(predictions)))
            if index % 3:  # two labels in three
                labels.append(
                    GroundTruth(request_id=request_id, label=float(index), observed_at=NOW)
                )
    await prediction_log.write(predictions, [])
    await prediction_log.write([], labels)
    prefix = f"tests/{unique}/labels/"
    policy = StoragePolicy(
        hot_retention=timedelta(days=7),
        ahead_days=1,
        compaction_settle=timedelta(minutes=15),
        labels_prefix=prefix,
        # No other writer here: the files may cover everything logged before the read.
        label_commit_margin=timedelta(0),
    )
    async with s3_client(object_store_settings) as s3:
        parquet = ParquetTarget(s3, object_store_settings.data_bucket)

        async def label_file(day: date) -> dict[str, float]:
            response = await s3.get_object(
                Bucket=parquet.bucket, Key=label_file_key(prefix, "bikeshare", day)
            )
            table = pq.read_table(io.BytesIO(await response["Body"].read()))
            assert set(table.column("model_version").to_pylist()) == {2}
            ids = table.column("request_id").to_pylist()
            assert len(ids) == len(set(ids))
            return dict(zip(ids, table.column("label").to_pylist(), strict=True))

        report = await maintain_storage(prediction_log.pool, parquet, policy, now=NOW)

        expected = {
            day: {e.request_id: e.label for e in labels if e.request_id.startswith(f"{day:%m%d}")}
            for day in DAYS
        }
        assert sorted((file.day, file.rows) for file in report.label_files) == [
            (day, len(expected[day])) for day in DAYS
        ]
        for day in DAYS:
            assert await label_file(day) == expected[day]
        # The expired days went, after their labels reached Parquet; the day inside stays.
        assert sorted(report.partitions.dropped) == [
            "labels_p20260310",
            "labels_p20260311",
            "prediction_log_p20260310",
            "prediction_log_p20260311",
        ]
        async with prediction_log.pool.acquire() as connection:
            assert min((await existing_days(connection))["labels"]) == date(2026, 3, 18)

        # A label arriving later (or changing) rewrites its day's file whole, once.
        late = GroundTruth(request_id="0318-0", label=99.0, observed_at=NOW + timedelta(hours=1))
        assert (await prediction_log.write([], [late])).labels_written == 1
        again = await maintain_storage(prediction_log.pool, parquet, policy, now=NOW)
        assert [(file.day, file.rows) for file in again.label_files] == [
            (date(2026, 3, 18), len(expected[date(2026, 3, 18)]) + 1)
        ]
        assert (await label_file(date(2026, 3, 18)))["0318-0"] == 99.0
        quiet = await maintain_storage(prediction_log.pool, parquet, policy, now=NOW)
        assert quiet.label_files == ()


async def test_a_day_whose_newest_labels_are_not_in_parquet_is_kept(
    prediction_log: PredictionLog, object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    moment = datetime(2026, 3, 10, 8, tzinfo=UTC)
    await prediction_log.write([delivery("kept", moment, 0)], [])
    await prediction_log.write([], [GroundTruth(request_id="kept", label=1.0, observed_at=NOW)])
    # The default margin: a label logged moments ago may have companions still committing,
    # so its day is written but not yet trusted to be complete.
    policy = StoragePolicy(
        hot_retention=timedelta(days=7),
        ahead_days=0,
        compaction_settle=timedelta(minutes=15),
        labels_prefix=f"tests/{unique}/labels/",
    )
    async with s3_client(object_store_settings) as s3:
        parquet = ParquetTarget(s3, object_store_settings.data_bucket)
        report = await maintain_storage(prediction_log.pool, parquet, policy, now=NOW)
    assert [file.day for file in report.label_files] == [moment.date()]
    assert report.partitions.dropped == ()
    async with prediction_log.pool.acquire() as connection:
        assert moment.date() in (await existing_days(connection))["labels"]
        assert await connection.fetchval("SELECT label FROM labels") == 1.0


async def test_lifecycle_expires_parquet_and_reports_past_their_retention(
    prediction_log: PredictionLog, object_store_settings: ObjectStoreSettings, unique: str
) -> None:
    bucket = object_store_settings.data_bucket
    features = f"tests/{unique}/features/"
    label_prefix = f"tests/{unique}/labels/"
    report_prefix = f"tests/{unique}/drift-reports/"
    policy = StoragePolicy(
        hot_retention=timedelta(days=7),
        ahead_days=0,
        compaction_settle=timedelta(minutes=15),
        labels_prefix=label_prefix,
        models=(
            ModelRetention(
                "bikeshare",
                parquet=timedelta(days=30),
                reports=timedelta(days=10),
                report_html_bytes=3 * HTML_BYTES,
            ),
        ),
        report_prefix=report_prefix,
    )
    old_day, kept_day = (NOW - timedelta(days=31)).date(), (NOW - timedelta(days=29)).date()
    async with s3_client(object_store_settings) as s3:
        layout = Layout(unique, features, prediction_log.pool, s3, bucket, set())
        for flush, day in enumerate((old_day, kept_day)):
            moment = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
            await put_flush_file(layout, moment, flush, flush * ROWS_PER_FILE)
            key = label_file_key(label_prefix, "bikeshare", day)
            await s3.put_object(Bucket=bucket, Key=key, Body=b"labels")
            await prediction_log.pool.execute(
                "INSERT INTO label_files (model_name, day, object_key, row_count, watermark) "
                "VALUES ('bikeshare', $1, $2, 1, now())",
                day,
                key,
            )
        # Reports: two past the 10-day retention, six inside it, each with an HTML file of
        # HTML_BYTES (incompressible): the budget keeps the three newest HTML files.
        ends = [NOW - timedelta(days=days, hours=1) for days in (12, 11, 6, 5, 4, 3, 2, 1)]
        for end in ends:
            keys = report_keys("bikeshare", 1, end, prefix=report_prefix)
            await s3.put_object(Bucket=bucket, Key=keys.json, Body=b"{}")
            await s3.put_object(Bucket=bucket, Key=keys.html, Body=os.urandom(HTML_BYTES))

        report = await maintain_storage(
            prediction_log.pool, ParquetTarget(s3, bucket), policy, now=NOW
        )

        assert report.expired_files == 2  # the old day's feature file and label file
        assert report.reports[0].expired == 2
        assert report.reports[0].over_budget == 3
        listing: set[str] = set()
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=f"tests/{unique}/"):
            listing.update(item["Key"] for item in page.get("Contents", []))
    manifest = {
        row["object_key"]
        for row in await prediction_log.pool.fetch("SELECT object_key FROM feature_files")
    }
    assert {key.split("/date=")[1][:10] for key in manifest} == {kept_day.isoformat()}
    assert {key for key in listing if key.startswith(features)} == manifest
    assert {key for key in listing if key.startswith(label_prefix)} == {
        label_file_key(label_prefix, "bikeshare", kept_day)
    }
    assert await prediction_log.pool.fetchval("SELECT count(*) FROM feature_garbage") == 0
    expected_reports = set()
    for index, end in enumerate(ends[2:]):
        keys = report_keys("bikeshare", 1, end, prefix=report_prefix)
        expected_reports.add(keys.json)
        if index >= 3:  # the three newest keep their HTML
            expected_reports.add(keys.html)
    assert {key for key in listing if key.startswith(report_prefix)} == expected_reports
