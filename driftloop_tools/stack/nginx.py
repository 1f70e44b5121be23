"""nginx in front of the native stack's gateway replicas: its configuration and its program.

nginx (Debian's package) listens on the gateway's port (``STACK_GATEWAY_PORT``) and spreads
requests over the replicas (``STACK_GATEWAY_REPLICAS``, from ``STACK_GATEWAY_REPLICA_PORT``),
as the Kubernetes Service does in the Helm chart. It runs in the foreground under supervisord;
``driftloop stack up`` renders the file from the settings and has a running nginx re-read a
changed one (SIGHUP: new workers, no dropped connection).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

from driftloop_tools.stack.programs import Program, runs_as_root
from driftloop_tools.stack.settings import StackSettings

CONFIG_FILE: Final = "nginx.conf"
UPSTREAM: Final = "gateway_replicas"


def nginx_config_path(settings: StackSettings) -> Path:
    return settings.run / CONFIG_FILE


def nginx_prefix(settings: StackSettings) -> Path:
    """nginx's working folder: its pid file and the temp folders it insists on creating."""
    return settings.run / "nginx"


def render_nginx_config(settings: StackSettings) -> str:
    prefix = nginx_prefix(settings)
    servers = "\n".join(
        # A replica that refuses connections is skipped for 2 s, then tried again.
        f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;"
        for port in settings.gateway_replica_ports
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root the workers run as nobody, which may not reach the checkout's folders: the
    # request and response are streamed (no buffering to temp files), so they never need to.
    user = "user nobody nogroup;\n" if runs_as_root() else ""
    header = "# Written by `driftloop stack up` from the stack's settings (STACK_*); edits are lost"
    return f"""{header}
daemon off;
{user}pid {prefix / "nginx.pid"};
error_log stderr warn;
# One worker proxies far more requests than the Python replicas behind it serve on a small
# machine; the cores are theirs.
worker_processes 1;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp_paths}
    # The gateway enforces GATEWAY_MAX_BODY_BYTES and answers with its own error body.
    client_max_body_size 0;
    # The gateway keeps connections 75 s (GATEWAY_KEEP_ALIVE_SECONDS); nginx's side toward
    # it closes first (60 s), so nginx never sends on a connection the gateway is closing.
    keepalive_timeout 75s;
    keepalive_requests 100000;

    upstream {UPSTREAM} {{
        least_conn;
{servers}
        keepalive 64;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{settings.gateway_port};

        location / {{
            proxy_pass http://{UPSTREAM};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering off;
            proxy_buffering off;
            # A refused connection (a replica restarting) moves the request to another
            # replica: nothing was sent yet, so even a POST is safe to pass on. A request
            # already sent is never repeated (nginx's rule for non-idempotent methods).
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def write_nginx_config(settings: StackSettings) -> bool:
    """Write the rendered configuration; whether its content changed."""
    path = nginx_config_path(settings)
    text = render_nginx_config(settings)
    nginx_prefix(settings).mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)
    return True


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_program(settings: StackSettings) -> Program:
    return Program(
        name="nginx",
        command=[
            nginx_binary(),
            "-p",
            str(nginx_prefix(settings)),
            "-c",
            str(nginx_config_path(settings)),
            # Before reading its configuration nginx opens its compiled-in error log
            # (/var/log/nginx, root's); stderr goes to the stack's log instead.
            "-e",
            "stderr",
        ],
        # QUIT is nginx's graceful stop: finish the requests in flight, then exit.
        stop_signal="QUIT",
    )
