"""A lean HTTP/1.1 client for the three Supermemory calls (lookup, revoke, probe).

Why not httpx, which the rest of the service uses: on the ack path every coalesced lookup is one
call, and under load httpx with httpcore and anyio cost about a fifth of the event loop's time,
far more than the HTTP it speaks (see BENCHMARKS.md, ack section). This client keeps what those
calls need and nothing else:

- **pooling**: kept-alive connections per origin, at most `connections` idle ones kept; a kept
  connection the server closed meanwhile is found out before the request is answered, and the
  request goes once more on a new connection (the three calls are safe to repeat);
- **one timeout per call**, connection and TLS handshake included (`LEAK_RESPONDER_HTTP_TIMEOUT`
  is documented as seconds per outbound call);
- TLS with httpx's own trust (certifi, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), the response parsed by
  httptools (C, already here as uvicorn's parser), `Content-Length`, chunked or read-to-close
  bodies, gzip and deflate, a cap on the body's size; redirects are never followed;
- failures as one exception with a reason code (timeout, connection error, bad response), never
  carrying a header's value: the probe's `Authorization` is the leaked key itself.

It does not use proxies from the environment: like the channels' sender, it connects directly.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import httpx

from service.reasons import Reason

# A lookup of 100 hashes answers a few KiB; anything near this is not an answer of ours.
MAX_BODY = 8 * 2**20
_FORBIDDEN = frozenset("\r\n\0")


class HttpFailure(Exception):
    """A call that got no answer we can read; `reason` says which way, and nothing else is said."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(str(reason))
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    # Lower-cased names; a repeated header keeps its last value (the calls read only Retry-After).
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class _Stale(Exception):
    """A kept-alive connection closed before any byte of the answer: the request may go again."""


class _Exchange(asyncio.Protocol):
    """One connection: sends a request, parses its answer with httptools, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._keep = False
        self._reset()

    def _reset(self) -> None:
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        self._headers_done = False
        self._framed = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._waiter is None:
            # Bytes nobody asked for (a server talking out of turn): this connection is not reusable.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(HttpFailure(Reason.BAD_RESPONSE))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._framed:
            # Neither a length nor chunks: the body is whatever came before the close.
            self._finish(keep=False)
        elif self._received:
            self._fail(HttpFailure(Reason.CONNECTION_ERROR))
        else:
            self._fail(_Stale())

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")
        if key in ("content-length", "transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            raise ValueError("answer too large")  # httptools turns it into HttpParserCallbackError
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._finish(keep=self._parser.should_keep_alive())

    # -- the exchange ------------------------------------------------------------------------------

    async def send(self, request: bytes) -> tuple[Answer, bool]:
        """The answer, and whether the connection may carry another request."""
        assert self.transport is not None
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._keep = False
        self.transport.write(request)
        try:
            return await waiter, self._keep
        finally:
            self._waiter = None

    def _finish(self, keep: bool) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._keep = keep and not self.closed
        try:
            body = _decoded(b"".join(self._body), self._headers.get("content-encoding", ""))
        except HttpFailure as exc:
            waiter.set_exception(exc)
            return
        waiter.set_result(Answer(self._parser.get_status_code(), self._headers, body))

    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(body: bytes, encoding: str) -> bytes:
    """The body without its Content-Encoding (we ask for none, but a server may send gzip anyway)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HttpFailure(Reason.BAD_RESPONSE)
    try:
        # wbits 47: gzip or zlib by the header; a raw deflate stream is tried after.
        return zlib.decompress(body, 47)
    except zlib.error:
        pass
    try:
        return zlib.decompress(body, -15)
    except zlib.error:
        raise HttpFailure(Reason.BAD_RESPONSE) from None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: str


class HttpClient:
    """Requests to a few fixed origins over kept-alive connections (see the module's docstring).

    It does not bound how many requests run at once: its caller does (the Supermemory client's
    semaphore), and it keeps at most `connections` idle connections per origin.
    """

    def __init__(self, *, timeout: float, connections: int, user_agent: str) -> None:
        self._timeout = timeout
        self._keep = connections
        self._user_agent = user_agent
        self._idle: dict[_Origin, collections.deque[_Exchange]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def request(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes = b""
    ) -> Answer:
        """One call within the timeout; HttpFailure when it got no readable answer."""
        origin, target = self._split(url)
        head = [
            f"{method} {target} HTTP/1.1",
            f"Host: {origin.host_header}",
            f"User-Agent: {self._user_agent}",
        ]
        for name, value in (headers or {}).items():
            if _FORBIDDEN.intersection(value) or _FORBIDDEN.intersection(name):
                # A value that would end the header early (never ours to send; never echoed).
                raise HttpFailure(Reason.BAD_RESPONSE)
            head.append(f"{name}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        try:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(origin, request)
        except TimeoutError:
            raise HttpFailure(Reason.TIMEOUT) from None

    async def _exchange(self, origin: _Origin, request: bytes) -> Answer:
        idle = self._idle.setdefault(origin, collections.deque())
        while True:
            reused = bool(idle)
            connection = idle.pop() if reused else await self._connect(origin)
            if reused and connection.closed:
                continue
            try:
                answer, keep = await connection.send(request)
            except _Stale:
                if reused:
                    continue  # closed by the server while kept: once more, on another connection
                raise HttpFailure(Reason.CONNECTION_ERROR) from None
            except BaseException:
                # A timeout or a cancelled caller leaves an answer half-read: never reused.
                connection.close()
                raise
            if keep and not self._closed and len(idle) < self._keep:
                idle.append(connection)
            else:
                connection.close()
            return answer

    async def _connect(self, origin: _Origin) -> _Exchange:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            tls = self._tls
        try:
            _, connection = await loop.create_connection(
                _Exchange, origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
            )
        except OSError:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise HttpFailure(Reason.CONNECTION_ERROR) from None
        return connection

    @staticmethod
    def _split(url: str) -> tuple[_Origin, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise HttpFailure(Reason.CONNECTION_ERROR)
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        origin = _Origin(scheme, parts.hostname, port, name if port == default else f"{name}:{port}")
        return origin, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
