"""Versioned SQL migrations of the platform database, applied by the services at start.

Plain numbered SQL files (``0001_<name>.sql`` …) rather than Alembic: the services talk to
Postgres through asyncpg only, with no ORM models to autogenerate from, so a migration is
reviewed as the SQL that runs. The pending files run in one transaction (all or none), each
recorded in ``schema_migrations`` with its checksum (an edited, already-applied file is
refused). A transaction-scoped advisory lock serialises replicas starting together.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).parent
SCHEMA_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database's applied migrations disagree with the files shipped."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def shipped_migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; refuses gaps and repeated versions."""
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..n without gaps, got {versions}")
    return migrations


async def apply_migrations(
    connection: asyncpg.Connection, schema: str = "public", folder: Path = MIGRATIONS_DIR
) -> list[int]:
    """Create ``schema`` if needed and apply the missing migrations; returns the versions run."""
    if not SCHEMA_NAME.match(schema):
        raise MigrationError(f"invalid schema name {schema!r}")
    applied_now: list[int] = []
    async with connection.transaction():
        # Lock per schema: replicas starting together wait for the first one's migrations.
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext('driftloop.storage.migrations.' || $1::text))",
            schema,
        )
        # The schema name matched SCHEMA_NAME above, so it is a plain identifier.
        await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await connection.execute(f"SET LOCAL search_path TO {schema}")
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await connection.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {row["version"]: row for row in rows}
        shipped = shipped_migrations(folder)
        unknown = sorted(set(applied) - {migration.version for migration in shipped})
        if unknown:
            raise MigrationError(
                f"schema {schema} has migrations {unknown} this code does not know; "
                "run a newer release"
            )
        for migration in shipped:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after it "
                        f"was applied to schema {schema}; add a new migration instead"
                    )
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            log.info(
                "applied migration %04d_%s to schema %s", migration.version, migration.name, schema
            )
            applied_now.append(migration.version)
    return applied_now
