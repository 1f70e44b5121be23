"""Idempotent set-up of the stack's state: cluster, roles, databases, topics, buckets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import asyncpg
from botocore.exceptions import ClientError

from driftloop_tools.stack.programs import (
    airflow_environment,
    kafka_cluster_id,
    kafka_java_command,
    postgres_bindir,
    runs_as_root,
    venv_bin,
)
from driftloop_tools.stack.readiness import s3_client
from driftloop_tools.stack.settings import StackSettings

PLATFORM_DATABASES = ("driftloop", "mlflow", "airflow")


def _as_superuser(settings: StackSettings, command: list[str]) -> list[str]:
    if runs_as_root():
        return ["runuser", "-u", settings.postgres_superuser, "--", *command]
    return command


def _chown_to_superuser(settings: StackSettings, path: Path) -> None:
    if runs_as_root():
        shutil.chown(path, user=settings.postgres_superuser, group=settings.postgres_superuser)


def prepare_folders(settings: StackSettings) -> None:
    for folder in (settings.logs, settings.data, settings.run, settings.runtimes):
        folder.mkdir(parents=True, exist_ok=True)
    (settings.data / "s3").mkdir(exist_ok=True)
    for folder in (settings.postgres_root, settings.postgres_socket_dir):
        folder.mkdir(parents=True, exist_ok=True)
        _chown_to_superuser(settings, folder)


def init_postgres_cluster(settings: StackSettings) -> bool:
    """Create the database cluster on first start; returns whether it was created."""
    data = settings.postgres_data
    if (data / "PG_VERSION").exists():
        return False
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    _chown_to_superuser(settings, data)
    command = [
        str(postgres_bindir() / "initdb"),
        "-D",
        str(data),
        "-U",
        settings.postgres_superuser,
        "--encoding=UTF8",
        "--locale=C.UTF-8",
        # The superuser only over the local socket; every TCP login needs a password.
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
    ]
    result = subprocess.run(  # noqa: S603 - the Debian initdb binary
        _as_superuser(settings, command), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{result.stdout}{result.stderr}")
    return True


async def provision_postgres(settings: StackSettings) -> None:
    """The platform's role and its databases (platform, MLflow, Airflow); safe to repeat."""
    role = settings.postgres.user
    password = settings.postgres.password.get_secret_value()
    connection = await asyncpg.connect(
        host=str(settings.postgres_socket_dir),
        port=settings.postgres.port,
        user=settings.postgres_superuser,
        database="postgres",
    )
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        verb = "ALTER" if exists else "CREATE"
        # Utility statements take no bind parameters; quote_ident/quote_literal do the escaping.
        statement = await connection.fetchval(
            f"SELECT format('{verb} ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
            role,
            password,
        )
        await connection.execute(statement)
        for database in (settings.postgres.db, *PLATFORM_DATABASES):
            found = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", database
            )
            if not found:
                create = await connection.fetchval(
                    "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)",
                    database,
                    role,
                )
                await connection.execute(create)
    finally:
        await connection.close()


def format_kafka_storage(settings: StackSettings) -> bool:
    """Format the KRaft log folder on first start; returns whether it was formatted."""
    logs = settings.data / "kafka"
    if (logs / "meta.properties").exists():
        return False
    logs.mkdir(parents=True, exist_ok=True)
    command = kafka_java_command(
        settings,
        "kafka.tools.StorageTool",
        "format",
        "--cluster-id",
        kafka_cluster_id(),
        "--config",
        str(settings.run / "kafka-server.properties"),
        "--ignore-formatted",
    )
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise RuntimeError(f"kafka storage format failed:\n{result.stdout}{result.stderr}")
    return True


def create_buckets(settings: StackSettings) -> list[str]:
    client = s3_client(settings)
    created = []
    for bucket in (settings.s3.data_bucket, settings.s3.mlflow_bucket):
        try:
            client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in {
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            }:
                raise
        else:
            created.append(bucket)
    return created


def migrate_airflow(settings: StackSettings) -> None:
    """``airflow db migrate``: creates or upgrades the metadata schema (idempotent)."""
    environment = {**os.environ, **airflow_environment(settings)}
    result = subprocess.run(  # noqa: S603 - this environment's airflow
        [venv_bin("airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )
    log = settings.logs / "airflow-db-migrate.log"
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed; see {log}")
