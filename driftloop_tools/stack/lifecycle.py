"""``up``, ``down`` and ``status`` of the native stack.

``up`` is idempotent: it installs what is missing, starts what is stopped, in stages, and
waits for each stage to be ready; on a running, healthy stack it only reports status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from driftloop.events import kafka
from driftloop_tools.stack import install, partitions, provision
from driftloop_tools.stack.alertmanager_config import reload_alertmanager, write_alertmanager_config
from driftloop_tools.stack.nginx import write_nginx_config
from driftloop_tools.stack.programs import (
    Program,
    airflow_programs,
    alert_receiver_program,
    alertmanager_program,
    kafka_program,
    mlflow_program,
    platform_programs,
    postgres_program,
    prometheus_program,
    s3proxy_program,
    service_of,
    write_airflow_passwords,
    write_kafka_config,
    write_s3proxy_config,
)
from driftloop_tools.stack.prometheus_config import reload_prometheus, write_prometheus_config
from driftloop_tools.stack.readiness import PROBES, NotReadyError, Readiness, check, wait_ready
from driftloop_tools.stack.settings import StackSettings
from driftloop_tools.stack.supervisor import ProgramState, Supervisor

Report = Callable[[str], None]

INFRASTRUCTURE = ("postgres", "kafka", "s3proxy", "prometheus", "alert-receiver")
# Alertmanager starts last and stops first: Prometheus scrapes every service from the start,
# and the services of later stages, not started yet (or already stopped), would otherwise be
# announced as outages. A notification that Prometheus sent meanwhile is re-sent once it runs
# if its alert still fires; one that resolved before is never sent.
ALERT_DELIVERY = ("alertmanager",)


@dataclass(frozen=True, slots=True)
class StackStatus:
    supervisor_running: bool
    programs: list[ProgramState]
    readiness: list[Readiness]

    @property
    def healthy(self) -> bool:
        return (
            self.supervisor_running
            and all(program.state == "RUNNING" for program in self.programs)
            and all(item.ready for item in self.readiness)
        )


def all_programs(settings: StackSettings) -> list[Program]:
    return [
        postgres_program(settings),
        kafka_program(settings),
        s3proxy_program(settings),
        prometheus_program(settings),
        alert_receiver_program(settings),
        alertmanager_program(settings),
        mlflow_program(settings),
        *airflow_programs(settings),
        *platform_programs(settings),
    ]


def stop_stages(settings: StackSettings) -> list[list[str]]:
    """The order ``down`` stops programs in, the reverse of ``up``: alert delivery, so the
    stack's own stop is not announced as outages; the platform's services
    while everything they write to still runs (so they drain and commit instead of being
    killed waiting on a dead broker), then Airflow and MLflow; supervisord's shutdown stops
    the infrastructure last."""
    return [
        list(ALERT_DELIVERY),
        [program.name for program in platform_programs(settings)],
        [program.name for program in airflow_programs(settings)],
        [mlflow_program(settings).name],
    ]


def _probe_of(program_name: str) -> str | None:
    if program_name.startswith("airflow-"):
        return "airflow"
    if program_name == "nginx":
        return "gateway"
    service = service_of(program_name)
    return service if service in PROBES else None


async def _start_stage(
    supervisor: Supervisor,
    settings: StackSettings,
    names: Sequence[str],
    report: Report,
    timeout_seconds: float,
) -> None:
    for name in names:
        supervisor.start(name)
    probes = sorted({probe for name in names if (probe := _probe_of(name))})

    def alive(name_prefix: str) -> Callable[[], bool]:
        def is_alive() -> bool:
            return all(
                supervisor.state(name).state in {"RUNNING", "STARTING", "BACKOFF"}
                for name in names
                if name.startswith(name_prefix)
            )

        return is_alive

    results = await asyncio.gather(
        *(wait_ready(probe, settings, timeout_seconds, alive(probe)) for probe in probes)
    )
    # nginx belongs to the gateway's probe (it checks nginx and every replica).
    if "nginx" in names and supervisor.state("nginx").state not in {"RUNNING", "STARTING"}:
        raise NotReadyError(f"nginx exited while starting; see {settings.logs / 'nginx.log'}")
    # A program answers its probe before supervisord counts it started (startsecs): wait for
    # RUNNING, so the status `up` returns is not a transient STARTING.
    for _ in range(75):  # startsecs is 3 s; 15 s at the most
        if all(supervisor.state(name).state != "STARTING" for name in names):
            break
        await asyncio.sleep(0.2)
    for result in results:
        report(f"{result.service:<14} ready at {result.address}")


def up(settings: StackSettings, report: Report) -> StackStatus:
    started = time.monotonic()
    supervisor = Supervisor(settings)
    if supervisor.is_running() and not supervisor.config_changed(all_programs(settings)):
        # Alert timings and receivers live in files, not in the programs' command lines.
        if write_prometheus_config(settings):
            report("Prometheus configuration changed; reloading it")
            reload_prometheus(settings)
        if write_alertmanager_config(settings):
            report("Alertmanager configuration changed; reloading it")
            reload_alertmanager(settings)
        current = status(settings)
        if current.healthy:
            report("stack already running and healthy; nothing to do")
            return current

    # Before anything starts: a consumer replica beyond its topics' partitions would sit idle.
    partitions.check_replicas(
        partitions.consumer_replicas(settings), partitions.declared_partitions()
    )
    install.install(settings, report)
    provision.prepare_folders(settings)
    write_kafka_config(settings)
    write_s3proxy_config(settings)
    write_airflow_passwords(settings)
    # Scrape ports follow the settings; a running Prometheus re-reads a changed file.
    if write_prometheus_config(settings) and supervisor.is_running():
        reload_prometheus(settings)
    if write_alertmanager_config(settings) and supervisor.is_running():
        reload_alertmanager(settings)
    nginx_changed = write_nginx_config(settings)
    if provision.init_postgres_cluster(settings):
        report("created the PostgreSQL cluster")
    if provision.format_kafka_storage(settings):
        report("formatted Kafka's KRaft storage")

    programs = all_programs(settings)
    supervisor.write_config(programs)
    if supervisor.is_running():
        supervisor.reload_config()
        if nginx_changed:
            # New replicas (or fewer): nginx re-reads its file without dropping a connection.
            supervisor.signal("nginx", "HUP")
    else:
        supervisor.launch()

    asyncio.run(_start_stage(supervisor, settings, INFRASTRUCTURE, report, 120))
    asyncio.run(provision.provision_postgres(settings))
    created_topics = asyncio.run(kafka.create_topics(settings.kafka))
    if created_topics:
        report(f"created topics: {', '.join(created_topics)}")
    # The topics as they are on the broker, which may predate the declared partitions.
    partitions.check_replicas(
        partitions.consumer_replicas(settings),
        asyncio.run(partitions.broker_partitions(settings.kafka)),
    )
    created_buckets = provision.create_buckets(settings)
    if created_buckets:
        report(f"created buckets: {', '.join(created_buckets)}")

    airflow_names = [program.name for program in programs if program.name.startswith("airflow-")]
    if any(supervisor.state(name).state != "RUNNING" for name in airflow_names):
        report("migrating the Airflow metadata database")
        provision.migrate_airflow(settings)
    asyncio.run(_start_stage(supervisor, settings, ["mlflow", *airflow_names], report, 240))
    # The platform's services last: they need Kafka, Postgres, S3 and MLflow (they retry,
    # but starting them on a ready stack keeps their logs free of start-up noise).
    platform = [program.name for program in platform_programs(settings)]
    asyncio.run(_start_stage(supervisor, settings, platform, report, 180))
    asyncio.run(_start_stage(supervisor, settings, ALERT_DELIVERY, report, 60))
    report(f"every service ready in {time.monotonic() - started:.1f}s")
    return status(settings)


def down(settings: StackSettings, report: Report) -> None:
    """Stop every program of the stack and its supervisord; nothing else is touched."""
    supervisor = Supervisor(settings)
    if not supervisor.is_running():
        report("stack is not running")
        return
    started = time.monotonic()
    for stage in stop_stages(settings):
        supervisor.stop_together(stage)
    supervisor.shutdown()
    report(f"stopped in {time.monotonic() - started:.1f}s")


def restart(settings: StackSettings, name: str, report: Report) -> None:
    """Stop and start one program, then wait for its service to answer again."""
    supervisor = Supervisor(settings)
    if not supervisor.is_running():
        raise RuntimeError("the stack is not running; start it with `make up`")
    supervisor.stop(name)
    supervisor.start(name)
    if probe := _probe_of(name):
        readiness = asyncio.run(wait_ready(probe, settings, 240))
        report(f"{readiness.service:<14} ready at {readiness.address}")
    else:
        report(f"{name} restarted")


async def _readiness(settings: StackSettings) -> list[Readiness]:
    return list(await asyncio.gather(*(check(service, settings) for service in PROBES)))


def status(settings: StackSettings) -> StackStatus:
    supervisor = Supervisor(settings)
    if not supervisor.is_running():
        return StackStatus(supervisor_running=False, programs=[], readiness=[])
    return StackStatus(
        supervisor_running=True,
        programs=supervisor.states(),
        readiness=asyncio.run(_readiness(settings)),
    )
