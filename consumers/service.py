"""The entry point every background service shares: ``python -m consumers.<name> [run | status]``.

Logging, settings (a missing or invalid variable exits 2 with its name, no traceback), the
Prometheus endpoint and the event loop are set up the same way for each service; the service
brings its ``run`` coroutine and, optionally, a ``status`` report of its table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import uvloop
from prometheus_client import start_http_server

from driftloop.leader import LeaderLock, LeadershipLostError, run_as_leader
from driftloop.runtime import tune_garbage_collector
from driftloop.settings import ServiceSettings, SettingsError, load_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


S = TypeVar("S", bound=ServiceSettings)


def serve(
    module: str,
    settings_class: type[S],
    run: Callable[[S], Coroutine[Any, Any, None]],
    *,
    status: Callable[[S, int], Coroutine[Any, Any, None]] | None = None,
    before_run: Callable[[], None] | None = None,
    leader: Callable[[S], LeaderLock] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Parse the command line, load the settings, then run the service or print its status.

    With ``leader``, ``run`` starts only once this replica holds that lock (a singleton
    service at N replicas); losing it stops the service with exit code 3, to be restarted
    as a standby.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    commands = ("run", "status") if status is not None else ("run",)
    parser.add_argument("command", nargs="?", choices=commands, default="run")
    if status is not None:
        parser.add_argument("--limit", type=int, default=20, help="status: rows shown")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command == "run" else logging.WARNING, format=LOG_FORMAT
    )
    log = logging.getLogger(module)
    try:
        settings = load_settings(settings_class)
    except SettingsError as error:
        log.error("%s", error)  # noqa: TRY400 - the message names the variables; no traceback
        sys.exit(2)
    if args.command == "status" and status is not None:
        asyncio.run(status(settings, args.limit))
        return
    if before_run is not None:
        before_run()
    start_http_server(settings.metrics_port)
    tune_garbage_collector()
    if leader is None:
        uvloop.run(run(settings))
        return
    lock = leader(settings)
    try:
        uvloop.run(run_as_leader(lock, lambda: run(settings)))
    except LeadershipLostError as error:
        log.error("%s", error)  # noqa: TRY400 - the restart is the remedy, not the traceback
        sys.exit(3)
