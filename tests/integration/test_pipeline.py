"""A verified alert becomes a revoked key proven dead by a 401 probe, through every misbehaviour of
Supermemory the sandbox can produce."""

from __future__ import annotations

import time

import pytest

from service.sandbox import SandboxKey
from service.tokens import token_hash
from tests.harness import wait_until

pytestmark = pytest.mark.integration


def labels(response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {entry["token_hash"]: entry["label"] for entry in response.json()}


def test_key_is_revoked_and_confirmed(sandbox, service):
    token = sandbox.tokens[0]
    response = service.post_alert(sandbox.github, [token])
    assert response.json() == [
        {"token_hash": token_hash(token), "token_type": "supermemory_api_key", "label": "true_positive"}
    ]
    service.wait_state(token, "confirmed")
    key_id = sandbox.supermemory.keys[0].id
    stats = sandbox.supermemory.stats()
    assert stats["effective_revokes"] == {key_id: 1}
    assert stats["probe_calls"][key_id] >= 1
    assert service.events(token) == ["received", "matched", "revoked", "confirmed"]
    row = service.incident(token)
    assert row["revoked_at"] >= row["created_at"] and row["confirmed_at"] >= row["revoked_at"]


def test_not_a_key_is_false_positive_without_revoke(sandbox, service):
    shaped_unknown = "sm_" + "Q" * 30
    unshaped = "ghp_notsupermemory"
    response = service.post_alert(sandbox.github, [shaped_unknown, unshaped])
    assert labels(response) == {
        token_hash(shaped_unknown): "false_positive",
        token_hash(unshaped): "false_positive",
    }
    stats = sandbox.supermemory.stats()
    assert stats["calls"]["revoke"] == 0
    # The shape gate answers without asking Supermemory: only the shaped token was looked up.
    assert stats["lookup_batches"] == [1]
    assert service.incident(shaped_unknown)["token_sealed"] is None
    assert service.incident(unshaped)["token_sealed"] is None
    # Each says why, in its row and in one log line: the lookup did not know one, the other was
    # never asked about. A redelivery decides nothing new and logs nothing again.
    assert service.post_alert(sandbox.github, [shaped_unknown, unshaped]).status_code == 200
    for token, reason in ((shaped_unknown, "not_a_key"), (unshaped, "shape_gate")):
        incident = service.incident(token)
        assert incident["last_reason"] == reason
        assert [r["incident_id"] for r in service.logged(reason)] == [incident["id"]]


def test_key_already_revoked_upstream_is_true_positive(sandbox, service):
    key = sandbox.supermemory.keys[1]
    sandbox.supermemory.add_keys(
        [
            SandboxKey(
                "sm_" + "R" * 22 + "_" + "r" * 64,
                "key_gone",
                key.org_id,
                "old",
                "o@example.test",
                "O",
                [],
                False,
            )
        ]
    )
    token = "sm_" + "R" * 22 + "_" + "r" * 64
    assert labels(service.post_alert(sandbox.github, [token])) == {token_hash(token): "true_positive"}
    service.wait_state(token, "confirmed")
    assert sandbox.supermemory.stats()["effective_revokes"] == {}
    assert "revoked" in service.events(token)


def test_redelivery_gives_same_labels_and_one_revoke(sandbox, service):
    tokens = [sandbox.tokens[0], "sm_" + "Z" * 25]
    first = service.post_alert(sandbox.github, tokens)
    service.wait_state(tokens[0], "confirmed")
    second = service.post_alert(sandbox.github, tokens)
    assert first.json() == second.json()
    assert sandbox.supermemory.stats()["revoke_calls"] == {sandbox.supermemory.keys[0].id: 1}
    assert service.count("incidents") == 2
    # The same body is the same alert, and its sightings are already there: a replay grows nothing.
    assert service.count("alerts") == 1
    assert service.count("sightings") == 2


def test_same_token_twice_in_one_alert(sandbox, service):
    token = sandbox.tokens[2]
    response = service.post_alert(sandbox.github, [token, token])
    assert len(response.json()) == 1
    service.wait_state(token, "confirmed")
    assert sandbox.supermemory.stats()["revoke_calls"] == {sandbox.supermemory.keys[2].id: 1}


def test_propagation_delay_ends_confirmed(sandbox, service):
    sandbox.supermemory.set_knobs(propagation_delay_s=0.7)
    token = sandbox.tokens[0]
    service.post_alert(sandbox.github, [token])
    service.wait_state(token, "confirmed")
    events = service.events(token)
    assert "probe_alive" in events
    assert events[-1] == "confirmed"


def test_key_that_stays_alive_ends_unconfirmed_and_pages(sandbox, service):
    sandbox.supermemory.set_knobs(never_revoke=True)
    token = sandbox.tokens[0]
    service.post_alert(sandbox.github, [token])
    service.wait_state(token, "unconfirmed")
    key_id = sandbox.supermemory.keys[0].id
    # Revoked once, re-issued once halfway through the probe schedule.
    assert sandbox.supermemory.stats()["revoke_calls"] == {key_id: 2}
    assert "revocation_unconfirmed" in service.incident(token)["pages"]
    pages = service.logged("revocation_unconfirmed")
    assert pages and pages[0]["level"] == "critical" and pages[0]["page"] is True
    # No SENTRY_DSN: that log line is the whole page, as the start-up notice warned.
    (notice,) = service.logged("pager_log_only")
    assert notice["level"] == "warning"


def test_token_gone_before_the_probe_ends_unconfirmed(sandbox, make_service):
    """A sealed token wiped behind the service's back leaves nothing to probe with: the revoke can
    never be proven, so the incident ends unconfirmed and pages, rather than waiting forever."""
    sandbox.supermemory.set_knobs(propagation_delay_s=600)
    # The second probe is an hour away: the incident waits at `revoked` for as long as the test needs.
    service = make_service({"LEAK_RESPONDER_PROBE_SCHEDULE": "0,3600"})
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: "probe_alive" in service.events(key.token))
    assert service.state(key.token) == "revoked"
    # A probe would now get its 401: only the token is missing. The probe is brought forward to now.
    sandbox.supermemory.set_knobs(propagation_delay_s=0)
    with service.db(writable=True) as conn:
        conn.execute(
            "UPDATE incidents SET token_sealed = NULL, next_run_at = ? WHERE token_hash = ?",
            (time.time(), token_hash(key.token)),
        )
    service.wait_state(key.token, "unconfirmed")
    incident = service.incident(key.token)
    assert incident["last_reason"] == "token_unavailable"
    assert "revocation_unconfirmed" in incident["pages"]
    # The failure's own line, then the transition's.
    failed, moved = service.logged("token_unavailable")
    assert (failed["stage"], failed["level"], failed["incident_id"]) == ("confirm", "error", incident["id"])
    assert (moved["message"], moved["incident_id"]) == ("incident unconfirmed", incident["id"])
    (page,) = service.logged("revocation_unconfirmed")
    assert page["incident_id"] == incident["id"] and page["level"] == "critical"
    assert service.failures("confirm", "token_unavailable") == 1
    assert service.failures("alerting", "revocation_unconfirmed") == 1
    assert sandbox.supermemory.stats()["probe_calls"] == {key.id: 1}, "no probe without a token"


def test_a_step_that_raises_is_step_crashed_and_the_others_go_on(sandbox, make_service, tmp_path):
    keys = sandbox.supermemory.keys[:3]
    parked = make_service({"LEAK_RESPONDER_MODE": "dry-run"})
    parked.post_alert(sandbox.github, [k.token for k in keys])
    for key in keys:
        wait_until(lambda key=key: "revoke_skipped" in parked.events(key.token))
    parked.stop()
    broken = keys[0]
    # Matched, yet without the key id a revoke needs: a row no step expects (a bug, a hand edit).
    with parked.db(writable=True) as conn:
        conn.execute("UPDATE incidents SET key_id = NULL WHERE token_hash = ?", (token_hash(broken.token),))

    service = make_service(workdir=tmp_path)  # enforcing: the parked revokes resume
    for key in keys[1:]:
        service.wait_state(key.token, "confirmed")
    # The broken step's lease runs out and it runs (and raises) again: a line and a count each time.
    wait_until(lambda: len(service.logged("step_crashed")) >= 2)
    record = service.logged("step_crashed")[0]
    assert (record["stage"], record["level"]) == ("worker", "error")
    assert "AssertionError" in record["exception"]
    assert service.failures("worker", "step_crashed") >= 2
    assert service.state(broken.token) == "matched"
    assert sandbox.supermemory.stats()["effective_revokes"] == {k.id: 1 for k in keys[1:]}


@pytest.mark.parametrize(
    ("route", "knobs"),
    [
        ("revoke", {"fail_next": {"revoke": 3}, "fail_status": {"revoke": 503}}),
        ("revoke", {"fail_next": {"revoke": 2}, "fail_status": {"revoke": 429}, "retry_after": 0.3}),
        ("revoke", {"hang_ms": {"revoke": 1500}}),
        ("probe", {"fail_next": {"probe": 3}, "fail_status": {"probe": 500}}),
        ("probe", {"fail_next": {"probe": 2}, "fail_status": {"probe": 429}, "retry_after": 0.2}),
    ],
    ids=["revoke-5xx", "revoke-429-retry-after", "revoke-timeout", "probe-5xx", "probe-429"],
)
def test_supermemory_failures_are_retried_to_success(sandbox, service, route, knobs):
    sandbox.supermemory.set_knobs(**knobs)
    token = sandbox.tokens[0]
    service.post_alert(sandbox.github, [token])
    if "hang_ms" in knobs:
        # The hang outlasts the client's 1 s timeout every time; lift it once one retry is seen.
        wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 2)
        sandbox.supermemory.set_knobs(hang_ms={})
    service.wait_state(token, "confirmed")
    key_id = sandbox.supermemory.keys[0].id
    assert sandbox.supermemory.stats()["effective_revokes"] == {key_id: 1}
    reasons = {r.get("reason") for r in service.log_records()}
    expected = {
        "revoke-5xx": "server_error",
        "revoke-429-retry-after": "rate_limited",
        "revoke-timeout": "timeout",
        "probe-5xx": "probe_server_error",
        "probe-429": "probe_rate_limited",
    }
    name = {
        ("revoke", 503): "revoke-5xx",
        ("revoke", 429): "revoke-429-retry-after",
        ("probe", 500): "probe-5xx",
        ("probe", 429): "probe-429",
    }.get((route, knobs.get("fail_status", {}).get(route)), "revoke-timeout")
    assert expected[name] in reasons


def test_retry_after_is_honoured(sandbox, service):
    sandbox.supermemory.set_knobs(fail_next={"revoke": 1}, fail_status={"revoke": 429}, retry_after=1.0)
    token = sandbox.tokens[0]
    service.post_alert(sandbox.github, [token])
    service.wait_state(token, "confirmed")
    row = service.incident(token)
    # Backoff alone (base 0.05 s) would retry within a tenth of a second; Retry-After holds it to 1 s.
    assert row["revoked_at"] - row["created_at"] >= 1.0


def test_lookup_down_during_request_then_revoked_later(sandbox, service):
    sandbox.supermemory.set_knobs(fail_next={"lookup": 2}, fail_status={"lookup": 503})
    token = sandbox.tokens[3]
    other = "not-a-key-at-all"
    response = service.post_alert(sandbox.github, [token, other])
    # The key's label is left out; the obvious false positive is still answered.
    assert labels(response) == {token_hash(other): "false_positive"}
    service.wait_state(token, "confirmed")
    assert labels(service.post_alert(sandbox.github, [token, other])) == {
        token_hash(token): "true_positive",
        token_hash(other): "false_positive",
    }


def test_slow_lookup_never_fails_the_alert(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_REQUEST_BUDGET": "0.5", "LEAK_RESPONDER_HTTP_TIMEOUT": "3"})
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 1200})
    token = sandbox.tokens[0]
    response = service.post_alert(sandbox.github, [token])
    assert response.status_code == 200
    assert response.json() == []
    assert response.elapsed.total_seconds() < 1.2
    service.wait_state(token, "confirmed")


def test_lookup_batches_hold_at_most_100(sandbox, service):
    tokens = [f"sm_{i:030d}" for i in range(250)] + [sandbox.tokens[0]]
    response = service.post_alert(sandbox.github, tokens)
    assert len(response.json()) == 251
    assert sorted(sandbox.supermemory.stats()["lookup_batches"]) == [51, 100, 100]
    service.wait_state(sandbox.tokens[0], "confirmed")


def test_dry_run_revokes_nothing(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_MODE": "dry-run"})
    token = sandbox.tokens[0]
    assert labels(service.post_alert(sandbox.github, [token])) == {token_hash(token): "true_positive"}
    wait_until(lambda: "revoke_skipped" in service.events(token))
    assert service.state(token) == "matched"
    assert sandbox.supermemory.stats()["calls"]["revoke"] == 0
