"""Request helpers shared by the two stand-ins."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


async def sleep_unless_disconnected(request: Request, seconds: float) -> None:
    """Sleep, but stop as soon as the client hangs up.

    The hang knobs exist to make a client time out. Once it has, a handler still asleep would keep
    uvicorn's graceful shutdown waiting for minutes and pile up tasks under load, so the sleep ends
    with the connection rather than with the clock.
    """
    if seconds <= 0:
        return
    # With the body already read, the next message the server can hand us is the disconnect.
    await request.body()

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()


async def json_body(request: Request) -> Any:
    """The parsed body, or a ValueError that the caller turns into a 400."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


def bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": "Bad Request", "message": message}, status_code=400)
