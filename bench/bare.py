"""The ack benchmark's baseline: a bare Starlette endpoint that only verifies the signature.

It uses the service's own verifier and key cache, so the ratio isolates what the real endpoint adds
(the durable commit and the labels), not a difference in crypto code.
"""

from __future__ import annotations

import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.inbound import InboundError, KeyCache, reporters, signed_by


def main(keys_url: str, port: int) -> None:
    reporter = reporters(keys_url, None, None)["github"]
    cache = KeyCache(reporter, httpx.AsyncClient())

    async def alert(request: Request) -> Response:
        body = await request.body()
        try:
            (await signed_by(reporter, cache, request.headers)).verify(body)
        except InboundError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        return JSONResponse([])

    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/alert", alert, methods=["POST"]), Route("/livez", livez)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
