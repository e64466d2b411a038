"""What a platform team watches: retention of reporter metadata, metrics and health."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from service.tokens import token_hash
from tests.harness import metric, wait_until

pytestmark = pytest.mark.integration

# About two seconds, so the test sees metadata kept first and purged after.
RETENTION = {"LEAK_RESPONDER_RETENTION_DAYS": str(2 / 86400), "LEAK_RESPONDER_SWEEP_INTERVAL": "0.3"}


def urls(service, token: str) -> list[str | None]:
    with service.db() as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT s.url FROM sightings s JOIN incidents i ON i.id = s.incident_id"
                " WHERE i.token_hash = ?",
                (token_hash(token),),
            )
        ]


def test_reporter_urls_are_purged_after_retention(sandbox, smtp, make_service):
    service = make_service({**smtp.env(), **RETENTION})
    key, not_a_key = sandbox.tokens[0], "sm_" + "N" * 30
    where = "https://github.com/octocat/leaky/blob/main/.env"
    service.post_alert(sandbox.github, [key, not_a_key], url=where)
    service.wait_state(key, "closed")
    assert urls(service, key) == [where], "kept while the incident is recent"
    wait_until(lambda: urls(service, key) == [None] and urls(service, not_a_key) == [None], timeout=20)
    for token in (key, not_a_key):
        assert "reporter_metadata_purged" in service.events(token)
    # Everything else of the record stays: hash, redacted form, timeline, the sighting itself.
    row = service.incident(key)
    assert row["redacted"].startswith("sm_") and row["closed_at"] is not None
    assert service.count("sightings") == 2


def test_open_incidents_keep_their_urls(sandbox, make_service):
    service = make_service(RETENTION)  # no SMTP: confirmed incidents wait to be notified, never close
    key = sandbox.tokens[0]
    service.post_alert(sandbox.github, [key], url="https://x.test/leak")
    service.wait_state(key, "confirmed")
    time.sleep(3)  # past the retention, over several sweeps
    assert urls(service, key) == ["https://x.test/leak"]
    assert "reporter_metadata_purged" not in service.events(key)


def test_metrics_follow_the_pipeline(sandbox, service):
    key = sandbox.tokens[0]
    # Two key-shaped tokens that are no key: the lookup's false positives, counted as transitions.
    service.post_alert(sandbox.github, [key, "not-a-key", f"sm_{'a' * 40}", f"sm_{'b' * 40}"])
    service.wait_state(key, "confirmed")
    refused = httpx.post(f"{service.url}/v1/alerts/github", content=b"[]", timeout=10)
    assert refused.status_code == 401
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert metric(text, "leak_responder_alerts_total", reporter="github", outcome="accepted") == 1
    assert metric(text, "leak_responder_alerts_total", reporter="github", outcome="signature_missing") == 1
    assert metric(text, "leak_responder_failures_total", stage="inbound", reason="signature_missing") == 1
    assert metric(text, "leak_responder_incidents", state="confirmed") == 1
    assert metric(text, "leak_responder_incidents", state="false_positive") == 3
    assert metric(text, "leak_responder_transitions_total", state="revoked") == 1
    assert metric(text, "leak_responder_transitions_total", state="false_positive") == 2
    assert metric(text, "leak_responder_supermemory_calls_total", call="revoke", outcome="revoked") == 1
    assert metric(text, "leak_responder_supermemory_calls_total", call="lookup", outcome="ok") == 1
    assert metric(text, "leak_responder_time_to_revoke_seconds_count") == 1
    assert metric(text, "leak_responder_time_to_confirm_seconds_count") == 1
    assert metric(text, "leak_responder_key_cache_fetches_total", reporter="github") >= 1
    assert metric(text, "leak_responder_key_cache_hits_total", reporter="github") >= 1
    assert metric(text, "leak_responder_pending_work") == 1, "confirmed, but no SMTP: waiting to notify"
    assert metric(text, "leak_responder_due_work") == 0
    # No label carries a token or a hash of one.
    assert token_hash(key) not in text and key not in text
    assert not re.search(r'"[0-9a-f]{64}"', text)


def test_oldest_pending_age_grows_when_work_is_stuck(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_BACKOFF_BASE": "0.01", "LEAK_RESPONDER_BACKOFF_MAX": "0.02"})
    sandbox.supermemory.set_knobs(hang_ms={"revoke": 60_000})
    service.post_alert(sandbox.github, [sandbox.tokens[0]])
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 1)

    def overdue() -> float:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        assert metric(text, "leak_responder_pending_work") == 1
        return metric(text, "leak_responder_oldest_pending_seconds") >= 1.5

    wait_until(overdue)


def test_health(service):
    assert httpx.get(f"{service.url}/livez").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready["status"] == "ok" and all(ready["checks"].values())


def test_logs_are_json_with_the_request_id_on_every_line(sandbox, service):
    accepted = service.post_alert(sandbox.github, [sandbox.tokens[0]])
    refused = httpx.post(f"{service.url}/v1/alerts/github", content=b"[]", timeout=10)
    service.wait_state(sandbox.tokens[0], "confirmed")
    records = service.log_records()
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    for response, message in ((accepted, "alert accepted"), (refused, None)):
        rid = response.headers["x-request-id"]
        lines = [r for r in records if r.get("request_id") == rid]
        assert lines, f"no log line carries request id {rid}"
        if message:
            assert any(r["message"] == message for r in lines)
        else:
            assert [r["reason"] for r in lines if "reason" in r] == ["signature_missing"]
    assert accepted.headers["x-request-id"] != refused.headers["x-request-id"]
