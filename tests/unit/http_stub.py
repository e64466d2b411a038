"""A real HTTP/1.1 server on loopback, in the test's own event loop, for the Supermemory client's unit
tests: each request is handed to `handler(httpx.Request)` and its `httpx.Response` sent back, so the
tests read like httpx's mock transport while the client speaks to a real socket.

A handler may also return `SLOW` (answer nothing for longer than any client timeout here) or
`HANG_UP` (close the connection without an answer), or raw bytes to send as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import h11
import httpx

SLOW = object()
HANG_UP = object()

Handler = Callable[[httpx.Request], object]


class Stub:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, reader)
                if request is None:
                    return
                host = dict(request.headers).get(b"host", b"").decode()
                outcome = self.handler(
                    httpx.Request(
                        request.method.decode(),
                        f"http://{host}{request.target.decode()}",
                        headers=request.headers,
                        content=body,
                    )
                )
                if outcome is SLOW:
                    await asyncio.sleep(30)
                    return
                if outcome is HANG_UP:
                    return
                if isinstance(outcome, bytes):
                    writer.write(outcome)
                    await writer.drain()
                    return
                assert isinstance(outcome, httpx.Response)
                content = outcome.content
                headers = [(k, v) for k, v in outcome.headers.items() if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(content))))
                writer.write(conn.send(h11.Response(status_code=outcome.status_code, headers=headers)))
                writer.write(conn.send(h11.Data(data=content)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                return None, b""
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            return None, b""


@contextlib.asynccontextmanager
async def stub(handler: Handler) -> AsyncIterator[Stub]:
    """The stub, listening on a free loopback port (its `url`) until the block ends."""
    server_stub = Stub(handler)
    server = await asyncio.start_server(server_stub.serve, "127.0.0.1", 0)
    server_stub.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield server_stub
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)
