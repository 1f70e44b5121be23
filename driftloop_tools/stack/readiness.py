"""Readiness probes of the stack's services: each answers "ready" or says what is wrong."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import boto3
import httpx
from aiokafka.admin import AIOKafkaAdminClient
from botocore.config import Config as BotoConfig

from driftloop_tools.stack.settings import StackSettings

Probe = Callable[[StackSettings], Awaitable[None]]


class NotReadyError(RuntimeError):
    """A service did not become ready in time."""


@dataclass(frozen=True, slots=True)
class Readiness:
    service: str
    address: str
    ready: bool
    detail: str


async def probe_postgres(settings: StackSettings) -> None:
    # The superuser over the unix socket: works before the platform's role exists.
    connection = await asyncpg.connect(
        host=str(settings.postgres_socket_dir),
        port=settings.postgres.port,
        user=settings.postgres_superuser,
        database="postgres",
        timeout=3,
    )
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()


async def probe_kafka(settings: StackSettings) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers, request_timeout_ms=3000
    )
    # A broker still booting is the expected case while polling; aiokafka would log every
    # refused connection as an error. The probe reports the failure itself.
    aiokafka_log = logging.getLogger("aiokafka")
    previous_level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()
    finally:
        aiokafka_log.setLevel(previous_level)


def s3_client(settings: StackSettings) -> object:
    return boto3.client(
        "s3",
        endpoint_url=settings.s3.endpoint_url,
        aws_access_key_id=settings.s3.access_key_id,
        aws_secret_access_key=settings.s3.secret_access_key.get_secret_value(),
        region_name=settings.s3.region,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=3,
            read_timeout=5,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


async def probe_object_store(settings: StackSettings) -> None:
    client = s3_client(settings)
    await asyncio.to_thread(client.list_buckets)  # type: ignore[attr-defined]


async def _get_ok(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=3) as client:
        response = await client.get(url)
    response.raise_for_status()
    return response


async def probe_mlflow(settings: StackSettings) -> None:
    await _get_ok(f"{settings.mlflow.tracking_uri.rstrip('/')}/health")


async def probe_airflow(settings: StackSettings) -> None:
    response = await _get_ok(f"{settings.airflow.url.rstrip('/')}/api/v2/monitor/health")
    health = response.json()
    unhealthy = [
        component
        for component in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        if (health.get(component) or {}).get("status") != "healthy"
    ]
    if unhealthy:
        raise NotReadyError(f"components not healthy yet: {', '.join(unhealthy)}")


async def probe_prometheus(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.prometheus_port}/-/ready")


async def probe_alertmanager(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.alertmanager_port}/-/ready")


async def probe_alert_receiver(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.alert_receiver_port}/health")


async def _every_ready(urls: list[str]) -> None:
    """Every replica answers; the error names the ones that do not."""
    results = await asyncio.gather(*(_get_ok(url) for url in urls), return_exceptions=True)
    failed = [
        f"{url} ({_describe(result)})"
        for url, result in zip(urls, results, strict=True)
        if isinstance(result, BaseException)
    ]
    if failed:
        raise NotReadyError(f"not answering: {', '.join(failed)}")


async def probe_gateway(settings: StackSettings) -> None:
    # Every replica, and nginx in front of them (the port clients use).
    await _every_ready(
        [
            *(f"http://127.0.0.1:{port}/health/live" for port in settings.gateway_replica_ports),
            f"http://127.0.0.1:{settings.gateway_port}/health/live",
        ]
    )


async def probe_feature_logger(settings: StackSettings) -> None:
    await _every_ready(
        [f"http://127.0.0.1:{port}/metrics" for port in settings.feature_logger_metrics_ports]
    )


async def probe_batch_scorer(settings: StackSettings) -> None:
    await _every_ready(
        [f"http://127.0.0.1:{port}/metrics" for port in settings.batch_scorer_metrics_ports]
    )


async def probe_drift_monitor(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.drift_monitor_metrics_port}/metrics")


async def probe_retrain_trigger(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.retrain_trigger_metrics_port}/metrics")


async def probe_shadow_scorer(settings: StackSettings) -> None:
    await _get_ok(f"http://127.0.0.1:{settings.shadow_scorer_metrics_port}/metrics")


def address_of(service: str, settings: StackSettings) -> str:
    addresses = {
        "gateway": f"http://127.0.0.1:{settings.gateway_port}",
        "feature-logger": f"http://127.0.0.1:{settings.feature_logger_metrics_port}/metrics",
        "batch-scorer": f"http://127.0.0.1:{settings.batch_scorer_metrics_port}/metrics",
        "drift-monitor": f"http://127.0.0.1:{settings.drift_monitor_metrics_port}/metrics",
        "retrain-trigger": f"http://127.0.0.1:{settings.retrain_trigger_metrics_port}/metrics",
        "shadow-scorer": f"http://127.0.0.1:{settings.shadow_scorer_metrics_port}/metrics",
        "postgres": f"localhost:{settings.postgres.port}",
        "kafka": settings.kafka.bootstrap_servers,
        "s3proxy": settings.s3.endpoint_url,
        "mlflow": settings.mlflow.tracking_uri,
        "airflow": settings.airflow.url,
        "prometheus": f"http://127.0.0.1:{settings.prometheus_port}",
        "alertmanager": f"http://127.0.0.1:{settings.alertmanager_port}",
        "alert-receiver": f"http://127.0.0.1:{settings.alert_receiver_port}/alerts",
    }
    return addresses[service]


PROBES: dict[str, Probe] = {
    "postgres": probe_postgres,
    "kafka": probe_kafka,
    "s3proxy": probe_object_store,
    "mlflow": probe_mlflow,
    "airflow": probe_airflow,
    "prometheus": probe_prometheus,
    "alertmanager": probe_alertmanager,
    "alert-receiver": probe_alert_receiver,
    "gateway": probe_gateway,
    "feature-logger": probe_feature_logger,
    "batch-scorer": probe_batch_scorer,
    "drift-monitor": probe_drift_monitor,
    "retrain-trigger": probe_retrain_trigger,
    "shadow-scorer": probe_shadow_scorer,
}


async def check(service: str, settings: StackSettings) -> Readiness:
    address = address_of(service, settings)
    try:
        await asyncio.wait_for(PROBES[service](settings), timeout=10)
    except Exception as error:  # noqa: BLE001 - any failure means "not ready", reported as is
        return Readiness(service, address, ready=False, detail=_describe(error))
    return Readiness(service, address, ready=True, detail="ready")


async def wait_ready(
    service: str,
    settings: StackSettings,
    timeout_seconds: float,
    is_alive: Callable[[], bool] = lambda: True,
) -> Readiness:
    """Poll a probe with a growing interval until it passes, the process dies, or time runs out."""
    deadline = time.monotonic() + timeout_seconds
    interval = 0.25
    while True:
        readiness = await check(service, settings)
        if readiness.ready:
            return readiness
        log = settings.logs / f"{service}.log"
        if not is_alive():
            raise NotReadyError(f"{service} exited while starting ({readiness.detail}); see {log}")
        if time.monotonic() > deadline:
            raise NotReadyError(
                f"{service} at {readiness.address} not ready after {timeout_seconds:.0f}s: "
                f"{readiness.detail}; see {log}"
            )
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, 3.0)


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
