"""The Supermemory sandbox over real HTTP: the §6 contract, every knob, the counters, and no token in logs."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from service.sandbox import (
    DEFAULT_ADMIN_TOKEN,
    Knobs,
    SandboxKey,
    ServerThread,
    SupermemorySandbox,
    seeded_keys,
)
from service.tokens import is_key_shaped, token_hash

ADMIN = {"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
LOOKUP = "/v3/admin/api-keys/lookup"


@pytest.fixture
def sandbox() -> SupermemorySandbox:
    return SupermemorySandbox()


@pytest.fixture
def client(sandbox: SupermemorySandbox) -> Iterator[httpx.Client]:
    with ServerThread(sandbox.app()) as server, httpx.Client(base_url=server.url, timeout=5) as client:
        yield client


def lookup(client: httpx.Client, *tokens: str) -> httpx.Response:
    return client.post(LOOKUP, json={"keyHashes": [token_hash(t) for t in tokens]}, headers=ADMIN)


def revoke(client: httpx.Client, key_id: str, headers: dict[str, str] = ADMIN) -> httpx.Response:
    return client.delete(f"/v3/auth/scoped-key/{key_id}", headers=headers)


def probe(client: httpx.Client, token: str) -> httpx.Response:
    return client.get("/v3/session", headers={"Authorization": f"Bearer {token}"})


# -- seeded keys ------------------------------------------------------------------------------------


def test_seeded_keys_are_deterministic_and_shaped_like_real_keys():
    keys = seeded_keys(7, seed="a")
    assert [k.token for k in keys] == [k.token for k in seeded_keys(7, seed="a")]
    assert {k.token for k in keys}.isdisjoint(k.token for k in seeded_keys(7, seed="b"))
    for key in keys:
        assert re.fullmatch(r"sm_[1-9A-HJ-NP-Za-km-z]{22}_[A-Za-z0-9]{64}", key.token)
        assert is_key_shaped(key.token)
        assert key.org_id.startswith("org_")
        assert key.owner_email in key.notify
        assert key.enabled
    assert len({k.token for k in keys}) == len({k.id for k in keys}) == 7
    owners = [k.owner_email for k in keys]
    assert 1 < len(set(owners)) < len(owners), "several owners, some with several keys"
    assert len(seeded_keys(1)) == 1
    assert seeded_keys(0) == []


def test_repr_of_a_key_does_not_show_its_token():
    key = seeded_keys(1)[0]
    assert key.token not in repr(key)


# -- lookup -----------------------------------------------------------------------------------------


def test_lookup_returns_known_keys_and_omits_unknown_hashes(client, sandbox):
    first, second = sandbox.keys[:2]
    response = lookup(client, first.token, "sm_not_a_known_key_at_all_000000", second.token, first.token)
    assert response.status_code == 200
    assert response.json() == {
        "keys": [
            {
                "keyHash": token_hash(key.token),
                "id": key.id,
                "orgId": key.org_id,
                "name": key.name,
                "enabled": True,
                "owner": {"email": key.owner_email, "name": key.owner_name},
                "notify": key.notify,
                "createdAt": key.created_at,
                "lastUsedAt": key.last_used_at,
                "org": {"name": key.org_name, "admins": [], "channels": []},
            }
            for key in (first, second)
        ]
    }
    assert sandbox.stats()["lookup_batches"] == [4]


def test_lookup_serves_the_orgs_admins_and_channels_and_raw_overrides():
    keys = seeded_keys(2, receiver="http://127.0.0.1:9")
    keys[1].raw = {"createdAt": 5, "org": "not an object"}
    with ServerThread(SupermemorySandbox(keys).app()) as server, httpx.Client(base_url=server.url) as client:
        first, second = lookup(client, keys[0].token, keys[1].token).json()["keys"]
    assert first["createdAt"].endswith("T09:30:00Z") and first["lastUsedAt"].endswith("Z")
    assert first["org"]["admins"] == [{"email": "admin0@example.test", "name": "Sandbox Admin 0"}]
    webhook, slack = first["org"]["channels"]
    assert (webhook["type"], webhook["url"]) == ("webhook", f"http://127.0.0.1:9/hooks/{keys[0].org_id}")
    assert webhook["secret"].startswith("whsec_")
    assert (slack["type"], slack["url"]) == ("slack", f"http://127.0.0.1:9/slack/{keys[0].org_id}")
    assert (second["createdAt"], second["org"]) == (5, "not an object")


def test_lookup_includes_revoked_keys_as_disabled(client, sandbox):
    key = sandbox.keys[0]
    assert revoke(client, key.id).status_code == 200
    [found] = lookup(client, key.token).json()["keys"]
    assert found["id"] == key.id
    assert found["enabled"] is False


def test_lookup_refuses_more_than_100_hashes_and_malformed_bodies(client):
    assert client.post(LOOKUP, json={"keyHashes": ["0" * 64] * 100}, headers=ADMIN).status_code == 200
    assert client.post(LOOKUP, json={"keyHashes": ["0" * 64] * 101}, headers=ADMIN).status_code == 400
    assert client.post(LOOKUP, json={"keyHashes": "abc"}, headers=ADMIN).status_code == 400
    assert client.post(LOOKUP, json=["abc"], headers=ADMIN).status_code == 400
    assert client.post(LOOKUP, content=b"{not json", headers=ADMIN).status_code == 400


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": DEFAULT_ADMIN_TOKEN}]
)
def test_admin_calls_require_the_admin_token(client, sandbox, headers):
    key = sandbox.keys[0]
    response = client.post(LOOKUP, json={"keyHashes": [token_hash(key.token)]}, headers=headers)
    assert response.status_code == 401
    assert revoke(client, key.id, headers=headers).status_code == 401
    assert probe(client, key.token).status_code == 200, "a refused revoke leaves the key alive"


def test_admin_token_is_a_knob(client, sandbox):
    sandbox.set_knobs(admin_token="rotated")
    assert lookup(client).status_code == 401
    assert client.post(
        LOOKUP, json={"keyHashes": []}, headers={"Authorization": "bearer rotated"}
    ).json() == {"keys": []}


# -- revoke and probe -------------------------------------------------------------------------------


def test_revoke_then_probe_answers_401(client, sandbox):
    key = sandbox.keys[0]
    response = probe(client, key.token)
    assert response.status_code == 200
    assert response.json()["key"]["id"] == key.id

    response = revoke(client, key.id)
    assert (response.status_code, response.json()) == (200, {"success": True})
    response = revoke(client, key.id)
    assert (response.status_code, response.json()) == (404, {"error": "Not found"})
    assert revoke(client, "key_unknown").status_code == 404

    response = probe(client, key.token)
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized", "message": "Invalid API key"}
    assert probe(client, sandbox.keys[1].token).status_code == 200, "other keys stay alive"

    stats = sandbox.stats()
    assert stats["calls"] == {"lookup": 0, "revoke": 3, "probe": 3}
    assert stats["revoke_calls"] == {key.id: 2, "key_unknown": 1}
    assert stats["effective_revokes"] == {key.id: 1}
    assert stats["probe_calls"] == {key.id: 2, sandbox.keys[1].id: 1}


def test_probe_without_a_known_key_answers_401(client):
    assert client.get("/v3/session").status_code == 401
    assert client.get("/v3/session", headers={"Authorization": "Basic abc"}).status_code == 401
    assert probe(client, "sm_" + "x" * 40).status_code == 401


def test_revoked_key_stays_alive_during_the_propagation_delay(client, sandbox):
    key = sandbox.keys[0]
    sandbox.set_knobs(propagation_delay_s=0.5)
    assert revoke(client, key.id).status_code == 200
    assert lookup(client, key.token).json()["keys"][0]["enabled"] is False, "the admin side knows at once"
    assert probe(client, key.token).status_code == 200
    time.sleep(0.6)
    assert probe(client, key.token).status_code == 401


def test_never_revoke_answers_success_but_the_key_stays_alive(client, sandbox):
    key = sandbox.keys[0]
    sandbox.set_knobs(never_revoke=True)
    assert revoke(client, key.id).json() == {"success": True}
    assert revoke(client, key.id).json() == {"success": True}
    assert probe(client, key.token).status_code == 200
    assert lookup(client, key.token).json()["keys"][0]["enabled"] is True
    stats = sandbox.stats()
    assert stats["revoke_calls"] == {key.id: 2}
    assert stats["effective_revokes"] == {}


# -- failure knobs ----------------------------------------------------------------------------------


def test_fail_next_answers_429_with_retry_after_then_recovers(client, sandbox):
    key = sandbox.keys[0]
    sandbox.set_knobs(fail_next={"revoke": 2}, fail_status={"revoke": 429}, retry_after=1.5)
    for _ in range(2):
        response = revoke(client, key.id)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1.5"
    assert revoke(client, key.id).status_code == 200
    assert sandbox.knobs.fail_next == {"revoke": 0}
    stats = sandbox.stats()
    assert stats["revoke_calls"] == {key.id: 3}, "failed calls are counted"
    assert stats["effective_revokes"] == {key.id: 1}


def test_429_without_retry_after_knob_sends_no_header(client, sandbox):
    sandbox.set_knobs(fail_next={"lookup": 1}, fail_status={"lookup": 429})
    response = lookup(client)
    assert response.status_code == 429
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize("status", [401, 403, 500])
def test_fail_next_with_other_statuses_and_the_all_route(client, sandbox, status):
    sandbox.set_knobs(fail_next={"all": 3}, fail_status={"all": status})
    key = sandbox.keys[0]
    assert [
        lookup(client).status_code,
        revoke(client, key.id).status_code,
        probe(client, key.token).status_code,
    ] == [status] * 3
    assert probe(client, key.token).status_code == 200
    assert sandbox.stats()["effective_revokes"] == {}


def test_fail_next_defaults_to_503_and_beats_error_rate(client, sandbox):
    sandbox.set_knobs(fail_next={"probe": 1}, error_rate={"probe": 1.0}, fail_status={"probe": 429})
    token = sandbox.keys[0].token
    assert probe(client, token).status_code == 429
    assert probe(client, token).status_code == 503
    sandbox.set_knobs(fail_next={"lookup": 1}, fail_status={})
    assert lookup(client).status_code == 503


def test_error_rate_one_fails_every_call_and_zero_none(client, sandbox):
    key = sandbox.keys[0]
    sandbox.set_knobs(error_rate={"all": 1.0})
    assert {revoke(client, key.id).status_code for _ in range(5)} == {503}
    assert {probe(client, key.token).status_code for _ in range(5)} == {503}
    sandbox.set_knobs(error_rate={"all": 1.0, "probe": 0.0})
    assert probe(client, key.token).status_code == 200, "a route's own value overrides 'all'"
    assert sandbox.stats()["effective_revokes"] == {}


def test_error_rate_is_seeded():
    def pattern() -> list[int]:
        sandbox = SupermemorySandbox(seeded_keys(1), knobs=Knobs(error_rate={"probe": 0.5}))
        with ServerThread(sandbox.app()) as server, httpx.Client(base_url=server.url) as client:
            return [probe(client, sandbox.keys[0].token).status_code for _ in range(30)]

    first = pattern()
    assert first == pattern()
    assert set(first) == {200, 503}


def test_latency_is_applied_per_route(client, sandbox):
    sandbox.set_knobs(latency_ms={"all": 300, "lookup": 0})
    started = time.monotonic()
    probe(client, sandbox.keys[0].token)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    lookup(client)
    assert time.monotonic() - started < 0.3


def test_hang_provokes_a_client_timeout_and_does_not_block_shutdown(sandbox):
    sandbox.set_knobs(hang_ms={"revoke": 60_000})
    server = ServerThread(sandbox.app()).start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.delete(f"{server.url}/v3/auth/scoped-key/{sandbox.keys[0].id}", headers=ADMIN, timeout=0.3)
        assert sandbox.stats()["calls"]["revoke"] == 1
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 3


def test_shutdown_is_not_held_up_by_a_request_still_hanging(sandbox):
    sandbox.set_knobs(hang_ms={"probe": 60_000})
    server = ServerThread(sandbox.app()).start()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(httpx.get(f"{server.url}/v3/session", timeout=30).status_code)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=call)
    waiting.start()
    while sandbox.stats()["calls"]["probe"] == 0:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    waiting.join(5)
    assert outcome, "the waiting client got an answer or an error, not silence"


# -- control plane ----------------------------------------------------------------------------------


def test_knobs_over_http_update_partially_and_reject_bad_values_whole(client, sandbox):
    response = client.post("/_sandbox/knobs", json={"propagation_delay_s": 2, "latency_ms": {"probe": 5}})
    assert response.status_code == 200
    assert response.json()["propagation_delay_s"] == 2.0
    assert response.json()["latency_ms"] == {"probe": 5.0}
    assert response.json()["admin_token"] == DEFAULT_ADMIN_TOKEN

    for bad in (
        {"propagation_delay_s": 0, "nope": 1},
        {"error_rate": {"probe": 1.5}},
        {"error_rate": {"lookups": 0.5}},
        {"fail_status": {"all": 200}},
        {"fail_next": {"all": -1}},
        {"retry_after": "soon"},
        {"never_revoke": "yes"},
    ):
        assert client.post("/_sandbox/knobs", json=bad).status_code == 400, bad
    assert sandbox.knobs.propagation_delay_s == 2.0, "a rejected update changes nothing"
    assert client.get("/_sandbox/knobs").json()["latency_ms"] == {"probe": 5.0}
    with pytest.raises(ValueError, match="unknown knob"):
        sandbox.set_knobs(latency=1)


def test_keys_over_http_add_and_list_with_tokens(client, sandbox):
    new = {
        "token": "sm_" + "N" * 22 + "_" + "n" * 64,
        "id": "key_added",
        "org_id": "org_added",
        "name": "added",
        "owner_email": "added@example.test",
        "owner_name": "Added",
        "notify": ["added@example.test"],
    }
    response = client.post("/_sandbox/keys", json=[new])
    assert (response.status_code, response.json()) == (201, {"added": ["key_added"]})
    assert lookup(client, new["token"]).json()["keys"][0]["id"] == "key_added"
    assert client.post("/_sandbox/keys", json=[new]).status_code == 400, "duplicate"
    assert client.post("/_sandbox/keys", json=[{**new, "id": "other", "colour": "red"}]).status_code == 400
    assert client.post("/_sandbox/keys", json=[{"token": "sm_x"}]).status_code == 400
    assert client.post("/_sandbox/keys", json=new).status_code == 400

    listed = client.get("/_sandbox/keys").json()
    assert len(listed) == 6
    assert listed[-1] == {
        **new,
        "enabled": True,
        "key_hash": token_hash(new["token"]),
        "created_at": None,
        "last_used_at": None,
        "org_name": None,
        "admins": [],
        "channels": [],
        "raw": {},
    }
    assert listed[0]["token"] == sandbox.keys[0].token

    other = SupermemorySandbox(seeded_keys(0))
    with ServerThread(other.app()) as server:
        assert httpx.post(f"{server.url}/_sandbox/keys", json=listed).status_code == 201
    assert [k.token for k in other.keys] == [k["token"] for k in listed]


def test_add_keys_refuses_a_duplicate_token(sandbox):
    existing = sandbox.keys[0]
    duplicate = SandboxKey(
        token=existing.token,
        id="key_other",
        org_id="org_x",
        name="x",
        owner_email="x@example.test",
        owner_name="X",
        notify=[],
    )
    with pytest.raises(ValueError, match="duplicate token") as excinfo:
        sandbox.add_keys([duplicate])
    assert existing.token not in str(excinfo.value)
    assert len(sandbox.keys) == 5


def test_reset_restores_keys_knobs_and_counters(client, sandbox):
    knobs = sandbox.knobs
    key = sandbox.keys[0]
    revoke(client, key.id)
    sandbox.add_keys(
        [SandboxKey("sm_" + "d" * 30, "key_d", "org_d", "d", "d@example.test", "D", [], enabled=False)]
    )
    sandbox.set_knobs(latency_ms={"all": 1}, never_revoke=True)

    assert client.post("/_sandbox/reset").status_code == 200
    assert probe(client, key.token).status_code == 200
    assert knobs == Knobs(), "reset updates the knobs object in place"
    assert {k.id: k.enabled for k in sandbox.keys}["key_d"] is False, "added keys keep their added state"
    stats = client.get("/_sandbox/stats").json()
    assert stats == {
        "calls": {"lookup": 0, "revoke": 0, "probe": 1},
        "effective_revokes": {},
        "revoke_calls": {},
        "probe_calls": {key.id: 1},
        "lookup_batches": [],
    }


def test_no_token_reaches_the_logs(client, sandbox, caplog):
    caplog.set_level(logging.DEBUG)
    key = sandbox.keys[0]
    lookup(client, key.token)
    probe(client, key.token)
    revoke(client, key.id)
    probe(client, key.token)
    sandbox.add_keys(seeded_keys(2, seed="other"))
    client.get("/_sandbox/keys")
    assert caplog.records, "the sandbox does log what it does"
    text = "\n".join(record.getMessage() for record in caplog.records)
    for token in [k.token for k in sandbox.keys]:
        assert token not in text
