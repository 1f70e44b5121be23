"""Schemathesis with every check against the live gateway of the local stack.

The gateway the stack runs (``STACK_GATEWAY_PORT``), with its own configuration (``GATEWAY_*``:
API keys, admin token) and its own OpenAPI document: the published contract of the running
service, over real HTTP, with its model from the real MLflow registry and its events going to
the real Kafka. The unit test (tests/unit/test_gateway_schemathesis.py) holds the app to the
same checks in process.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies

from driftloop.settings import load_settings
from driftloop_tools.stack.settings import StackSettings
from gateway.settings import GatewaySettings


@pytest.fixture(scope="module")
def gateway_settings() -> GatewaySettings:
    return load_settings(GatewaySettings)


@pytest.fixture(scope="module")
def gateway_url(stack_settings: StackSettings) -> str:
    return f"http://127.0.0.1:{stack_settings.gateway_port}"


async def test_live_gateway_holds_every_schemathesis_check(
    gateway_url: str,
    gateway_settings: GatewaySettings,
    served_champion: str,
) -> None:
    # Without a model every /predict is a 503, which schemathesis rightly calls a server error:
    # the fixture makes sure the gateway serves a champion.

    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    # Valid credentials: the auth check proves them enforced (it sends the case again without
    # them, and with wrong ones, and expects 401).
    headers = {"Authorization": f"Bearer {gateway_settings.admin_token.get_secret_value()}"}
    if gateway_settings.api_keys:
        headers["X-API-Key"] = gateway_settings.api_keys[0].get_secret_value()
    cases = strategies.one_of(
        schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
        schema.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @hypothesis.given(case=cases)
    @hypothesis.settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        database=None,
    )
    def conforms(case: Any) -> None:
        # call_and_validate runs every built-in check of schemathesis 4 by default.
        case.call_and_validate(base_url=gateway_url, headers=headers)

    conforms()
