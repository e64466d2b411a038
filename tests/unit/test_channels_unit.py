"""Channel pieces on their own: our Standard Webhooks signer against the reference package, the
network rule on resolved addresses, the classification of answers, and the documents sent."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.channels import network, signing
from service.channels.network import AddressPolicy, AddressRefused, ResolutionFailed
from service.channels.payload import cloud_event, event_id, slack_message
from service.channels.sender import classify
from service.reasons import Reason
from service.store import ChannelJob, ChannelType, Sighting, State
from tests.unit.test_notify_compose import incident

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


# -- signing -----------------------------------------------------------------------------------------


def test_our_signature_is_what_the_reference_implementation_accepts():
    body = b'{"specversion":"1.0","id":"evt_1"}'
    now = int(datetime.now(UTC).timestamp())
    headers = signing.headers(SECRET, "evt_1", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == {"specversion": "1.0", "id": "evt_1"}
    assert (
        Webhook(SECRET).sign("evt_1", datetime.fromtimestamp(now, UTC), body.decode())
        == headers["webhook-signature"]
    )
    signing.verify(SECRET, headers, body, now)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: ({**h, "webhook-id": "evt_2"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
    ],
)
def test_a_tampered_delivery_fails_both_checks(tamper):
    body = b'{"a":1}'
    now = int(datetime.now(UTC).timestamp())
    headers, body = tamper(signing.headers(SECRET, "evt_1", now, body), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, headers)
    with pytest.raises(signing.SignatureError):
        signing.verify(SECRET, headers, body, now)


def test_an_old_timestamp_is_refused():
    headers = signing.headers(SECRET, "evt_1", 1_000_000, b"{}")
    with pytest.raises(signing.SignatureError, match="tolerance"):
        signing.verify(SECRET, headers, b"{}", 1_000_000 + 301)


# -- the network rule --------------------------------------------------------------------------------


def resolve(policy: AddressPolicy, url: str, answers: list[str] | None = None, monkeypatch=None):
    if answers is not None:

        async def lookup(host: str, port: int):
            return [ipaddress.ip_address(a) for a in answers]

        monkeypatch.setattr(network, "_lookup", lookup)
    return asyncio.run(policy.resolve(url))


def test_https_to_a_public_address_is_allowed_and_connects_to_the_checked_address(monkeypatch):
    target = resolve(AddressPolicy(), "https://hooks.example.com/x?y=1", ["93.184.216.34"], monkeypatch)
    assert target.connect_url == "https://93.184.216.34:443/x?y=1"
    assert (target.host_header, target.host) == ("hooks.example.com", "hooks.example.com")
    v6 = resolve(AddressPolicy(), "https://hooks.example.com:8443/", ["2606:4700::1111"], monkeypatch)
    assert v6.connect_url == "https://[2606:4700::1111]:8443/" and v6.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize(
    ("url", "answers"),
    [
        ("http://hooks.example.com/x", ["93.184.216.34"]),  # public, but not https
        ("https://rebind.example.com/", ["169.254.169.254"]),  # a public name resolving to metadata
        ("https://mixed.example.com/", ["93.184.216.34", "10.0.0.5"]),  # one private answer suffices
        ("https://127.0.0.1/", None),
        ("https://[::ffff:127.0.0.1]/", None),
        ("https://[::1]/", None),
        ("ftp://hooks.example.com/", ["93.184.216.34"]),
        ("https://user:pw@hooks.example.com/", ["93.184.216.34"]),
        ("https://hooks.example.com:99999/", ["93.184.216.34"]),
    ],
)
def test_refused_urls(url, answers, monkeypatch):
    with pytest.raises(AddressRefused) as refused:
        resolve(AddressPolicy(), url, answers, monkeypatch)
    assert url not in str(refused.value)


def test_an_allowed_network_admits_http_there_and_only_there(monkeypatch):
    policy = AddressPolicy([ipaddress.ip_network("10.1.0.0/16")])
    assert (
        resolve(policy, "http://internal.example/x", ["10.1.2.3"], monkeypatch).connect_url
        == "http://10.1.2.3:80/x"
    )
    with pytest.raises(AddressRefused):
        resolve(policy, "http://other.example/x", ["10.2.0.1"], monkeypatch)


def test_a_name_that_does_not_resolve_is_worth_another_try(monkeypatch):
    async def fails(*args, **kwargs):
        raise socket.gaierror("nope")

    loop = asyncio.new_event_loop()
    monkeypatch.setattr(loop, "getaddrinfo", fails)
    with pytest.raises(ResolutionFailed):
        loop.run_until_complete(AddressPolicy().resolve("https://nowhere.invalid/"))
    loop.close()


# -- answers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "retryable"),
    [
        (200, None, False),
        (204, None, False),
        (410, Reason.CHANNEL_GONE, False),
        (429, Reason.RATE_LIMITED, True),
        (500, Reason.SERVER_ERROR, True),
        (503, Reason.SERVER_ERROR, True),
        (301, Reason.CHANNEL_REDIRECTED, False),
        (307, Reason.CHANNEL_REDIRECTED, False),
        (400, Reason.CHANNEL_REJECTED, False),
        (404, Reason.CHANNEL_REJECTED, False),
    ],
)
def test_classification(status, reason, retryable):
    attempt = classify(status, "2")
    assert (attempt.reason, attempt.retryable, attempt.status) == (reason, retryable, status)
    assert attempt.retry_after == (2.0 if status == 429 else None)


# -- documents ---------------------------------------------------------------------------------------


def job(state: State = State.REVOKED) -> ChannelJob:
    return ChannelJob("inc_1", "wh", ChannelType.WEBHOOK, state, "https://x.example/", SECRET, 1, 10.0, False)


def test_the_event_says_what_was_true_at_its_state_and_never_the_hash():
    token = "sm_" + "Q" * 40
    sightings = [Sighting("github", f"https://x.test/?k={token}", "commit", "t", None, 1.0)]
    matched = json.loads(cloud_event(job(State.MATCHED), incident(key_last_used_at=5.0), sightings))
    assert matched["type"] == "com.supermemory.apikey.leak.matched"
    assert matched["time"] == "1970-01-01T00:00:10.000Z" and matched["subject"] == "key_1"
    assert matched["data"]["revokedAt"] is None and matched["data"]["usedAfterLeak"] is True
    assert matched["data"]["sightings"] == [
        {"reporter": "github", "source": "commit", "url": "https://x.test/?k=sm_QQQQ…QQQQ"}
    ]
    confirmed = json.loads(cloud_event(job(State.CONFIRMED), incident(), []))
    assert confirmed["data"]["confirmedAt"] == "1970-01-01T00:00:03.000Z"
    for document in (matched, confirmed):
        assert "h" * 64 not in json.dumps(document)
    assert event_id(job(State.MATCHED)) == event_id(job(State.MATCHED)) != event_id(job(State.CONFIRMED))


def test_slack_text_is_escaped():
    message = json.loads(slack_message(job(), incident(key_name="<!channel> & co"), []))
    assert "<!channel>" not in json.dumps(message) and "&lt;!channel&gt; &amp; co" in message["text"]
    assert message["blocks"][0]["text"]["text"] == f"*{message['text']}*"


def test_slack_lists_ten_sightings_at_most():
    sightings = [Sighting("github", f"https://x.test/{n}", "commit", "t", None, 1.0) for n in range(25)]
    found = json.loads(slack_message(job(), incident(), sightings))["blocks"][2]["text"]["text"]
    assert found.count("https://x.test/") == 10 and found.endswith("… and 15 more")
