"""Installs what the native stack runs, from the registries this project may use.

- PostgreSQL and Prometheus (with promtool): Debian packages, through apt.
- Apache Kafka and S3Proxy: jars from Maven Central, resolved by Maven with the poms beside
  this module, into the stack's ``opt`` folder (Maven's own cache makes a second copy cheap).
- MLflow, Airflow, supervisord: Python packages of this project's locked environment.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from driftloop_tools.stack.programs import kafka_home, postgres_bindir, runs_as_root, s3proxy_jar
from driftloop_tools.stack.settings import StackSettings

MAVEN_POMS = Path(__file__).resolve().parent / "maven"

Report = Callable[[str], None]


class InstallError(RuntimeError):
    """A runtime the stack needs could not be installed."""


def _missing_debian_packages() -> list[str]:
    missing = []
    try:
        postgres_bindir()
    except FileNotFoundError:
        missing.append("postgresql")
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        missing.append("prometheus")
    if shutil.which("java") is None:
        missing.append("openjdk-17-jre-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    return missing


def ensure_debian_packages(report: Report) -> None:
    missing = _missing_debian_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if not runs_as_root():
        raise InstallError(f"missing system packages; run: sudo {' '.join(command)}")
    report(f"installing Debian packages: {', '.join(missing)}")
    environment = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)  # noqa: S607
    subprocess.run(command, check=True, env=environment)  # noqa: S603
    still_missing = _missing_debian_packages()
    if still_missing:
        raise InstallError(f"apt-get did not provide: {', '.join(still_missing)}")


def _maven_copy(pom: Path, destination: Path, properties: dict[str, str]) -> None:
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(pom),
        *(f"-D{key}={value}" for key, value in properties.items()),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={partial}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise InstallError(f"maven could not resolve {pom.name}:\n{result.stdout}{result.stderr}")
    # Rename last, so an interrupted download never looks installed.
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(destination, ignore_errors=True)
    partial.rename(destination)


def ensure_kafka(settings: StackSettings, report: Report) -> None:
    libs = kafka_home(settings) / "libs"
    if (libs / f"kafka_2.13-{settings.kafka_version}.jar").exists():
        return
    report(f"resolving Apache Kafka {settings.kafka_version} from Maven Central")
    _maven_copy(MAVEN_POMS / "kafka.pom.xml", libs, {"kafka.version": settings.kafka_version})


def ensure_s3proxy(settings: StackSettings, report: Report) -> None:
    jar = s3proxy_jar(settings)
    if jar.exists():
        return
    report(f"resolving S3Proxy {settings.s3proxy_version} from Maven Central")
    _maven_copy(
        MAVEN_POMS / "s3proxy.pom.xml", jar.parent, {"s3proxy.version": settings.s3proxy_version}
    )


def install(settings: StackSettings, report: Report) -> None:
    """Install every runtime that is missing; a no-op when all are there."""
    ensure_debian_packages(report)
    ensure_kafka(settings, report)
    ensure_s3proxy(settings, report)
