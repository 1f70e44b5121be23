"""Scale-out on the real native stack: gateway replicas behind nginx, feature-logger replicas of
one consumer group. Killing a logger replica with SIGKILL mid-run loses and duplicates nothing,
in Postgres and in the Parquet files; requests through nginx reach several gateways.

The stack runs the replicas its settings say (``STACK_*_REPLICAS``); when it runs fewer than
three gateways or three feature-loggers, this module scales the running stack up with
``driftloop stack up``'s own code for its tests, and back afterwards.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from driftloop.settings import ObjectStoreSettings, PostgresSettings, load_settings
from driftloop.storage.objectstore import s3_client
from driftloop_tools.demo.replay import wait_for_champion
from driftloop_tools.stack import lifecycle
from driftloop_tools.stack.programs import replica_name
from driftloop_tools.stack.readiness import wait_ready
from driftloop_tools.stack.settings import StackSettings
from driftloop_tools.stack.supervisor import Supervisor
from gateway.contract import example_row
from gateway.settings import GatewaySettings
from schemas.features import load_feature_spec
from tests.integration.consumer_support import eventually

pytestmark = pytest.mark.integration

REPLICAS = 3
ROW = example_row(load_feature_spec("bikeshare"))


def _say(line: str) -> None:
    # Scaling reports go to pytest's captured output, shown when a test fails.
    print(f"stack {line}")  # noqa: T201


@pytest.fixture(scope="module")
def scaled(stack_settings: StackSettings) -> Iterator[StackSettings]:
    """The stack with at least three gateways and three feature-loggers, as its settings."""
    current = {
        "STACK_GATEWAY_REPLICAS": stack_settings.gateway_replicas,
        "STACK_FEATURE_LOGGER_REPLICAS": stack_settings.feature_logger_replicas,
    }
    if min(current.values()) >= REPLICAS:
        yield stack_settings
        return
    with pytest.MonkeyPatch.context() as patch:
        for variable, count in current.items():
            patch.setenv(variable, str(max(count, REPLICAS)))
        wider = load_settings(StackSettings)
    lifecycle.up(wider, _say)
    try:
        yield wider
    finally:
        lifecycle.up(stack_settings, _say)


def _headers() -> dict[str, str]:
    keys = load_settings(GatewaySettings).api_keys
    return {"X-API-Key": keys[0].get_secret_value()} if keys else {}


@pytest.fixture
async def nginx(scaled: StackSettings, served_champion: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of nginx (the gateway port), once every replica serves the champion."""
    for port in scaled.gateway_replica_ports:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as replica:
            await wait_for_champion(replica, timeout_seconds=120)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{scaled.gateway_port}", headers=_headers(), timeout=30
    ) as client:
        yield client


@pytest.fixture
async def database(postgres_settings: PostgresSettings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_settings.dsn())
    try:
        yield connection
    finally:
        await connection.close()


async def predict(client: httpx.AsyncClient, request_id: str, rows: int) -> list[str]:
    """One /predict call of ``rows`` rows; the request ids the gateway gave them."""
    body = ROW if rows == 1 else [ROW] * rows
    response = await client.post("/predict", json=body, headers={"X-Request-ID": request_id})
    assert response.status_code == httpx.codes.OK, response.text
    body = response.json()
    # One row is answered as one prediction, a list of rows as a list.
    return (
        [body["request_id"]] if rows == 1 else [item["request_id"] for item in body["predictions"]]
    )


async def logged(connection: asyncpg.Connection, request_ids: list[str]) -> Counter[str]:
    """How many prediction_log rows each of these request ids has (0: absent)."""
    rows = await connection.fetch(
        "SELECT request_id, count(*) AS n FROM prediction_log "
        "WHERE request_id = ANY($1::text[]) GROUP BY request_id",
        request_ids,
    )
    return Counter({row["request_id"]: int(row["n"]) for row in rows})


async def partitions_logged(connection: asyncpg.Connection, request_ids: list[str]) -> set[int]:
    rows = await connection.fetch(
        "SELECT DISTINCT kafka_partition FROM prediction_log WHERE request_id = ANY($1::text[])",
        request_ids,
    )
    return {int(row["kafka_partition"]) for row in rows}


def gateway_predictions(metrics_text: str) -> float:
    """Rows one gateway replica has scored (its gateway_predictions counter)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "gateway_predictions"
        for sample in family.samples
        if sample.name == "gateway_predictions_total"
    )


async def scored_by_replica(settings: StackSettings) -> list[float]:
    counts = []
    async with httpx.AsyncClient(timeout=10) as client:
        for port in settings.gateway_replica_ports:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
            response.raise_for_status()
            counts.append(gateway_predictions(response.text))
    return counts


class ParquetRows:
    """Our request ids in the Parquet files the manifest (feature_files) lists, read once each."""

    def __init__(
        self, connection: asyncpg.Connection, settings: ObjectStoreSettings, ours: set[str]
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._ours = ours
        self._read: set[str] = set()
        self.found: Counter[str] = Counter()

    async def refresh(self, since: datetime) -> None:
        rows = await self._connection.fetch(
            "SELECT object_key FROM feature_files WHERE written_at >= $1", since
        )
        keys = [row["object_key"] for row in rows if row["object_key"] not in self._read]
        if not keys:
            return
        async with s3_client(self._settings) as s3:
            for key in keys:
                response = await s3.get_object(Bucket=self._settings.data_bucket, Key=key)
                table = pq.read_table(io.BytesIO(await response["Body"].read()))
                self.found.update(
                    request_id
                    for request_id in table.column("request_id").to_pylist()
                    if request_id in self._ours
                )
                self._read.add(key)


async def test_sigkill_of_a_logger_replica_mid_run_loses_and_duplicates_nothing(
    scaled: StackSettings,
    nginx: httpx.AsyncClient,
    database: asyncpg.Connection,
    object_store_settings: ObjectStoreSettings,
    unique: str,
) -> None:
    supervisor = Supervisor(scaled)
    loggers = [replica_name("feature-logger", index) for index in range(1, REPLICAS + 1)]
    assert all(supervisor.state(name).state == "RUNNING" for name in loggers)
    started = datetime.now(UTC)
    requests, rows_per_request = 60, 50
    request_ids: list[str] = []
    sent = 0

    async def send(count: int) -> None:
        nonlocal sent
        # Four requests in flight at a time, so nginx spreads them over the gateways.
        for first in range(sent, sent + count, 4):
            batches = await asyncio.gather(
                *(
                    predict(nginx, f"{unique}-{index}", rows_per_request)
                    for index in range(first, min(first + 4, sent + count))
                )
            )
            request_ids.extend(request_id for batch in batches for request_id in batch)
        sent += count

    await send(requests // 3)

    async def every_replica_logging() -> bool:
        # Each of the three predictions partitions has its own replica; rows from all three
        # mean every replica, the victim included, is consuming.
        await send(2)
        return len(await partitions_logged(database, request_ids)) == REPLICAS

    await eventually(every_replica_logging, within=60, what="rows logged from every partition")
    victim = loggers[1]
    victim_pid = supervisor.state(victim).pid
    os.kill(victim_pid, signal.SIGKILL)
    await send(requests - sent)
    expected = len(request_ids)
    assert expected == len(set(request_ids)) == sent * rows_per_request

    async def all_logged() -> bool:
        return len(await logged(database, request_ids)) == expected

    await eventually(all_logged, within=180, what=f"{expected} predictions in prediction_log")
    counts = await logged(database, request_ids)
    assert set(counts) == set(request_ids)
    assert set(counts.values()) == {1}, "a prediction is logged more than once"

    # supervisord started the killed replica again (an exit by SIGKILL is unexpected).
    async def victim_restarted() -> bool:
        state = supervisor.state(victim)
        return state.state == "RUNNING" and state.pid not in {0, victim_pid}

    await eventually(victim_restarted, within=60, what=f"{victim} to run again")

    parquet = ParquetRows(database, object_store_settings, set(request_ids))

    async def all_in_parquet() -> bool:
        await parquet.refresh(started)
        return len(parquet.found) == expected

    # The stack flushes Parquet every FEATURE_LOGGER_FLUSH_INTERVAL_SECONDS (60 s by default);
    # the killed replica's unflushed rows are flushed by the replica that takes its partition.
    await eventually(all_in_parquet, within=240, what=f"{expected} predictions in Parquet files")
    duplicated = {request_id: n for request_id, n in parquet.found.items() if n > 1}
    assert not duplicated, f"in more than one Parquet row: {sorted(duplicated)[:5]}"


async def test_requests_through_nginx_reach_several_gateways_and_all_are_logged(
    scaled: StackSettings,
    nginx: httpx.AsyncClient,
    database: asyncpg.Connection,
    unique: str,
) -> None:
    before = await scored_by_replica(scaled)
    requests = 60
    request_ids: list[str] = []
    for index in range(requests):
        request_ids += await predict(nginx, f"{unique}-{index}", 1)
    after = await scored_by_replica(scaled)
    served = [later - earlier for earlier, later in zip(before, after, strict=True)]
    assert sum(served) == requests, served
    assert sum(1 for count in served if count > 0) >= 2, f"one replica served all: {served}"

    async def all_logged() -> bool:
        return len(await logged(database, request_ids)) == requests

    await eventually(all_logged, within=120, what=f"{requests} predictions in prediction_log")
    assert set((await logged(database, request_ids)).values()) == {1}


async def test_nginx_moves_requests_off_a_stopped_gateway_replica(
    scaled: StackSettings, nginx: httpx.AsyncClient
) -> None:
    """A replica stopped (a restart, a deploy) costs no failed request through nginx."""
    supervisor = Supervisor(scaled)
    stopped = replica_name("gateway", 2)
    await asyncio.to_thread(supervisor.stop, stopped)
    try:
        responses = [await nginx.post("/predict", json=ROW) for _ in range(3 * REPLICAS)]
        statuses = Counter(response.status_code for response in responses)
        assert statuses == Counter({httpx.codes.OK: 3 * REPLICAS}), statuses
    finally:
        await asyncio.to_thread(supervisor.start, stopped)
        await wait_ready("gateway", scaled, timeout_seconds=120)
