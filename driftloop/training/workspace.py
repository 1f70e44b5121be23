"""The work objects of a retrain run: training set, holdout and declaration in the data bucket.

Kept apart from ``driftloop.training.retrain`` because the DAG's last task only deletes them: this
module imports no pandas, LightGBM or MLflow, which take seconds to import on a small worker.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Final

from botocore.exceptions import BotoCoreError, ClientError

from driftloop.settings import ObjectStoreSettings, load_settings
from driftloop.storage.objectstore import s3_client

log = logging.getLogger(__name__)

WORK_PREFIX: Final = "retraining"
_KEY_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")


def work_prefix(model_name: str, dag_run_id: str) -> str:
    """Object-key prefix of a run's work objects (run ids may hold ``:`` and ``+``)."""
    return f"{WORK_PREFIX}/{model_name}/{_KEY_UNSAFE.sub('_', dag_run_id)}/"


async def put_objects(
    settings: ObjectStoreSettings, bucket: str, objects: Mapping[str, bytes]
) -> None:
    """Write each key's bytes."""
    async with s3_client(settings) as s3:
        for key, body in objects.items():
            await s3.put_object(Bucket=bucket, Key=key, Body=body)


async def get_objects(
    settings: ObjectStoreSettings, bucket: str, keys: Sequence[str]
) -> list[bytes]:
    """The bytes of each key, in order."""
    async with s3_client(settings) as s3:
        bodies = []
        for key in keys:
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as stream:
                bodies.append(await stream.read())
        return bodies


async def delete_prefix(settings: ObjectStoreSettings, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``; returns how many."""
    deleted = 0
    async with s3_client(settings) as s3:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                await s3.delete_object(Bucket=bucket, Key=item["Key"])
                deleted += 1
    return deleted


def delete_work_objects(
    bucket: str, prefix: str, *, settings: ObjectStoreSettings | None = None
) -> int:
    """Delete a run's work objects, best effort: a failure is logged, never raised."""
    location = f"s3://{bucket}/{prefix}"
    if not prefix.startswith(f"{WORK_PREFIX}/"):
        raise ValueError(f"{location} is not a retrain run's work folder")
    try:
        settings = settings or load_settings(ObjectStoreSettings)
        deleted = asyncio.run(delete_prefix(settings, bucket, prefix))
    except (BotoCoreError, ClientError, OSError) as error:
        log.warning("work objects at %s not deleted (%s); remove them by hand", location, error)
        return 0
    log.info("%d work objects deleted from %s", deleted, location)
    return deleted
