"""The org's own endpoints hear of each state once: a real receiver on loopback gets CloudEvents
signed the Standard Webhooks way (checked with the reference package) and Slack messages; an
endpoint that is slow, failing, redirecting, refused or gone costs the pipeline and the other
channels nothing, and each outcome is on the incident's timeline, in the log and in the metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from service.cli import main
from service.sandbox import ChannelReceiver, ServerThread
from service.tokens import token_hash
from tests.harness import metric, wait_until
from tests.integration.channel_helpers import (
    ALLOW_LOOPBACK,
    STATES,
    register,
    slack,
    verified_events,
    webhook,
)
from tests.integration.operator_helpers import TOKENS, get, operator_env

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[tuple[ChannelReceiver, str]]:
    rc = ChannelReceiver()
    with ServerThread(rc.app()) as server:
        yield rc, server.url


def channel_key(sandbox, index: int, *channels):
    """A seeded key of the sandbox whose org has these channels."""
    return sandbox.supermemory.update_key(
        sandbox.supermemory.keys[index].id, org_name="Acme", channels=list(channels)
    )


def timeline(service, token: str) -> list[dict]:
    with service.db() as conn:
        return [
            {"kind": r["kind"], **json.loads(r["detail"])}
            for r in conn.execute(
                "SELECT e.kind, e.detail FROM events e JOIN incidents i ON i.id = e.incident_id"
                " WHERE i.token_hash = ? AND e.kind LIKE 'channel_%' ORDER BY e.id",
                (token_hash(token),),
            )
        ]


def test_each_state_reaches_the_webhook_signed_and_the_slack_channel(
    sandbox, make_service, receiver, capsys, monkeypatch
):
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    rc, base = receiver
    # The Slack URL names a host: the rule checks the address it resolves to, the connection goes
    # there, and the request still speaks to the name (Host header).
    hook, chat = webhook(base, "acme"), slack(base.replace("127.0.0.1", "localhost"), "acme")
    register(rc, hook)
    key = channel_key(sandbox, 1, hook, chat)
    service = make_service({**ALLOW_LOOPBACK, **operator_env()})
    service.post_alert(sandbox.github, [key.token], url="https://github.com/octocat/demo/issues/7")
    service.wait_state(key.token, "confirmed")
    wait_until(lambda: len(rc.received("/hooks/acme")) == 3 and len(rc.received("/slack/acme")) == 3)

    events = verified_events(rc.received("/hooks/acme"), hook["secret"])
    assert [e["type"] for e in events] == [f"com.supermemory.apikey.leak.{s}" for s in STATES]
    incident = service.incident(key.token)
    for event, state in zip(events, STATES, strict=True):
        assert event["specversion"] == "1.0" and event["source"] == "/leak-responder"
        assert event["subject"] == key.id
        data = event["data"]
        assert (data["incidentId"], data["keyId"], data["orgId"], data["state"]) == (
            incident["id"], key.id, key.org_id, state,
        )  # fmt: skip
        assert data["redacted"] == incident["redacted"] and data["keyName"] == key.name
        assert data["sightings"] == [
            {"reporter": "github", "source": "content", "url": "https://github.com/octocat/demo/issues/7"}
        ]
        assert data["usedAfterLeak"] is False and data["lastUsedAt"] is not None
    assert events[0]["data"]["revokedAt"] is None, "a matched event says what was true when matched"
    assert events[1]["data"]["revokedAt"] is not None and events[1]["data"]["confirmedAt"] is None
    assert events[2]["data"]["confirmedAt"] is not None
    assert len({e["id"] for e in events}) == 3
    assert all(
        r.headers["webhook-id"] == e["id"] for r, e in zip(rc.received("/hooks/acme"), events, strict=True)
    )
    raw = b"".join(r.body + str(r.headers).encode() for r in rc.received())
    assert key.token.encode() not in raw and key.token[3:].encode() not in raw
    assert incident["token_hash"].encode() not in raw, "never the token's hash either"

    messages = [r.json for r in rc.received("/slack/acme")]
    assert {r.headers["host"] for r in rc.received("/slack/acme")} == {
        base.replace("http://127.0.0.1", "localhost")
    }
    assert [m["blocks"][1]["fields"][0]["text"] for m in messages] == [f"*State*\n{s}" for s in STATES]
    assert all(incident["redacted"] in m["text"] and "Acme" in m["text"] for m in messages)
    assert "confirmed dead" in messages[2]["text"]

    wait_until(lambda: len(timeline(service, key.token)) == 6)
    kinds = [(e["kind"], e["channel_id"], e["event_state"]) for e in timeline(service, key.token)]
    assert sorted(kinds) == sorted(
        ("channel_delivered", c, s) for c in ("wh_acme", "sl_acme") for s in STATES
    )
    shown = get(service, f"/v1/incidents/{incident['id']}").json()
    assert {(c["channel_id"], c["event_state"], c["status"]) for c in shown["channels"]} == {
        (c, s, "sent") for c in ("wh_acme", "sl_acme") for s in STATES
    }
    assert "url" not in str(shown["channels"]) and hook["secret"] not in str(shown)
    assert main(["incidents", "show", incident["id"], "--url", service.url]) == 0
    shown_text = capsys.readouterr().out
    assert "wh_acme (webhook)  confirmed   sent     x1" in shown_text
    assert "owner   owner1@example.test  -" in shown_text, "no email without SMTP"
    assert hook["url"] not in shown_text
    # An outcome is committed, then counted: the counter follows the timeline.
    wait_until(lambda: sent_count(service, "webhook") == 3 and sent_count(service, "slack") == 3)


def sent_count(service, kind: str) -> float:
    text = httpx.get(f"{service.url}/metrics").text
    return metric(text, "leak_responder_channel_deliveries_total", type=kind, outcome="sent")


def reasons(service, stage: str = "channels") -> list[tuple[str, str | None]]:
    return [(r["reason"], r.get("channel_id")) for r in service.log_records() if r.get("stage") == stage]


def test_faulty_endpoints_cost_the_pipeline_and_the_other_channels_nothing(sandbox, make_service, receiver):
    rc, base = receiver
    good, slow, flaky, moved, gone = (webhook(base, n) for n in ("good", "slow", "flaky", "moved", "gone"))
    refused = webhook(base.replace("127.0.0.1", "127.0.0.2"), "refused")
    rejecting = slack(base, "rejecting")
    register(rc, good, slow, flaky, moved, gone)
    rc.behave("/hooks/slow", delay=3.0)  # past LEAK_RESPONDER_HTTP_TIMEOUT (1 s in the tests)
    rc.behave("/hooks/flaky", fail_next=2, fail_status=503)
    rc.behave("/hooks/moved", redirect=f"{base}/hooks/good")
    rc.behave("/hooks/gone", status=410)
    rc.behave("/slack/rejecting", status=404)
    key = channel_key(sandbox, 1, good, slow, flaky, moved, gone, refused, rejecting)
    service = make_service({**ALLOW_LOOPBACK, **operator_env()})
    service.post_alert(sandbox.github, [key.token])

    # The pipeline and the healthy channel go all the way while the slow one has delivered nothing.
    service.wait_state(key.token, "confirmed")
    wait_until(lambda: len(rc.received("/hooks/good")) == 3)
    verified_events(rc.received("/hooks/good"), good["secret"])
    slow_outcomes = wait_until(
        lambda: [e for e in timeline(service, key.token) if e["channel_id"] == "wh_slow"]
    )
    assert [(e["kind"], e["reason"], e["event_state"]) for e in slow_outcomes] == [
        ("channel_retrying", "timeout", "matched")
    ], "nothing delivered to it; its later events wait behind the first"

    # The flaky one is retried with backoff and delivered, under the same event id each time.
    wait_until(lambda: len([r for r in rc.received("/hooks/flaky") if r.status == 200]) == 3)
    flaky_ids = [r.headers["webhook-id"] for r in rc.received("/hooks/flaky")]
    assert flaky_ids[:3] == [flaky_ids[0]] * 3, "the first event, tried three times under one id"
    verified_events(rc.received("/hooks/flaky"), flaky["secret"])

    # A redirect is not followed: nothing more reaches the target than its own three events.
    assert len(rc.received("/hooks/good")) == 3
    # 410: the first event stops the channel; the incident's later states are not sent to it.
    assert [r.json["type"] for r in rc.received("/hooks/gone")] == ["com.supermemory.apikey.leak.matched"]
    assert rc.received("/hooks/refused") == [], "refused before any connection"

    rc.behave("/hooks/slow", delay=0.0)
    wait_until(
        lambda: (
            [e["kind"] for e in timeline(service, key.token) if e["channel_id"] == "wh_slow"].count(
                "channel_delivered"
            )
            == 3
        )
    )
    by_id: dict[str, int] = {}
    for r in rc.received("/hooks/slow"):
        by_id[r.headers["webhook-id"]] = by_id.get(r.headers["webhook-id"], 0) + 1
    assert len(by_id) == 3, "retries of a timed-out event keep its id"

    def final(channel: str) -> list[tuple[str, str | None]]:
        return [
            (e["kind"], e.get("reason")) for e in timeline(service, key.token) if e["channel_id"] == channel
        ]

    # Each event of a refusing channel is refused on its own (the next one may fare better); 410 alone
    # stops the channel for the incident.
    wait_until(lambda: all(len(final(c)) == 3 for c in ("sl_rejecting", "wh_refused", "wh_moved")))
    assert final("wh_moved") == [("channel_refused", "channel_redirected")] * 3
    assert final("wh_gone") == [("channel_gone", "channel_gone")]
    assert final("wh_refused") == [("channel_refused", "channel_address_refused")] * 3
    assert final("sl_rejecting") == [("channel_refused", "channel_rejected")] * 3
    assert final("wh_flaky")[0] == ("channel_retrying", "server_error")
    assert [k for k, _ in final("wh_flaky")].count("channel_delivered") == 3

    expected_log = [
        ("channel_redirected", "wh_moved"),
        ("channel_gone", "wh_gone"),
        ("channel_address_refused", "wh_refused"),
        ("channel_rejected", "sl_rejecting"),
        ("server_error", "wh_flaky"),
        ("timeout", "wh_slow"),
    ]
    wait_until(lambda: set(expected_log) <= set(reasons(service)))
    counts = {"channel_redirected": 3, "channel_address_refused": 3, "channel_rejected": 3}
    counts |= {"channel_gone": 1, "server_error": 2}
    wait_until(lambda: {r: service.failures("channels", r) for r in counts} == counts)
    incident = get(service, f"/v1/incidents/{service.incident(key.token)['id']}").json()
    statuses = {(c["channel_id"], c["event_state"]): c["status"] for c in incident["channels"]}
    assert statuses[("wh_gone", "matched")] == "gone"
    assert {statuses[("wh_gone", s)] for s in ("revoked", "confirmed") if ("wh_gone", s) in statuses} <= {
        "gone"
    }
    assert statuses[("wh_refused", "matched")] == "refused"
    log = service.log_text()
    for channel in (good, slow, flaky, moved, gone, refused, rejecting):
        assert channel["url"] not in log and channel.get("secret", "whsec_none") not in log


def test_rate_limits_are_honoured_and_a_dead_endpoint_is_given_up_not_paged(
    sandbox, make_service, receiver, sentry
):
    rc, base = receiver
    limited, dead = webhook(base, "limited"), slack(base, "dead")
    register(rc, limited)
    rc.behave("/hooks/limited", fail_next=1, fail_status=429, retry_after=0.5)
    rc.behave("/slack/dead", status=503)
    key = channel_key(sandbox, 1, limited, dead)
    service = make_service({**ALLOW_LOOPBACK, **sentry.env(), "LEAK_RESPONDER_CHANNEL_GIVE_UP_AFTER": "1.5"})
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: len([r for r in rc.received("/hooks/limited") if r.status == 200]) == 3)
    first, second = rc.received("/hooks/limited")[:2]
    assert first.status == 429 and second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.at - first.at >= 0.5, "Retry-After is a floor"
    assert ("rate_limited", "wh_limited") in reasons(service)

    wait_until(lambda: len([e for e in timeline(service, key.token) if e["kind"] == "channel_gave_up"]) == 3)
    gave_up = [e for e in timeline(service, key.token) if e["kind"] == "channel_gave_up"]
    assert {(e["channel_id"], e["last_reason"]) for e in gave_up} == {("sl_dead", "server_error")}
    wait_until(lambda: service.failures("channels", "channel_gave_up") == 3)
    assert ("channel_gave_up", "sl_dead") in reasons(service)
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "leak_responder_channel_deliveries_total", type="slack", outcome="gave_up") == 3
    assert not [e for e in sentry.events() if "channel" in json.dumps(e)], "a channel failure never pages"
