"""The durable log of alert notifications: one SQLite file, written before the receiver answers.

Why a file and not the platform's Postgres: the receiver is how an outage reaches someone, so
it must not depend on what may be down. A notification about the platform database (or about
everything, on a bad day) has to land while Postgres refuses connections. SQLite from the
standard library needs no server, and the gateway's spool already trusts it. The journal is
WAL with ``synchronous=FULL``: a notification the receiver answered 200 to has been fsynced,
so not even a power cut loses it; Alertmanager retries anything that was not answered 200.
Notifications are rare (a few a minute at worst), so the fsync per write costs nothing.

Each POST is one ``notification`` row with the body as received (Grafana's extra fields
included), and one ``notified_alert`` row per alert in it, which is what is read back.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import orjson

from driftloop.alerting.notifications import AlertNotification, AlertStatus, StoredAlert

_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS notification (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at TEXT NOT NULL,
        receiver TEXT NOT NULL,
        group_key TEXT NOT NULL,
        status TEXT NOT NULL,
        body BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS notified_alert (
        notification_id INTEGER NOT NULL REFERENCES notification (id),
        position INTEGER NOT NULL,
        status TEXT NOT NULL,
        alertname TEXT NOT NULL,
        severity TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        starts_at TEXT NOT NULL,
        ends_at TEXT,
        labels TEXT NOT NULL,
        annotations TEXT NOT NULL,
        PRIMARY KEY (notification_id, position)
    )
    """,
    "CREATE INDEX IF NOT EXISTS notified_alert_by_name ON notified_alert (alertname)",
)
# Alertmanager's "still firing" end time: no end at all.
_NO_END: Final = datetime(1, 1, 1, tzinfo=UTC)


def _timestamp(moment: datetime) -> str:
    # A fixed width (microseconds always written, UTC) so the text sorts as the time does.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class AlertLog:
    """Append-only log of received notifications; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # isolation_level=None: one explicit transaction per notification. A second process
        # on the same file waits for the write lock instead of failing.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    def record(self, notification: AlertNotification, body: bytes, received_at: datetime) -> int:
        """Store one notification with its alerts, durably; its id."""
        rows = [
            (
                position,
                alert.status.value,
                alert.name,
                alert.severity,
                alert.fingerprint,
                _timestamp(alert.starts_at),
                None
                if alert.ends_at is None or alert.ends_at <= _NO_END
                else _timestamp(alert.ends_at),
                orjson.dumps(alert.labels).decode(),
                orjson.dumps(alert.annotations).decode(),
            )
            for position, alert in enumerate(notification.alerts)
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO notification (received_at, receiver, group_key, status, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        _timestamp(received_at),
                        notification.receiver,
                        notification.group_key,
                        notification.status.value,
                        body,
                    ),
                )
                # An INSERT into a rowid table always sets it.
                notification_id = int(cursor.lastrowid or 0)
                self._db.executemany(
                    "INSERT INTO notified_alert (notification_id, position, status, alertname,"
                    " severity, fingerprint, starts_at, ends_at, labels, annotations)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(notification_id, *row) for row in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return notification_id

    def alerts(
        self,
        *,
        alertname: str | None = None,
        status: AlertStatus | None = None,
        labels: Mapping[str, str] | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[StoredAlert]:
        """Alerts received, newest first, narrowed by name, status, label values and time."""
        conditions: list[str] = []
        parameters: list[object] = []
        if alertname is not None:
            conditions.append("a.alertname = ?")
            parameters.append(alertname)
        if status is not None:
            conditions.append("a.status = ?")
            parameters.append(status.value)
        for key, value in (labels or {}).items():
            # A quoted JSON path takes any label name, dots and dashes included.
            conditions.append("json_extract(a.labels, ?) = ?")
            parameters += [f'$."{key}"', value]
        if since is not None:
            conditions.append("n.received_at >= ?")
            parameters.append(_timestamp(since))
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # Only fixed fragments are joined in; every value is a parameter.
        query = (
            "SELECT n.id, n.received_at, n.receiver, n.group_key, a.status, a.alertname,"  # noqa: S608
            " a.severity, a.labels, a.annotations, a.starts_at, a.ends_at, a.fingerprint"
            " FROM notified_alert a JOIN notification n ON n.id = a.notification_id"
            f" {where} ORDER BY n.id DESC, a.position LIMIT ?"
        )
        with self._lock:
            found = self._db.execute(query, [*parameters, limit]).fetchall()
        return [
            StoredAlert(
                notification_id=row[0],
                received_at=datetime.fromisoformat(row[1]),
                receiver=row[2],
                group_key=row[3],
                status=AlertStatus(row[4]),
                alertname=row[5],
                severity=row[6],
                labels=orjson.loads(row[7]),
                annotations=orjson.loads(row[8]),
                starts_at=datetime.fromisoformat(row[9]),
                ends_at=None if row[10] is None else datetime.fromisoformat(row[10]),
                fingerprint=row[11],
            )
            for row in found
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
