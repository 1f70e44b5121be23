"""supervisord as the native stack's process supervisor: its configuration and its control.

Every program is declared with ``autostart=false``: ``Supervisor.start`` starts them in
dependency order and the stack waits for each stage to be ready before the next one, so no
service crash-loops against a dependency that is still booting.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
from supervisor.xmlrpc import SupervisorTransport

from driftloop_tools.stack.programs import Program
from driftloop_tools.stack.settings import StackSettings


class SupervisorError(RuntimeError):
    """supervisord could not be started or refused an operation."""


@dataclass(frozen=True, slots=True)
class ProgramState:
    name: str
    state: str
    pid: int
    uptime_seconds: int
    description: str
    resident_bytes: int


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render_config(settings: StackSettings, programs: Iterable[Program]) -> str:
    """supervisord.conf for these programs; logs land in the stack's logs folder."""
    run, logs = settings.run, settings.logs
    sections = [
        "[unix_http_server]",
        f"file={run / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        f"pidfile={run / 'supervisord.pid'}",
        f"directory={settings.root}",
        "logfile_maxbytes=10MB",
        "logfile_backups=2",
        "nodaemon=false",
        "minfds=4096",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{run / 'supervisor.sock'}",
        "",
    ]
    for program in programs:
        # `%` starts supervisord's own interpolation, so literal ones are doubled.
        command = " ".join(_quote(part) if " " in part else part for part in program.command)
        sections += [
            f"[program:{program.name}]",
            f"command={command.replace('%', '%%')}",
            "autostart=false",
            "autorestart=unexpected",
            "startsecs=3",
            "startretries=5",
            f"stopsignal={program.stop_signal}",
            f"stopwaitsecs={program.stop_wait_seconds}",
            # Airflow and Java spawn children; stop and kill the whole process group.
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={logs / (program.name + '.log')}",
            "stdout_logfile_maxbytes=50MB",
            "stdout_logfile_backups=2",
        ]
        if program.user:
            sections.append(f"user={program.user}")
        if program.directory:
            sections.append(f"directory={program.directory}")
        if program.environment:
            pairs = ",".join(
                f"{key}={_quote(value)}" for key, value in sorted(program.environment.items())
            )
            sections.append(f"environment={pairs}")
        sections.append("")
    return "\n".join(sections)


class Supervisor:
    """The stack's supervisord, reached over its unix socket."""

    def __init__(self, settings: StackSettings) -> None:
        self._settings = settings
        self.config_path = settings.run / "supervisord.conf"
        self.socket_path = settings.run / "supervisor.sock"

    def _proxy(self) -> Any:
        transport = SupervisorTransport(None, None, serverurl=f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            state = self._proxy().supervisor.getState()
        except (OSError, xmlrpc.client.Fault):
            return False
        return cast(dict[str, Any], state).get("statename") == "RUNNING"

    def config_changed(self, programs: Iterable[Program]) -> bool:
        """Whether these programs differ from the configuration supervisord runs with."""
        if not self.config_path.exists():
            return True
        return self.config_path.read_text() != render_config(self._settings, programs)

    def write_config(self, programs: Iterable[Program]) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self._settings, programs))
        # Program environments carry the stack's secrets.
        self.config_path.chmod(0o600)

    def launch(self) -> None:
        """Start supervisord (it daemonises) and wait until it answers."""
        if self.is_running():
            return
        self._settings.logs.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        supervisord = Path(sys.executable).parent / "supervisord"
        subprocess.run(  # noqa: S603 - our own virtualenv's supervisord with our config
            [str(supervisord), "-c", str(self.config_path)], check=True, env=os.environ.copy()
        )
        deadline = time.monotonic() + 30
        while not self.is_running():
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"supervisord did not come up; see {self._settings.logs / 'supervisord.log'}"
                )
            time.sleep(0.2)

    def reload_config(self) -> None:
        """Apply a changed supervisord.conf: add new programs, drop removed ones."""
        added, changed, removed = self._proxy().supervisor.reloadConfig()[0]
        for name in removed:
            self._proxy().supervisor.stopProcessGroup(name)
            self._proxy().supervisor.removeProcessGroup(name)
        for name in changed:
            self._proxy().supervisor.stopProcessGroup(name)
            self._proxy().supervisor.removeProcessGroup(name)
            self._proxy().supervisor.addProcessGroup(name)
        for name in added:
            self._proxy().supervisor.addProcessGroup(name)

    def start(self, name: str) -> None:
        """Start a program unless it is already running; readiness is the caller's probe."""
        if self.state(name).state in {"RUNNING", "STARTING"}:
            return
        try:
            self._proxy().supervisor.startProcess(name, False)
        except xmlrpc.client.Fault as fault:
            log = self._settings.logs / f"{name}.log"
            raise SupervisorError(
                f"{name} failed to start ({fault.faultString}); see {log}"
            ) from None

    def stop(self, name: str) -> None:
        if self.state(name).state in {"RUNNING", "STARTING", "BACKOFF"}:
            self._proxy().supervisor.stopProcess(name, True)

    def stop_together(self, names: Iterable[str], timeout_seconds: float = 120) -> None:
        """Send every running program of ``names`` its stop signal at once; wait until all
        have stopped (supervisord kills what outlives its stopwaitsecs)."""
        wanted = set(names)
        running = [
            state.name
            for state in self.states()
            if state.name in wanted and state.state in {"RUNNING", "STARTING", "BACKOFF"}
        ]
        for name in running:
            self._proxy().supervisor.stopProcess(name, False)
        deadline = time.monotonic() + timeout_seconds
        while any(
            state.name in wanted and state.state in {"RUNNING", "STARTING", "STOPPING"}
            for state in self.states()
        ):
            if time.monotonic() > deadline:
                raise SupervisorError(f"still stopping after {timeout_seconds:.0f}s: {running}")
            time.sleep(0.25)

    def state(self, name: str) -> ProgramState:
        info = cast(dict[str, Any], self._proxy().supervisor.getProcessInfo(name))
        return _program_state(info)

    def states(self) -> list[ProgramState]:
        infos = cast(list[dict[str, Any]], self._proxy().supervisor.getAllProcessInfo())
        return [_program_state(info) for info in infos]

    def shutdown(self, timeout_seconds: float = 180) -> None:
        """Stop every program, then supervisord itself, and wait for it to exit."""
        if not self.is_running():
            return
        pid_file = self._settings.run / "supervisord.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        self._proxy().supervisor.shutdown()
        deadline = time.monotonic() + timeout_seconds
        while pid is not None and _alive(pid):
            if time.monotonic() > deadline:
                raise SupervisorError(f"supervisord (pid {pid}) still running after shutdown")
            time.sleep(0.25)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _program_state(info: dict[str, Any]) -> ProgramState:
    now, start = int(info.get("now", 0)), int(info.get("start", 0))
    running = info["statename"] == "RUNNING"
    pid = int(info.get("pid", 0))
    return ProgramState(
        name=str(info["name"]),
        state=str(info["statename"]),
        pid=pid,
        uptime_seconds=now - start if running and start else 0,
        description=str(info.get("description", "")),
        resident_bytes=_resident_bytes(pid) if running else 0,
    )


def _resident_bytes(pid: int) -> int:
    """Memory of a program with all its children (Airflow forks workers).

    Proportional set size where the kernel exposes it, so pages shared between a parent and
    its forks (or Postgres' shared buffers) are counted once in the total.
    """
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += getattr(process.memory_full_info(), "pss", process.memory_info().rss)
    return total
