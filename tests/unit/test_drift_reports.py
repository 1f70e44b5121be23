"""Drift reports: keys, the JSON and HTML documents, the order of the uploads."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from driftloop.drift.assessment import WindowBounds, WindowEvaluation, evaluate_window
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.report_retention import window_end_of
from driftloop.drift.reports import (
    ReportDocuments,
    ReportKeys,
    keeps_html,
    put_report,
    render_report,
    report_keys,
    report_uri,
)
from schemas.features import load_feature_spec

REPOSITORY = Path(__file__).resolve().parents[2]
WINDOW = WindowBounds(start=datetime(2011, 7, 1, tzinfo=UTC), end=datetime(2011, 7, 8, tzinfo=UTC))


@pytest.fixture(scope="module")
def evaluation() -> WindowEvaluation:
    spec = load_feature_spec("bikeshare")
    assert spec.dataset is not None
    seed = pd.read_csv(REPOSITORY / spec.dataset.path)
    seed = seed.assign(
        prediction=seed["bikers"] * np.random.default_rng(3).normal(1, 0.1, len(seed))
    )
    reference = seed[seed["mnth"] == "Jan"]
    window = seed[(seed["mnth"] == "July") & (seed["day"] < 189)]
    result = evaluate_window(reference, window, spec, DriftPolicy(min_labelled_rows=50))
    assert isinstance(result, WindowEvaluation)
    return result


class RecordingS3:
    """Stands in for the aioboto3 client: records the objects put, in order."""

    def __init__(self) -> None:
        self.puts: list[dict[str, Any]] = []

    async def put_object(self, **request: Any) -> dict[str, Any]:
        self.puts.append(request)
        return {}


def test_keys_name_model_version_and_window_end() -> None:
    keys = report_keys("bikeshare", 3, datetime(2011, 7, 8, 12, 30, tzinfo=UTC))

    assert keys == ReportKeys(
        json="drift-reports/bikeshare/3/20110708T123000.000000Z.json",
        html="drift-reports/bikeshare/3/20110708T123000.000000Z.html.gz",
    )


def test_keys_are_in_utc_and_refuse_naive_times() -> None:
    eastern = timezone(timedelta(hours=-4))
    moment = datetime(2011, 7, 8, 8, 30, tzinfo=eastern)

    assert report_keys("bikeshare", 3, moment) == report_keys(
        "bikeshare", 3, moment.astimezone(UTC)
    )
    assert report_keys("m", 1, moment, prefix="p/").json.startswith("p/m/1/")
    with pytest.raises(ValueError, match="timezone-aware"):
        report_keys("bikeshare", 3, datetime(2011, 7, 8))  # noqa: DTZ001


def test_json_report_holds_the_assessment_and_evidently_metrics(
    evaluation: WindowEvaluation,
) -> None:
    documents = render_report(evaluation, model_name="bikeshare", model_version=3, window=WINDOW)
    report = orjson.loads(documents.json)

    assert report["model_name"] == "bikeshare"
    assert report["model_version"] == 3
    assert report["window"] == WINDOW.model_dump(mode="json")
    assert report["assessment"] == evaluation.assessment.model_dump(mode="json")
    drift_metrics = {
        metric["metric_name"].split("(")[0] for metric in report["evidently"]["drift"]["metrics"]
    }
    assert {"DriftedColumnsCount", "ValueDrift"} <= drift_metrics
    assert report["evidently"]["quality"]["metrics"]


def test_html_report_shows_drift_and_quality(evaluation: WindowEvaluation) -> None:
    documents = render_report(evaluation, model_name="bikeshare", model_version=3, window=WINDOW)
    assert documents.html is not None
    html = documents.html.decode()

    assert html.lstrip().lower().startswith("<html") or "<html" in html[:500].lower()
    assert "Data and prediction drift" in html
    assert f"Quality on the {evaluation.assessment.labelled_rows} labelled rows" in html


async def test_put_report_writes_the_gzipped_html_before_the_json() -> None:
    s3 = RecordingS3()
    keys = report_keys("bikeshare", 3, WINDOW.end)
    documents = ReportDocuments(json=b"{}", html=b"<html>" + b"<p>drift</p>" * 1000 + b"</html>")

    uri = await put_report(s3, "driftloop-data", keys, documents)  # type: ignore[arg-type]

    assert uri == report_uri("driftloop-data", keys.json)
    assert uri == "s3://driftloop-data/drift-reports/bikeshare/3/20110708T000000.000000Z.json"
    assert [put["Key"] for put in s3.puts] == [keys.html, keys.json]
    html_put, json_put = s3.puts
    assert gzip.decompress(html_put["Body"]) == documents.html
    assert len(html_put["Body"]) < len(documents.html) / 10
    assert (html_put["ContentType"], html_put["ContentEncoding"]) == ("text/html", "gzip")
    assert (json_put["Body"], json_put["ContentType"]) == (documents.json, "application/json")
    assert {put["Bucket"] for put in s3.puts} == {"driftloop-data"}


async def test_a_window_without_html_stores_its_json_only(evaluation: WindowEvaluation) -> None:
    documents = render_report(
        evaluation, model_name="bikeshare", model_version=3, window=WINDOW, with_html=False
    )
    assert documents.html is None
    s3 = RecordingS3()
    keys = report_keys("bikeshare", 3, WINDOW.end)
    await put_report(s3, "driftloop-data", keys, documents)  # type: ignore[arg-type]
    assert [put["Key"] for put in s3.puts] == [keys.json]


def test_drifted_windows_keep_html_and_clean_ones_are_sampled_by_window() -> None:
    ends = [WINDOW.end + timedelta(hours=hour) for hour in range(2000)]
    assert all(keeps_html("m", 1, end, notable=True, clean_share=0.0) for end in ends)
    kept = [end for end in ends if keeps_html("m", 1, end, notable=False, clean_share=0.05)]
    # A hash of the window chooses: about the share, and the same windows every time.
    assert 60 <= len(kept) <= 140
    assert kept == [end for end in ends if keeps_html("m", 1, end, notable=False, clean_share=0.05)]
    assert not any(keeps_html("m", 1, end, notable=False, clean_share=0.0) for end in ends)
    assert all(keeps_html("m", 1, end, notable=False, clean_share=1.0) for end in ends)


def test_report_keys_give_back_their_window_end() -> None:
    keys = report_keys("bikeshare", 3, WINDOW.end)
    assert window_end_of(keys.json) == WINDOW.end
    assert window_end_of(keys.html) == WINDOW.end
    assert window_end_of("drift-reports/bikeshare/3/notes.txt") is None
