"""Floods over real HTTP: junk requests that each meet a paged condition make one page, and a flood
of errors towards a slow Sentry does not push a page out of the SDK's queue."""

from __future__ import annotations

import time

import httpx
import pytest

from service.sandbox import build_alert, seeded_keys
from service.tokens import token_hash
from tests.harness import free_port, metric, stranger_signature, wait_until
from tests.integration.operator_helpers import auth, operator_env, unreadable_incident

pytestmark = pytest.mark.integration


def test_error_flood_and_junk_flood_leave_one_page_that_arrives(sandbox, sentry, make_service):
    dead_keys = f"http://127.0.0.1:{free_port()}/keys"
    service = make_service({**sentry.env(), **operator_env(), "LEAK_RESPONDER_GITLAB_KEYS_URL": dead_keys})
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    # A bug on a route: every read of this incident is a 500 and an ERROR line (a Sentry event).
    incident = unreadable_incident(service, token)
    sentry.delay = 0.05  # a slow ingest: the SDK's queue (100 events) fills behind it
    with httpx.Client(base_url=service.url, headers=auth()) as client:
        for _ in range(300):
            assert client.get(f"/v1/incidents/{incident['id']}").status_code == 500
    junk = {"Gitlab-Public-Key-Identifier": "junk", "Gitlab-Public-Key-Signature": stranger_signature()}
    for _ in range(100):
        response = httpx.post(f"{service.url}/v1/alerts/gitlab", content=b"[]", headers=junk)
        assert response.status_code == 503
    wait_until(lambda: sentry.pages("reporter_keys_unavailable"), timeout=30)
    time.sleep(1)
    assert len(sentry.pages("reporter_keys_unavailable")) == 1
    errors = [e for e in sentry.events() if not e.get("tags", {}).get("page")]
    assert 1 <= len(errors) <= 20
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "leak_responder_pages_total", event="reporter_keys_unavailable") == 1
    assert metric(text, "leak_responder_pages_repeated_total", event="reporter_keys_unavailable") == 99
    assert metric(text, "leak_responder_sentry_events_dropped_total") >= 280
    assert len([r for r in service.logged("reporter_keys_unavailable") if r.get("page")]) == 1


def test_a_burst_of_pages_past_the_sdks_queue_arrives_whole_beside_an_error_flood(
    sandbox, sentry, make_service
):
    # 150 keys that cannot be revoked: 150 distinct pages within seconds, more than the SDK's queue
    # (100 events) holds while Sentry takes 50 ms per event, with a 500 on a route every few ms.
    keys = seeded_keys(150, seed="burst")
    sandbox.supermemory.add_keys(keys)
    sandbox.supermemory.set_knobs(fail_next={"revoke": 100_000}, fail_status={"revoke": 503})
    env = {**sentry.env(), **operator_env(), "LEAK_RESPONDER_REVOKE_RETRY_WINDOW": "0.5"}
    service = make_service(env)
    sentry.delay = 0.05
    assert service.post_alert(sandbox.github, [k.token for k in keys]).status_code == 200
    with service.db(writable=True) as conn:
        conn.execute(
            "INSERT INTO events (incident_id, at, kind, state, detail)"
            " SELECT id, 0, 'x', NULL, '{' FROM incidents LIMIT 1"
        )
        broken = conn.execute("SELECT incident_id FROM events WHERE kind = 'x'").fetchone()[0]
    with httpx.Client(base_url=service.url, headers=auth()) as client:
        for _ in range(300):
            assert client.get(f"/v1/incidents/{broken}").status_code == 500
    hashes = {token_hash(k.token)[:12] for k in keys}

    def paged() -> set[str]:
        return {e["tags"]["token_hash_prefix"] for e in sentry.pages("revocation_failed")}

    # Every key's page arrives (at least once: a page whose transition lost its lease under this
    # load is raised again by the next attempt).
    wait_until(lambda: paged() == hashes, timeout=60)
    # The errors had their budget (20 at once, one per 5 s after), the rest dropped and counted.
    errors = [e for e in sentry.events() if not e.get("tags", {}).get("page")]
    assert 1 <= len(errors) <= 30
    assert (
        metric(httpx.get(f"{service.url}/metrics").text, "leak_responder_sentry_events_dropped_total") >= 270
    )


def test_a_captured_alert_replayed_grows_nothing(sandbox, service):
    token = sandbox.tokens[0]
    body = build_alert([token, "not-a-key-at-all"], url="https://github.com/o/r/blob/main/.env")
    first = service.post_alert(sandbox.github, [], body=body)
    assert first.status_code == 200
    with httpx.Client() as client:
        headers = {
            "Github-Public-Key-Identifier": sandbox.github.key_identifier,
            "Github-Public-Key-Signature": sandbox.github.sign(body),
        }
        for _ in range(200):
            again = client.post(f"{service.url}/v1/alerts/github", content=body, headers=headers)
            assert again.status_code == 200 and again.json() == first.json()
    assert (service.count("alerts"), service.count("sightings"), service.count("incidents")) == (1, 2, 2)
    assert service.events(token).count("received") == 1
