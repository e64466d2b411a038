"""ServerThread and serve_sandbox: real sockets on loopback, started and stopped cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from service.sandbox import KEYS_PATH, ServerThread, serve_sandbox
from service.tokens import is_key_shaped


async def hello(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def test_port_zero_picks_a_free_port_and_stop_releases_it():
    with ServerThread(Starlette(routes=[Route("/", hello)])) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url).text == "hello"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url)
    server.stop()  # idempotent


def test_lifespan_runs_on_start_and_stop():
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    with ServerThread(Starlette(lifespan=lifespan)):
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]


def test_a_port_in_use_fails_loudly():
    with ServerThread(Starlette()) as server, pytest.raises(RuntimeError, match="failed to start"):
        ServerThread(Starlette(), port=server.port).start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_sandbox_serves_both_and_prints_no_token(capsys):
    sm_port, gh_port, rc_port = _free_port(), _free_port(), _free_port()

    async def scenario() -> tuple[list[dict[str, object]], int]:
        task = asyncio.create_task(serve_sandbox("127.0.0.1", sm_port, gh_port, rc_port, keys=3))
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                assert not task.done(), "serve_sandbox ended on its own"
                try:
                    keys = (await client.get(f"http://127.0.0.1:{sm_port}/_sandbox/keys")).json()
                    status = (await client.get(f"http://127.0.0.1:{gh_port}{KEYS_PATH}")).status_code
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return keys, status

    keys, status = asyncio.run(scenario())
    assert status == 200
    assert len(keys) == 3
    assert all(is_key_shaped(k["token"]) for k in keys)
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{sm_port}" in out
    assert re.search(rf"LEAK_RESPONDER_GITHUB_KEYS_URL=http://127\.0\.0\.1:{gh_port}{KEYS_PATH}", out)
    assert not any(k["token"] in out for k in keys)
    # Every seeded org's channels point at the receiver the sandbox runs.
    assert {c["url"].rsplit("/", 2)[0] for k in keys for c in k["channels"]} == {
        f"http://127.0.0.1:{rc_port}"
    }
    assert f"Channel receiver:    http://127.0.0.1:{rc_port}" in out
    for port in (sm_port, gh_port, rc_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats")
