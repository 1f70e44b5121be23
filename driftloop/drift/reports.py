"""Drift reports: the Evidently snapshots as JSON for machines and HTML for people, stored in S3.

Keys are ``drift-reports/<model>/<version>/<window_end>.json`` and ``.html.gz`` beside it; the
JSON is written last, so whoever finds it can rely on the HTML being there too when the window
has one. Every window gets its JSON; the HTML (about 4 MB raw, a tenth of that gzipped) is kept
for drifted windows and a deterministic sample of clean ones (``keeps_html``), gzip-compressed
(``Content-Encoding: gzip``). Retention and the per-model HTML budget are applied by the
storage lifecycle (``driftloop.drift.report_retention``).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import orjson
from evidently.core.metric_types import render_widgets
from evidently.legacy.renderers.html_widgets import group_widget

from driftloop.drift.assessment import WindowBounds, WindowEvaluation
from driftloop.drift.baseline import DriftBaseline

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

from driftloop.drift.report_retention import REPORT_PREFIX as REPORT_PREFIX
from driftloop.drift.report_retention import STEM_FORMAT

REPORT_FORMAT: Final = 1
"""Version of the JSON document's layout."""


@dataclass(frozen=True, slots=True)
class ReportKeys:
    """Object keys of one window's report."""

    json: str
    html: str


@dataclass(frozen=True, slots=True)
class ReportDocuments:
    """One window's report, rendered."""

    json: bytes
    html: bytes | None
    """None: the window keeps no HTML (a clean window outside the sample)."""


def report_keys(
    model_name: str, model_version: int, window_end: datetime, *, prefix: str = REPORT_PREFIX
) -> ReportKeys:
    """Keys of the report of the window ending at ``window_end`` (UTC, to the microsecond)."""
    if window_end.tzinfo is None:
        raise ValueError("window_end must be timezone-aware")
    stem = window_end.astimezone(UTC).strftime(STEM_FORMAT)
    base = f"{prefix}{model_name}/{model_version}/{stem}"
    return ReportKeys(json=f"{base}.json", html=f"{base}.html.gz")


def keeps_html(
    model_name: str, model_version: int, window_end: datetime, *, notable: bool, clean_share: float
) -> bool:
    """Whether a window's report keeps its HTML: always when ``notable`` (a drifted window that
    starts a drifted streak or opens an episode), else for ``clean_share`` of the others, chosen
    by a hash of the window (replicas and reruns choose alike)."""
    if notable:
        return True
    if clean_share <= 0:
        return False
    digest = hashlib.sha256(f"{model_name}:{model_version}:{window_end.isoformat()}".encode())
    return int.from_bytes(digest.digest()[:8], "big") / 2**64 < clean_share


def report_uri(bucket: str, key: str) -> str:
    """The ``s3://`` URI of an object (the ``report_uri`` of ``DriftDetected``)."""
    return f"s3://{bucket}/{key}"


def render_report(
    evaluation: WindowEvaluation,
    *,
    model_name: str,
    model_version: int,
    window: WindowBounds,
    baseline: DriftBaseline | None = None,
    sample_rows: int | None = None,
    left_out_rows: int = 0,
    with_html: bool = True,
) -> ReportDocuments:
    """The JSON document (assessment, thresholds, Evidently metrics) and the HTML report.

    The assessment is the window's verdict; the Evidently snapshots, when ``sample_rows`` is
    given, ran on a uniform sample of that many of the window's rows (None: no sample could be
    judged), less ``left_out_rows`` with values beyond Evidently's reach (judged by the sketch
    all the same), and ``baseline`` says how the thresholds were calibrated. Without
    ``with_html``, no HTML is rendered.
    """
    document = {
        "report_format": REPORT_FORMAT,
        "model_name": model_name,
        "model_version": model_version,
        "window": window.model_dump(mode="json"),
        "assessment": evaluation.assessment.model_dump(mode="json"),
        "thresholds": None
        if baseline is None
        else {
            "sampling": baseline.sampling,
            "quantile": baseline.quantile,
            "reference_rows": baseline.reference_rows,
            "sample_rows": baseline.sample_rows,
            "samples": baseline.samples,
            "columns": [column.model_dump(mode="json") for column in baseline.columns],
        },
        "evidently": {
            "sample_rows": sample_rows,
            "left_out_rows": left_out_rows,
            "drift": None
            if evaluation.drift_snapshot is None
            else _snapshot_dict(evaluation.drift_snapshot),
            "quality": None
            if evaluation.quality_snapshot is None
            else _snapshot_dict(evaluation.quality_snapshot),
        },
    }
    return ReportDocuments(
        json=orjson.dumps(document), html=_html(evaluation).encode() if with_html else None
    )


async def put_report(
    s3: S3Client, bucket: str, keys: ReportKeys, documents: ReportDocuments
) -> str:
    """Store the HTML (gzipped, when the window keeps one), then the JSON; returns its URI."""
    # No "; charset=utf-8" parameter: S3Proxy computes the signature over a Content-Type
    # without it and answers SignatureDoesNotMatch (seen on the dev stack); the HTML declares
    # its charset itself.
    if documents.html is not None:
        await s3.put_object(
            Bucket=bucket,
            Key=keys.html,
            Body=gzip.compress(documents.html, compresslevel=6, mtime=0),
            ContentType="text/html",
            ContentEncoding="gzip",
        )
    await s3.put_object(
        Bucket=bucket, Key=keys.json, Body=documents.json, ContentType="application/json"
    )
    return report_uri(bucket, keys.json)


def _snapshot_dict(snapshot: Any) -> Any:
    # Evidently's own encoder turns numpy scalars and arrays into JSON.
    return json.loads(snapshot.json())


def _html(evaluation: WindowEvaluation) -> str:
    if evaluation.drift_snapshot is None:
        verdict = evaluation.assessment
        rows = "".join(
            f"<tr><td>{html.escape(f.name)}</td><td>{f.score:.4f}</td><td>{f.threshold:.4f}</td>"
            f"<td>{'drifted' if f.drifted else 'clean'}</td></tr>"
            for f in verdict.features
        )
        return (
            "<!doctype html><meta charset=utf-8><title>drift window</title>"
            f"<p>Drift share {verdict.drift_share:.2f} over {verdict.window_rows} rows; no "
            "sample of the window could be compared by Evidently.</p>"
            f"<table><tr><th>feature</th><th>score</th><th>threshold</th><th></th></tr>{rows}"
            "</table>"
        )
    if evaluation.quality_snapshot is None:
        return str(evaluation.drift_snapshot.get_html_str(as_iframe=False))
    drift = evaluation.drift_snapshot.to_snapshot_model()
    quality = evaluation.quality_snapshot.to_snapshot_model()
    labelled = evaluation.assessment.labelled_rows
    widgets = [
        group_widget(title="Data and prediction drift", widgets=drift.widgets),
        *drift.tests_widgets,
        group_widget(title=f"Quality on the {labelled} labelled rows", widgets=quality.widgets),
        *quality.tests_widgets,
    ]
    return str(render_widgets(widgets, as_iframe=False))
