"""What the lookup says besides the owner reaches the people told: org admins get the email (each
address once), the email says when the key was created and last used and, when it was used after the
leak, says so in the subject and body and is urgent; the clean-up steps follow where it was found.
A malformed optional field is logged with its reason and ignored: the key is still revoked, confirmed
and its owner emailed."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from service.sandbox import build_alert
from service.tokens import redact
from tests.integration.operator_helpers import get, operator_env

pytestmark = pytest.mark.integration


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def test_admins_told_once_and_a_key_used_after_the_leak_is_urgent(sandbox, make_service, smtp):
    key = sandbox.supermemory.update_key(
        sandbox.supermemory.keys[1].id,  # owner1@, no second notify address
        org_name="Acme",
        admins=[
            {"email": "Admin@Example.test", "name": "Ada"},
            {"email": "OWNER1@example.test", "name": "Owner again"},
        ],
        created_at="2025-03-04T05:06:07Z",
        last_used_at=rfc3339(time.time() + 3600),  # later than any sighting of this test
    )
    service = make_service({**smtp.env(), **operator_env()})
    comment = "https://github.com/octocat/demo/issues/7#issuecomment-1"
    body = build_alert([key.token], url=comment, source="Issue_Comment")  # capitalised, as GitHub documents
    service.post_alert(sandbox.github, [], body=body)
    service.wait_state(key.token, "closed")

    assert sorted(a for m in smtp.received() for a in m.rcpt_tos) == [
        "admin@example.test",
        "owner1@example.test",
    ]
    message = smtp.to("admin@example.test")[0]
    assert message.email["Subject"] == (
        f"URGENT: your Supermemory API key {redact(key.token)} was used after the leak; it has been revoked"
    )
    assert message.email["Importance"] == "high"
    assert message.part("plain").startswith("Hello Ada,")
    for part in (message.part("plain"), message.part("html")):
        assert "used after the leak" in part.lower()
        assert "Acme" in part and "2025-03-04 05:06:07 UTC" in part
        assert time.strftime("%Y-%m-%d", time.gmtime(time.time() + 3600)) in part
        assert "delete the old revision from the edit history" in part
        assert "Rewrite the repository" not in part, "steps for a comment, not for a file"
    incident = get(service, f"/v1/incidents/{service.incident(key.token)['id']}").json()
    assert incident["used_after_leak"] is True and incident["org_name"] == "Acme"
    assert [(r["email"], r["role"]) for r in incident["recipients"]] == [
        ("owner1@example.test", "owner"),
        ("owner1@example.test", "notify"),
        ("Admin@Example.test", "admin"),
        ("OWNER1@example.test", "admin"),
    ]
    assert sorted((e["recipient"], e["status"]) for e in incident["emails"]) == [
        ("admin@example.test", "sent"),
        ("owner1@example.test", "sent"),
    ]


def test_a_key_last_used_before_the_leak_is_not_urgent(sandbox, make_service, smtp):
    before = rfc3339(time.time() - 86400)
    key = sandbox.supermemory.update_key(sandbox.supermemory.keys[1].id, last_used_at=before)
    service = make_service(smtp.env())
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "closed")
    (message,) = smtp.received()
    assert (
        message.email["Subject"]
        == f"Your Supermemory API key {redact(key.token)} was leaked and has been revoked"
    )
    assert message.email["Importance"] is None
    assert "used after the leak" not in message.part("plain").lower()
    assert "Rewrite the repository" in message.part("plain"), "source content: a file of a repository"


def test_malformed_optional_fields_never_block_the_revoke_or_the_email(sandbox, make_service, smtp):
    key = sandbox.supermemory.update_key(
        sandbox.supermemory.keys[1].id,
        raw={
            "createdAt": 1741064767,
            "lastUsedAt": "not a date",
            "org": {
                "name": "Acme",
                "admins": [{"name": "no address"}, {"email": "admin@example.test"}],
                "channels": [
                    {"id": "c1", "type": "webhook", "url": "https://x.example/"},
                    {"id": "c2", "type": "slack"},
                ],
            },
        },
    )
    service = make_service(smtp.env())
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "closed")
    assert sandbox.supermemory.stats()["effective_revokes"] == {key.id: 1}
    assert sorted(a for m in smtp.received() for a in m.rcpt_tos) == [
        "admin@example.test",
        "owner1@example.test",
    ]
    assert "Created at: unknown" in smtp.to("owner1@example.test")[0].part("plain")

    fields = sorted(
        (r["reason"], r["field"]) for r in service.log_records() if r.get("stage") == "match" and "field" in r
    )
    assert fields == [
        ("channel_malformed", "org.channels[0]"),
        ("channel_malformed", "org.channels[1]"),
        ("lookup_field_malformed", "createdAt"),
        ("lookup_field_malformed", "lastUsedAt"),
        ("lookup_field_malformed", "org.admins[0]"),
    ]
    assert service.failures("match", "lookup_field_malformed") == 3
    assert service.failures("match", "channel_malformed") == 2
    assert "x.example" not in service.log_text(), "a channel's URL is never logged"
    assert service.count("channels") == 0
