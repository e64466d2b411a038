import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.inbound import InboundError, KeyCache, Reporter
from service.inbound.reporters import HeaderPair
from service.reasons import Reason

REPORTER = Reporter("github", (HeaderPair("Github"),), "https://keys.example/secret_scanning")


def _pem(curve: ec.EllipticCurve | None = None) -> str:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _keys(*pairs: tuple[str, str], is_current: bool = True) -> dict:
    return {
        "public_keys": [
            {"key_identifier": identifier, "key": pem, "is_current": is_current} for identifier, pem in pairs
        ]
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class KeysServer:
    """The keys endpoint: answers with whatever `respond` says and records every request."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        await asyncio.sleep(0.01)  # let concurrent callers pile up while the fetch is in flight
        return self.respond(request)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def _serving(document: dict, **headers: str) -> KeysServer:
    return KeysServer(lambda request: httpx.Response(200, json=document, headers=headers))


def _run(server: KeysServer, scenario, **cache_options):
    events: list[tuple[Reason, dict[str, str]]] = []

    async def main():
        async with server.client() as client:
            cache = KeyCache(REPORTER, client, on_event=lambda r, d: events.append((r, d)), **cache_options)
            return await scenario(cache)

    return asyncio.run(main()), events


PEM_A = _pem()
PEM_B = _pem()


def test_cache_hit_makes_no_fetch():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        first = await cache.get("a")
        second = await cache.get("a")
        return first, second, cache.hits, cache.misses

    (first, second, hits, misses), _ = _run(server, scenario)
    assert first is second
    assert len(server.requests) == 1
    assert (hits, misses) == (1, 1)


def test_unknown_identifier_refetches_once_then_finds_rotated_key():
    documents = [_keys(("a", PEM_A)), _keys(("a", PEM_A), ("b", PEM_B))]
    server = KeysServer(lambda request: httpx.Response(200, json=documents[min(len(server.requests), 2) - 1]))

    async def scenario(cache: KeyCache):
        assert await cache.refresh()
        return await cache.get("b")

    key, _ = _run(server, scenario)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert len(server.requests) == 2


def test_twenty_concurrent_misses_make_one_fetch():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        return await asyncio.gather(*(cache.get("a") for _ in range(20)))

    keys, _ = _run(server, scenario)
    assert len({id(key) for key in keys}) == 1
    assert len(server.requests) == 1


def test_twenty_concurrent_unknown_identifiers_make_one_fetch():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        return await asyncio.gather(*(cache.get(f"forged-{i}") for i in range(20)), return_exceptions=True)

    results, _ = _run(server, scenario)
    assert all(isinstance(r, InboundError) and r.reason is Reason.KEY_UNKNOWN for r in results)
    assert len(server.requests) == 1


def test_miss_refetch_at_most_once_per_interval():
    server = _serving(_keys(("a", PEM_A)))
    clock = FakeClock()

    async def scenario(cache: KeyCache):
        reasons = []
        for advance in (0, 30, 29.9, 0.1):
            clock.now += advance
            with pytest.raises(InboundError) as caught:
                await cache.get("unknown")
            reasons.append(caught.value.reason)
            reasons.append(len(server.requests))
        return reasons

    reasons, _ = _run(server, scenario, clock=clock, miss_interval=60.0)
    unknown, later = Reason.KEY_UNKNOWN, Reason.KEY_NOT_YET_FETCHED
    # t=0 fetches: the reporter's fresh answer says unknown (401). t=30 and t=59.9 are inside the
    # minute: not asked, so "retry later" (503); t=60 may fetch again.
    assert reasons == [unknown, 1, later, 1, later, 1, unknown, 2]


def test_an_identifier_unknown_while_a_refetch_is_not_allowed_is_retry_later():
    """A junk identifier used the refetch; GitHub publishes a new key a moment later and signs a
    genuine alert with it: 503 with Retry-After (partners retry a 5xx, never a 4xx), then found."""
    keys = [("a", PEM_A)]
    server = KeysServer(lambda request: httpx.Response(200, json=_keys(*keys)))
    clock = FakeClock()

    async def scenario(cache: KeyCache):
        with pytest.raises(InboundError) as junk:
            await cache.get("junk")
        keys.append(("b", PEM_B))
        clock.now += 10
        with pytest.raises(InboundError) as genuine:
            await cache.get("b")
        clock.now += 50
        return junk.value, genuine.value, await cache.get("b")

    (junk, genuine, found), _ = _run(server, scenario, clock=clock, miss_interval=60.0)
    assert (junk.reason, junk.status) == (Reason.KEY_UNKNOWN, 401)
    assert (genuine.reason, genuine.status) == (Reason.KEY_NOT_YET_FETCHED, 503)
    assert genuine.headers == {"Retry-After": "50"}
    assert found is not None


def _failing(response: httpx.Response | Exception) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        if isinstance(response, Exception):
            raise response
        return response

    return respond


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        pytest.param(httpx.Response(500), Reason.KEYS_FETCH_FAILED, id="500"),
        pytest.param(httpx.Response(429, headers={"Retry-After": "60"}), Reason.KEYS_FETCH_FAILED, id="429"),
        pytest.param(httpx.Response(404), Reason.KEYS_FETCH_FAILED, id="404"),
        pytest.param(httpx.ConnectError("refused"), Reason.KEYS_FETCH_FAILED, id="connect-error"),
        pytest.param(httpx.ReadTimeout("slow"), Reason.KEYS_FETCH_FAILED, id="timeout"),
        pytest.param(httpx.Response(200, text="<html>"), Reason.KEYS_BAD_RESPONSE, id="not-json"),
        pytest.param(httpx.Response(200, json=[PEM_A]), Reason.KEYS_BAD_RESPONSE, id="wrong-shape"),
        pytest.param(httpx.Response(200, json={"keys": []}), Reason.KEYS_BAD_RESPONSE, id="no-public-keys"),
        pytest.param(httpx.Response(200, json=_keys()), Reason.KEYS_BAD_RESPONSE, id="empty-list"),
        pytest.param(
            httpx.Response(200, json=_keys(("a", "not a pem"), ("b", _pem(ec.SECP384R1())))),
            Reason.KEYS_BAD_RESPONSE,
            id="no-usable-key",
        ),
        pytest.param(
            httpx.Response(200, json={"public_keys": [{"key_identifier": 7, "key": PEM_B}, "x"]}),
            Reason.KEYS_BAD_RESPONSE,
            id="bad-entries",
        ),
    ],
)
def test_failed_fetch_keeps_last_good_keys(failure, reason, caplog):
    answers = [httpx.Response(200, json=_keys(("a", PEM_A)))]
    server = KeysServer(lambda request: answers.pop(0) if answers else _failing(failure)(request))

    async def scenario(cache: KeyCache):
        good = await cache.get("a")
        ok = await cache.refresh()
        return ok, good, await cache.get("a"), cache.fetches, cache.fetch_failures

    with caplog.at_level(logging.WARNING, logger="service.inbound"):
        (ok, good, after, fetches, failures), events = _run(server, scenario)
    assert ok is False
    assert after is good
    assert (fetches, failures) == (2, 1)
    assert [r for r, _ in events] == [reason]
    assert events[0][1]["reporter"] == "github"
    assert events[0][1]["detail"]
    assert [(r.reason, r.reporter) for r in caplog.records] == [(reason.value, "github")]


def test_never_any_keys_is_keys_unavailable():
    server = KeysServer(_failing(httpx.Response(503)))
    clock = FakeClock()

    async def scenario(cache: KeyCache):
        caught = []
        for _ in range(2):
            with pytest.raises(InboundError) as error:
                await cache.get("a")
            caught.append(error.value)
        return caught

    caught, events = _run(server, scenario, clock=clock)
    assert [(e.reason, e.status) for e in caught] == [(Reason.KEYS_UNAVAILABLE, 503)] * 2
    assert len(server.requests) == 1  # the second miss is inside the minute
    assert [r for r, _ in events] == [Reason.KEYS_FETCH_FAILED]


def test_is_current_false_is_accepted_and_other_curves_skipped():
    document = _keys(("old", PEM_A), is_current=False)
    document["public_keys"].append(
        {"key_identifier": "p384", "key": _pem(ec.SECP384R1()), "is_current": True}
    )
    server = _serving(document)

    async def scenario(cache: KeyCache):
        key = await cache.get("old")
        with pytest.raises(InboundError) as caught:
            await cache.get("p384")
        return key, caught.value.reason

    # Every miss may refetch: the reporter's fresh answer is what says "p384" is not usable.
    (key, reason), events = _run(server, scenario, miss_interval=0.0)
    assert isinstance(key.curve, ec.SECP256R1)
    assert reason is Reason.KEY_UNKNOWN
    assert events == []


def test_etag_sent_and_304_keeps_keys():
    def respond(request: httpx.Request) -> httpx.Response:
        if request.headers.get("if-none-match") == '"v1"':
            return httpx.Response(304, headers={"ETag": '"v1"'})
        return httpx.Response(200, json=_keys(("a", PEM_A)), headers={"ETag": '"v1"'})

    server = KeysServer(respond)

    async def scenario(cache: KeyCache):
        key = await cache.get("a")
        ok = await cache.refresh()
        return ok, key, await cache.get("a"), cache.fetch_failures

    (ok, key, after, failures), events = _run(server, scenario)
    assert ok is True
    assert after is key
    assert failures == 0
    assert events == []
    assert "if-none-match" not in server.requests[0].headers
    assert server.requests[1].headers["if-none-match"] == '"v1"'


def test_304_without_keys_is_a_failure():
    server = KeysServer(_failing(httpx.Response(304)))

    async def scenario(cache: KeyCache):
        return await cache.refresh()

    ok, events = _run(server, scenario)
    assert ok is False
    assert [r for r, _ in events] == [Reason.KEYS_FETCH_FAILED]


def test_auth_token_sent_as_bearer():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        return await cache.refresh()

    _run(server, scenario, auth_token="ghp_example")
    assert server.requests[0].headers["authorization"] == "Bearer ghp_example"
    _run(server, scenario)
    assert "authorization" not in server.requests[1].headers


def test_changed_key_material_warns_and_uses_new_key(caplog):
    documents = [_keys(("a", PEM_A)), _keys(("a", PEM_B))]
    server = KeysServer(lambda request: httpx.Response(200, json=documents[len(server.requests) - 1]))

    async def scenario(cache: KeyCache):
        before = await cache.get("a")
        await cache.refresh()
        return before, await cache.get("a")

    with caplog.at_level(logging.WARNING, logger="service.inbound"):
        (before, after), events = _run(server, scenario)
    assert events == [(Reason.SIGNING_KEY_CHANGED, {"reporter": "github", "key_identifier": "a"})]
    assert before.public_numbers() != after.public_numbers()
    assert after.public_numbers() == serialization.load_pem_public_key(PEM_B.encode()).public_numbers()
    assert [r.reason for r in caplog.records] == ["signing_key_changed"]


def test_refresh_drops_keys_the_reporter_withdrew():
    documents = [_keys(("a", PEM_A), ("b", PEM_B)), _keys(("b", PEM_B))]
    server = KeysServer(lambda request: httpx.Response(200, json=documents[min(len(server.requests), 2) - 1]))

    async def scenario(cache: KeyCache):
        await cache.refresh()
        await cache.refresh()
        with pytest.raises(InboundError) as caught:
            await cache.get("a")
        return caught.value.reason

    reason, _ = _run(server, scenario)
    assert reason is Reason.KEY_UNKNOWN


def test_cancelled_caller_does_not_abort_shared_fetch():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        first = asyncio.ensure_future(cache.get("a"))
        second = asyncio.ensure_future(cache.get("a"))
        await asyncio.sleep(0)
        first.cancel()
        return await second

    key, _ = _run(server, scenario)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert len(server.requests) == 1


def test_background_refresh_starts_immediately_and_stops():
    server = _serving(_keys(("a", PEM_A)))

    async def scenario(cache: KeyCache):
        cache.start()
        await asyncio.sleep(0.005)
        assert len(server.requests) == 1  # first fetch at once, not after an interval
        await asyncio.sleep(0.1)
        await cache.aclose()
        stopped_at = len(server.requests)
        await asyncio.sleep(0.05)
        return stopped_at, cache.hits, await cache.get("a")

    (stopped_at, hits, key), _ = _run(server, scenario, refresh_interval=0.02)
    assert stopped_at >= 3
    assert len(server.requests) == stopped_at
    assert hits == 0
    assert key is not None


def test_disabled_reporter_is_refused():
    async def scenario():
        async with httpx.AsyncClient() as client:
            KeyCache(Reporter("gitlab", (HeaderPair("Gitlab"),), None), client)

    with pytest.raises(ValueError, match="gitlab"):
        asyncio.run(scenario())
