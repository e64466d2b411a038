"""The lean HTTP/1.1 client of the Supermemory calls (service/http1.py) against a stub server on
loopback: connections kept and reused, a kept connection the server dropped replaced once, every
body framing, and nothing sent that would end a header early."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest
import uvloop

from service import http1
from service.http1 import HttpClient, HttpFailure
from service.reasons import Reason
from tests.unit.http_stub import HANG_UP, SLOW, stub

GZ = gzip.compress(b"zz")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Each test under both event loops: the service runs on uvloop, whose transports differ."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def client() -> HttpClient:
    return HttpClient(timeout=0.5, connections=4, user_agent="test")


def answers(*outcomes):
    """A handler giving these outcomes in turn, recording each request."""
    seen: list[httpx.Request] = []
    queue = list(outcomes)

    def handler(request: httpx.Request) -> object:
        seen.append(request)
        return queue.pop(0)

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


async def calls(handler, count: int, **request):
    async with stub(handler) as server:
        http = client()
        try:
            found = []
            for _ in range(count):
                try:
                    found.append(
                        await http.request(
                            request.get("method", "GET"),
                            server.url + "/x",
                            request.get("headers"),
                            request.get("body", b""),
                        )
                    )
                except HttpFailure as exc:
                    found.append(exc.reason)
            return found, server.connections
        finally:
            await http.aclose()


def test_a_connection_is_kept_and_reused(run):
    handler = answers(httpx.Response(200, content=b"one"), httpx.Response(200, content=b"two"))
    found, connections = run(calls(handler, 2))
    assert [a.body for a in found] == [b"one", b"two"]
    assert connections == 1


def test_a_kept_connection_the_server_dropped_is_replaced_once(run):
    # The server takes the second request on the kept connection and hangs up without an answer,
    # as one whose keep-alive ran out at that moment would: the request goes again, on a new one.
    handler = answers(httpx.Response(200, content=b"one"), HANG_UP, httpx.Response(200, content=b"two"))
    found, connections = run(calls(handler, 2))
    assert [a.body for a in found] == [b"one", b"two"]
    assert connections == 2


def test_a_new_connection_hung_up_on_is_a_connection_error_not_a_retry(run):
    handler = answers(HANG_UP, httpx.Response(200))
    found, _ = run(calls(handler, 1))
    assert found == [Reason.CONNECTION_ERROR]
    assert len(handler.seen) == 1


def test_a_slow_answer_times_out_and_its_connection_is_not_reused(run):
    handler = answers(SLOW, httpx.Response(200, content=b"after"))
    found, connections = run(calls(handler, 2))
    assert found[0] == Reason.TIMEOUT
    assert found[1].body == b"after"
    assert connections == 2


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close", b"until the close"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(GZ), GZ), b"zz"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "to-close", "gzip", "no-body"],
)  # fmt: skip
def test_every_body_framing(run, raw, body):
    found, _ = run(calls(answers(raw), 1))
    assert found[0].body == body


def test_headers_are_read_by_lower_case_name(run):
    found, _ = run(calls(answers(httpx.Response(429, headers={"Retry-After": "7"})), 1))
    assert (found[0].status_code, found[0].headers["retry-after"]) == (429, "7")


def test_a_truncated_or_garbled_answer_is_a_bad_response_or_connection_error(run):
    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
    garbled = b"SMTP ready\r\n\r\n"
    found, _ = run(calls(answers(truncated), 1))
    assert found == [Reason.CONNECTION_ERROR]
    found, _ = run(calls(answers(garbled), 1))
    assert found == [Reason.BAD_RESPONSE]


def test_an_answer_over_the_size_cap_is_a_bad_response(run, monkeypatch):
    monkeypatch.setattr(http1, "MAX_BODY", 1000)
    found, _ = run(calls(answers(httpx.Response(200, content=b"x" * 1001)), 1))
    assert found == [Reason.BAD_RESPONSE]
    found, _ = run(calls(answers(httpx.Response(200, content=b"x" * 1000)), 1))
    assert found[0].body == b"x" * 1000


def test_a_header_value_that_would_end_the_header_is_never_sent(run):
    handler = answers(httpx.Response(200))
    found, connections = run(calls(handler, 1, headers={"Authorization": "Bearer sm_x\r\nX-Evil: 1"}))
    assert found == [Reason.BAD_RESPONSE]
    assert (handler.seen, connections) == ([], 0)


def test_the_request_as_sent(run):
    handler = answers(httpx.Response(200))
    run(calls(handler, 1, method="POST", headers={"Authorization": "Bearer t"}, body=b'{"a":1}'))
    (request,) = handler.seen
    assert (request.method, request.url.path, request.content) == ("POST", "/x", b'{"a":1}')
    assert request.headers["authorization"] == "Bearer t"
    assert request.headers["content-length"] == "7"
    assert request.headers["host"].startswith("127.0.0.1:")
