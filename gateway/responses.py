"""The gateway's JSON response: orjson-encoded bytes, no re-validation of what it sends."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONBytesResponse(Response):
    """JSON encoded by orjson (several times faster than the standard library on our payloads)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """The content as UTF-8 JSON."""
        return orjson.dumps(content)
