"""The S3-compatible object store (MinIO, S3Proxy or AWS S3) through aioboto3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from driftloop.settings import ObjectStoreSettings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
else:
    S3Client = Any

UNAVAILABLE_ERRORS: Final[tuple[type[BaseException], ...]] = (
    BotoCoreError,
    ClientError,
    aiohttp.ClientError,
)
"""Errors of an object-store call that mean "the store is not reachable or refused now"."""


def client_config(*, max_attempts: int = 5) -> Config:
    """Path-style addressing and checksums only when required.

    Path style works with every S3 server on any host name. Recent botocore sends CRC
    trailers by default, which S3-compatible servers (S3Proxy, older MinIO) refuse.
    """
    return Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


@asynccontextmanager
async def s3_client(
    settings: ObjectStoreSettings, *, max_attempts: int = 5
) -> AsyncIterator[S3Client]:
    """An S3 client for the configured endpoint; closes its connections on exit.

    ``max_attempts`` bounds botocore's own retries of one call (with backoff); a caller that
    retries on its own terms lowers it so a call fails fast while the store is away.
    """
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key.get_secret_value(),
        config=client_config(max_attempts=max_attempts),
    ) as client:
        yield client
