"""``python -m gateway``: serve the gateway with uvicorn (uvloop, httptools) from the settings."""

from __future__ import annotations

import logging

import uvicorn

from driftloop.runtime import tune_garbage_collector
from driftloop.settings import load_settings
from gateway.app import create_app
from gateway.settings import GatewaySettings


def main() -> None:
    """Run one gateway process on GATEWAY_HOST:GATEWAY_PORT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(GatewaySettings)
    app = create_app(settings)
    tune_garbage_collector()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        # Request lines are counted in Prometheus; a log line per request costs a fifth of
        # the throughput at these rates.
        access_log=False,
        # uvicorn's default (5 s) equals httpx's pool expiry: a request sent as the server
        # closed the connection failed with ReadError in a replay here.
        timeout_keep_alive=settings.keep_alive_seconds,
        log_level="info",
    )


if __name__ == "__main__":
    main()
