"""Replicas of the native stack: programs, ports, nginx, Prometheus targets, partition bound."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from driftloop_tools.stack import lifecycle, partitions
from driftloop_tools.stack.nginx import nginx_config_path, nginx_prefix, write_nginx_config
from driftloop_tools.stack.programs import platform_programs, replica_name, service_of
from driftloop_tools.stack.prometheus_config import render_prometheus_config
from driftloop_tools.stack.settings import StackSettings
from schemas.topics import Topic

pytestmark = pytest.mark.unit


def _three(monkeypatch: pytest.MonkeyPatch) -> StackSettings:
    for service in ("GATEWAY", "FEATURE_LOGGER", "BATCH_SCORER"):
        monkeypatch.setenv(f"STACK_{service}_REPLICAS", "3")
    return StackSettings()


def test_one_replica_each_by_default_behind_nginx(stack_env: Path) -> None:
    settings = StackSettings()
    names = [program.name for program in platform_programs(settings)]
    assert names == [
        "nginx",
        "gateway",
        "feature-logger",
        "batch-scorer",
        "drift-monitor",
        "shadow-scorer",
        "retrain-trigger",
    ]
    (gateway,) = [p for p in platform_programs(settings) if p.name == "gateway"]
    assert gateway.environment["GATEWAY_PORT"] == "8001"
    # Replica 1 is today's gateway: its configured spool and cache, nothing overridden.
    assert "GATEWAY_SPOOL_PATH" not in gateway.environment


def test_three_replicas_each_get_their_own_port_spool_and_cache(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _three(monkeypatch)
    programs = {program.name: program for program in platform_programs(settings)}
    gateways = [programs[replica_name("gateway", index)] for index in (1, 2, 3)]
    assert [g.environment["GATEWAY_PORT"] for g in gateways] == ["8001", "8101", "8201"]
    spools = {g.environment.get("GATEWAY_SPOOL_PATH", "configured") for g in gateways}
    caches = {g.environment.get("GATEWAY_MODEL_CACHE_DIR", "configured") for g in gateways}
    assert len(spools) == len(caches) == 3
    loggers = [programs[replica_name("feature-logger", index)] for index in (1, 2, 3)]
    assert [p.environment["FEATURE_LOGGER_METRICS_PORT"] for p in loggers] == [
        "9101",
        "9201",
        "9301",
    ]
    scorers = [programs[replica_name("batch-scorer", index)] for index in (1, 2, 3)]
    assert [p.environment["BATCH_SCORER_METRICS_PORT"] for p in scorers] == [
        "9102",
        "9202",
        "9302",
    ]
    assert len({p.environment.get("BATCH_SCORER_MODEL_CACHE_DIR") for p in scorers}) == 3
    assert service_of("feature-logger-3") == "feature-logger"
    assert service_of("feature-logger") == "feature-logger"
    assert service_of("airflow-api-server") == "airflow-api-server"
    # `down` stops every replica with the platform's services, before what they write to.
    stages = lifecycle.stop_stages(settings)
    platform_stage = next(stage for stage in stages if "gateway" in stage)
    assert set(programs) <= set(platform_stage)
    assert stages.index(platform_stage) < next(
        index for index, stage in enumerate(stages) if "airflow-scheduler" in stage
    )


def test_prometheus_scrapes_every_replica_on_its_own_port(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = yaml.safe_load(render_prometheus_config(_three(monkeypatch)))
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in document["scrape_configs"]
    }
    assert targets["gateway"] == ["localhost:8001", "localhost:8101", "localhost:8201"]
    assert targets["feature-logger"] == ["localhost:9101", "localhost:9201", "localhost:9301"]
    assert targets["batch-scorer"] == ["localhost:9102", "localhost:9202", "localhost:9302"]


def test_colliding_ports_are_refused_with_the_two_owners(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 1: feature-logger replica 2 would take 9102, the batch scorer's port.
    monkeypatch.setenv("STACK_FEATURE_LOGGER_REPLICAS", "2")
    monkeypatch.setenv("STACK_REPLICA_PORT_STEP", "1")
    with pytest.raises(ValidationError, match="would both listen on port 9102") as refused:
        StackSettings()
    assert "feature-logger metrics replica 2" in str(refused.value)
    assert "batch-scorer metrics replica 1" in str(refused.value)


def test_nginx_config_spreads_over_every_replica(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _three(monkeypatch)
    assert write_nginx_config(settings)
    assert not write_nginx_config(settings)
    text = nginx_config_path(settings).read_text()
    assert "listen 127.0.0.1:8000;" in text
    for port in (8001, 8101, 8201):
        assert f"server 127.0.0.1:{port} " in text
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx not installed (Debian package nginx); `make up` installs it")
    prefix, config = str(nginx_prefix(settings)), str(nginx_config_path(settings))
    result = subprocess.run(
        [nginx, "-t", "-p", prefix, "-c", config, "-e", "stderr"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_consumer_replicas_beyond_the_partitions_are_refused() -> None:
    declared = partitions.declared_partitions()
    partitions.check_replicas({"feature-logger": 3, "batch-scorer": 3}, declared)
    with pytest.raises(partitions.TooManyReplicasError, match="STACK_FEATURE_LOGGER_REPLICAS=4"):
        partitions.check_replicas({"feature-logger": 4, "batch-scorer": 1}, declared)
    # The broker's count rules when it differs from the declaration.
    fewer = {**declared, Topic.SCORING_REQUESTS: 2}
    with pytest.raises(partitions.TooManyReplicasError, match=r"scoring\.requests.*at most 2"):
        partitions.check_replicas({"feature-logger": 1, "batch-scorer": 3}, fewer)


def test_stack_up_refuses_too_many_replicas_before_starting_anything(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_BATCH_SCORER_REPLICAS", "4")
    reports: list[str] = []
    with pytest.raises(partitions.TooManyReplicasError, match="STACK_BATCH_SCORER_REPLICAS=4"):
        lifecycle.up(StackSettings(), reports.append)
    assert reports == []
    assert not (stack_env / "stack" / "run").exists()
