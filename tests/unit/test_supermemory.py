"""The Supermemory client's classification of every answer (docs/contract.md §6), against a stub server
on loopback (tests/unit/http_stub.py): this is the one place where the other side of the HTTP boundary
is faked, to reach answers a real server rarely gives."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import pytest

from service.reasons import Reason
from service.supermemory import CallFailed, ProbeVerdict, RevokeResult, SupermemoryClient
from tests.unit.http_stub import HANG_UP, SLOW, stub

TOKEN = "sm_" + "k" * 22 + "_" + "s" * 64


def client_for(url: str) -> SupermemoryClient:
    return SupermemoryClient(
        api_url=url + "/api",
        admin_url=url + "/admin",
        admin_token="admin-secret",
        timeout=0.5,
        concurrency=4,
    )


def run(coro):
    return asyncio.run(coro)


def answer(status: int, body: object = None, headers: dict[str, str] | None = None):
    def handler(request: httpx.Request) -> object:
        if body is SLOW or body is HANG_UP:
            return body
        content = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        return httpx.Response(status, content=content, headers=headers or {})

    return handler


async def call_with(handler, call):
    """One client call against a stub server on loopback answering with `handler`."""
    async with stub(handler) as server:
        client = client_for(server.url)
        try:
            return await call(client)
        finally:
            await client.aclose()


def probe_with(handler):
    return call_with(handler, lambda client: client.probe(TOKEN))


PROBES = [
    (
        answer(401, {"error": "Unauthorized", "message": "Invalid API key"}),
        ProbeVerdict.DEAD,
        "probe_unauthorized",
    ),
    (answer(401, {"error": "Rate limit exceeded"}), ProbeVerdict.INCONCLUSIVE, "probe_rate_limited"),
    (answer(401, {"error": "Monthly quota used up"}), ProbeVerdict.INCONCLUSIVE, "probe_rate_limited"),
    (answer(200, {"org": "o"}), ProbeVerdict.ALIVE, "probe_key_alive"),
    (answer(204, b""), ProbeVerdict.ALIVE, "probe_key_alive"),
    (answer(402, {"error": "Payment required"}), ProbeVerdict.ALIVE, "probe_key_alive"),
    (answer(403, {"error": "Forbidden"}), ProbeVerdict.ALIVE, "probe_key_alive"),
    (answer(429, {}, {"Retry-After": "7"}), ProbeVerdict.INCONCLUSIVE, "probe_rate_limited"),
    (answer(500), ProbeVerdict.INCONCLUSIVE, "probe_server_error"),
    (answer(503), ProbeVerdict.INCONCLUSIVE, "probe_server_error"),
    (answer(404), ProbeVerdict.INCONCLUSIVE, "probe_unexpected_status"),
    (answer(0, SLOW), ProbeVerdict.INCONCLUSIVE, "probe_timeout"),
    (answer(0, HANG_UP), ProbeVerdict.INCONCLUSIVE, "probe_connection_error"),
]


@pytest.mark.parametrize(
    ("handler", "verdict", "reason"), PROBES, ids=[p[2] + f"-{i}" for i, p in enumerate(PROBES)]
)
def test_probe_classification(handler, verdict, reason):
    probe = run(probe_with(handler))
    assert (probe.verdict, probe.reason) == (verdict, reason)


def test_probe_sends_the_leaked_key_and_not_the_admin_token():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"error": "Unauthorized"})

    run(probe_with(handler))
    assert seen[0].url.path == "/api/v3/session"
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_probe_429_carries_retry_after():
    assert run(probe_with(answer(429, {}, {"Retry-After": "7"}))).retry_after == 7


def test_retry_after_as_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    probe = run(probe_with(answer(429, {}, {"Retry-After": when})))
    assert 25 <= probe.retry_after <= 31


def lookup_with(handler, hashes):
    return call_with(handler, lambda client: client.lookup(hashes))


def test_lookup_parses_keys_and_recipients():
    captured: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        captured.append({"auth": request.headers["Authorization"], "body": json.loads(request.content)})
        return httpx.Response(
            200,
            json={
                "keys": [
                    {
                        "keyHash": "a" * 64,
                        "id": "key_1",
                        "orgId": "org_1",
                        "name": "ci",
                        "enabled": False,
                        "owner": {"email": "o@example.test", "name": "Owner"},
                        "notify": ["sec@example.test"],
                    },
                    {"keyHash": "c" * 64, "id": "key_unasked"},
                ]
            },
        )

    found = run(lookup_with(handler, ["a" * 64, "b" * 64]))
    assert captured == [{"auth": "Bearer admin-secret", "body": {"keyHashes": ["a" * 64, "b" * 64]}}]
    assert list(found) == ["a" * 64], "hashes we did not ask about are ignored"
    key = found["a" * 64]
    assert (key.id, key.org_id, key.name, key.enabled) == ("key_1", "org_1", "ci", False)
    assert [r["email"] for r in key.recipients] == ["o@example.test", "sec@example.test"]


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (answer(401), Reason.ADMIN_UNAUTHORIZED),
        (answer(403), Reason.ADMIN_UNAUTHORIZED),
        (answer(429, {}, {"Retry-After": "3"}), Reason.RATE_LIMITED),
        (answer(502), Reason.SERVER_ERROR),
        (answer(200, b"<html>"), Reason.BAD_RESPONSE),
        (answer(200, {"keys": [{"id": "no hash"}]}), Reason.BAD_RESPONSE),
        (answer(400), Reason.BAD_RESPONSE),
        (answer(0, SLOW), Reason.TIMEOUT),
        (answer(0, HANG_UP), Reason.CONNECTION_ERROR),
    ],
    ids=["401", "403", "429", "502", "html", "shape", "400", "timeout", "refused"],
)
def test_lookup_failures(handler, reason):
    with pytest.raises(CallFailed) as caught:
        run(lookup_with(handler, ["a" * 64]))
    assert caught.value.reason == reason
    if reason == Reason.RATE_LIMITED:
        assert caught.value.retry_after == 3


def test_an_unreadable_answer_is_a_bad_response_not_a_crash():
    def handler(request: httpx.Request) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 15\r\n\r\nnot gzip at all"

    with pytest.raises(CallFailed) as caught:
        run(lookup_with(handler, ["a" * 64]))
    assert caught.value.reason == Reason.BAD_RESPONSE
    assert run(probe_with(handler)).reason == "probe_bad_response"


def test_lookup_of_more_than_100_hashes_goes_out_in_calls_of_at_most_100():
    batches: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        batches.append(json.loads(request.content)["keyHashes"])
        return httpx.Response(200, json={"keys": []})

    hashes = [f"{i:064x}" for i in range(250)]
    assert run(lookup_with(handler, hashes)) == {}
    assert sorted(len(b) for b in batches) == [50, 100, 100]
    assert sorted(h for b in batches for h in b) == sorted(hashes)


def revoke_with(handler, key_id="key_1"):
    return call_with(handler, lambda client: client.revoke(key_id))


def test_revoke_200_and_404_both_mean_revoked():
    assert run(revoke_with(answer(200, {"success": True}))) is RevokeResult.REVOKED
    assert run(revoke_with(answer(404, {"error": "Not found"}))) is RevokeResult.ALREADY_GONE


def test_revoke_quotes_the_key_id():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"success": True})

    run(revoke_with(handler, key_id="a/../b"))
    assert seen[0].method == "DELETE"
    assert seen[0].url.raw_path == b"/admin/v3/auth/scoped-key/a%2F..%2Fb"


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, Reason.ADMIN_UNAUTHORIZED), (429, Reason.RATE_LIMITED), (500, Reason.SERVER_ERROR)],
)
def test_revoke_failures(status, reason):
    with pytest.raises(CallFailed) as caught:
        run(revoke_with(answer(status)))
    assert caught.value.reason == reason


def test_no_exception_text_carries_the_token():
    # A server that hangs up on the probe, and one that is not there at all.
    probe = run(probe_with(answer(0, HANG_UP)))
    assert probe.reason == "probe_connection_error"
    assert TOKEN not in repr(probe)

    async def refused():
        async with stub(answer(200)) as server:
            url = server.url
        client = client_for(url)  # the port is closed now
        try:
            return await client.probe(TOKEN)
        finally:
            await client.aclose()

    probe = run(refused())
    assert probe.reason == "probe_connection_error"
    assert TOKEN not in repr(probe)
