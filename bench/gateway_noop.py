"""The framework ceiling for the gateway benchmark: a FastAPI POST that reads the body, no work."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> Response:
    """Read the body and answer a constant."""
    await request.body()
    return Response(b'{"prediction":0.0}', media_type="application/json")
