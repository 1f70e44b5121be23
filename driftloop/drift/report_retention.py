"""Retention of drift reports: reports past their model's retention deleted, then the oldest
HTML past its budget. Light on imports (no Evidently): the storage lifecycle runs it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger(__name__)

REPORT_PREFIX: Final = "drift-reports/"
STEM_FORMAT: Final = "%Y%m%dT%H%M%S.%fZ"
"""A report key's name: its window's end, UTC, to the microsecond."""


@dataclass(frozen=True, slots=True)
class ReportExpiry:
    """What one report lifecycle pass over a model deleted."""

    expired: int = 0
    """Reports (JSON and HTML) older than the retention."""
    over_budget: int = 0
    """HTML files past the model's budget (their JSON stays)."""
    html_bytes: int = 0
    """HTML bytes the model keeps."""


def window_end_of(key: str) -> datetime | None:
    """The window end in a report key (``report_keys``); None for any other key."""
    stem = key.rsplit("/", 1)[-1].split(".json", 1)[0].split(".html", 1)[0]
    try:
        return datetime.strptime(stem, STEM_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


async def expire_reports(
    s3: S3Client,
    bucket: str,
    model_name: str,
    *,
    retention: timedelta,
    html_budget_bytes: int,
    now: datetime,
    prefix: str = REPORT_PREFIX,
) -> ReportExpiry:
    """Delete the model's reports whose window ended before ``now - retention``, then the
    oldest HTML files beyond ``html_budget_bytes`` (newest first are kept)."""
    horizon = now - retention
    expired = over_budget = 0
    html_files: list[tuple[datetime, str, int]] = []
    doomed: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}{model_name}/"):
        for item in page.get("Contents", []):
            key = item["Key"]
            end = window_end_of(key)
            if end is None:
                continue
            if end < horizon:
                doomed.append(key)
                expired += key.endswith(".json")
            elif ".html" in key:
                html_files.append((end, key, item["Size"]))
    kept = 0
    for _end, key, size in sorted(html_files, reverse=True):
        if kept + size > html_budget_bytes:
            doomed.append(key)
            over_budget += 1
        else:
            kept += size
    # One DELETE per object: DeleteObjects needs a checksum header that botocore now sends as
    # a CRC trailer, which S3-compatible servers (S3Proxy 2.6 on the dev stack) refuse.
    for key in doomed:
        await s3.delete_object(Bucket=bucket, Key=key)
    if doomed:
        log.info(
            "%s: %d reports past the retention, %d HTML files past the budget deleted",
            model_name,
            expired,
            over_budget,
        )
    return ReportExpiry(expired, over_budget, kept)
