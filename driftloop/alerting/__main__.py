"""``python -m driftloop.alerting``: serve the alert receiver on ALERT_RECEIVER_HOST:PORT."""

from __future__ import annotations

import logging

import uvicorn

from driftloop.alerting.receiver import create_app
from driftloop.alerting.settings import AlertReceiverSettings
from driftloop.settings import load_settings


def main() -> None:
    """Run the receiver."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = load_settings(AlertReceiverSettings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
