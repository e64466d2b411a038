"""Canary tokens down the channel paths: webhook events, Slack messages and the new email text (with
a used-after-the-leak key, an unconfirmed one, and a sighting URL holding a key) never carry a token,
and channel URLs and secrets never show up in the log, the API, the metrics, Sentry or the database
in clear."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from service.sandbox import ChannelReceiver, SandboxKey, ServerThread
from tests.harness import wait_until
from tests.integration.channel_helpers import ALLOW_LOOPBACK, register, slack, webhook
from tests.integration.operator_helpers import get, operator_env
from tests.integration.test_canary_notify import fragments

pytestmark = pytest.mark.integration

CANARIES = [
    "sm_CanaryChannelAAAAAAAAAAAAAAAAAA_" + "a" * 48,
    "sm_CanaryChannelBBBBBBBBBBBBBBBBBB_" + "b" * 48,
]


@pytest.fixture
def receiver() -> Iterator[tuple[ChannelReceiver, str]]:
    rc = ChannelReceiver()
    with ServerThread(rc.app()) as server:
        yield rc, server.url


def test_no_canary_or_channel_secret_in_any_output(sandbox, make_service, smtp, sentry, receiver, tmp_path):
    rc, base = receiver
    hook, chat = webhook(base, "canary-hook-path"), slack(base, "canary-slack-path")
    refused = webhook(base.replace("127.0.0.1", "127.0.0.2"), "canary-refused-path")
    register(rc, hook)
    rc.behave("/hooks/canary-hook-path", fail_next=1, fail_status=500)
    channels = [hook, chat, refused]
    sandbox.supermemory.add_keys(
        [
            SandboxKey(
                CANARIES[i], f"key_canary_{i}", "org_canary", f"canary {i}", f"canary{i}@example.test",
                "Canary", [], org_name="Canary Org", admins=[{"email": "admin@example.test", "name": "A"}],
                channels=channels, last_used_at="2999-01-01T00:00:00Z",
            )
            for i in range(2)
        ]
    )  # fmt: skip
    service = make_service({**smtp.env(), **sentry.env(), **ALLOW_LOOPBACK, **operator_env()})
    leaky_url = f"https://github.com/octocat/demo/issues/1?k={CANARIES[0]}"
    service.post_alert(sandbox.github, [CANARIES[0]], url=leaky_url)
    service.wait_state(CANARIES[0], "closed")
    sandbox.supermemory.set_knobs(never_revoke=True)
    service.post_alert(sandbox.github, [CANARIES[1]])
    service.wait_state(CANARIES[1], "unconfirmed")  # it stays open, told urgently
    wait_until(lambda: smtp.to("canary1@example.test"))
    wait_until(lambda: len(rc.received("/slack/canary-slack-path")) == 6)
    wait_until(lambda: sentry.pages("revocation_unconfirmed"))

    deliveries = rc.received()
    assert {r.json["type"] for r in deliveries if r.kind == "webhook"} >= {
        "com.supermemory.apikey.leak.matched",
        "com.supermemory.apikey.leak.unconfirmed",
    }
    assert any(r.json["data"]["usedAfterLeak"] for r in deliveries if r.kind == "webhook")
    assert any("sm_Cana" in r.json["text"] for r in deliveries if r.kind == "slack"), "the search is real"
    owner_mail = [m for m in smtp.received() if m.email.is_multipart()]
    assert any("used after the leak" in m.email["Subject"] for m in owner_mail)

    outputs: dict[str, bytes] = {
        f"delivery {i}": r.body + repr(sorted(r.headers.items())).encode() for i, r in enumerate(deliveries)
    }
    outputs |= {f"email {i}": m.raw for i, m in enumerate(smtp.received())}
    outputs |= {
        f"email {i} {t}": m.part(t).encode() for i, m in enumerate(owner_mail) for t in ("plain", "html")
    }
    outputs["sentry"] = sentry.all_bytes()
    outputs["log"] = service.log_path.read_bytes()
    outputs["metrics"] = httpx.get(f"{service.url}/metrics").content
    for token in CANARIES:
        incident = service.incident(token)
        outputs[f"api {token[:12]}"] = get(service, f"/v1/incidents/{incident['id']}").content
    service.stop()
    with sqlite3.connect(service.db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for path in tmp_path.glob("leak-responder.db*"):
        outputs[path.name] = path.read_bytes()

    # Channel ids are no secret; the URLs' paths (a Slack webhook URL is its own credential) are.
    secrets = [hook["secret"], hook["secret"].removeprefix("whsec_")]
    secrets += ["/hooks/canary-hook-path", "/slack/canary-slack-path", "/hooks/canary-refused-path"]
    for name, blob in outputs.items():
        # The database keeps a sighting's URL as the reporter sent it, key and all (the intake's
        # choice, outside this test's subject): there, only the canary that is in no URL is sought.
        for token in CANARIES[1:] if name.startswith("leak-responder.db") else CANARIES:
            for fragment in fragments(token):
                i = blob.find(fragment)
                assert i < 0, (
                    f"canary fragment {fragment[:8]!r}… in {name}: {blob[max(0, i - 200) : i + 50]!r}"
                )
        if name.startswith("delivery"):
            continue  # the receiver is where the URL leads: its own path is no leak
        for secret in secrets:
            i = blob.find(secret.encode())
            assert i < 0, (
                f"channel secret or URL {secret[:12]!r}… in {name}: {blob[max(0, i - 300) : i + 100]!r}"
            )
