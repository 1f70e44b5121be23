"""The on-disk spool: bounded, first in first out, acknowledged by prefix, kept across restarts,
with one writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from driftloop.events.spool import Spool, SpoolInUseError, SpoolRecord


def _records(count: int, start: int = 0) -> list[SpoolRecord]:
    return [
        SpoolRecord("predictions", f"k{i}".encode(), f"v{i}".encode())
        for i in range(start, start + count)
    ]


def test_replays_in_arrival_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    spool.extend(_records(3))
    spool.extend(_records(2, start=3))

    read = spool.peek(10)

    assert [item.record.value for item in read] == [b"v0", b"v1", b"v2", b"v3", b"v4"]
    assert spool.depth == 5


def test_acknowledge_removes_the_prefix_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=100)
    spool.extend(_records(5))
    first_two = spool.peek(2)

    spool.acknowledge(first_two[-1].position)

    assert [item.record.key for item in spool.peek(10)] == [b"k2", b"k3", b"k4"]
    assert spool.depth == 3


def test_full_spool_refuses_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=3)

    refused = spool.extend(_records(5))

    assert refused == 2
    assert spool.dropped == 2
    assert spool.full
    assert [item.record.value for item in spool.peek(10)] == [b"v0", b"v1", b"v2"]


def test_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_records=10)
    spool.extend([SpoolRecord("labels", None, b"x"), *_records(1)])
    spool.close()

    reopened = Spool(path, max_records=10)

    assert reopened.depth == 2
    assert reopened.peek(1)[0].record == SpoolRecord("labels", None, b"x")


def test_positions_keep_growing_after_everything_was_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_records=10)
    spool.extend(_records(2))
    spool.acknowledge(spool.peek(2)[-1].position)
    spool.extend(_records(1, start=2))

    (item,) = spool.peek(5)

    assert item.position == 3
    assert item.record.value == b"v2"


def test_refuses_a_zero_bound(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        Spool(tmp_path / "spool.sqlite3", max_records=0)


def test_a_second_writer_is_refused_while_the_first_holds_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    first = Spool(path, max_records=10)
    first.extend(_records(1))
    # Another process opening the same file: flock locks are per open file description.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from driftloop.events.spool import Spool; "
            "Spool(Path(sys.argv[1]), max_records=10)",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert probe.returncode != 0
    assert "SpoolInUseError" in probe.stderr
    assert f"pid {os.getpid()}" in probe.stderr
    assert "GATEWAY_SPOOL_PATH" in probe.stderr
    with pytest.raises(SpoolInUseError):
        Spool(path, max_records=10)  # a second open in this process is refused too
    first.close()
    again = Spool(path, max_records=10)  # let go of: the next writer opens it
    assert again.depth == 1
    again.close()
