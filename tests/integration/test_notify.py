"""Owners hear from us once, after the 401 proof: a real SMTP server on loopback receives the mail,
through SMTP outages, redeliveries, refusals and a SIGKILL between a send and its commit."""

from __future__ import annotations

import dataclasses
import time

import pytest

from service.sandbox import SandboxKey, seeded_keys
from service.tokens import redact
from tests.harness import wait_until

pytestmark = pytest.mark.integration

# Seeded keys: owners are shared round-robin over 3 owners for 6 keys; owner n lists
# security{n}@ as a second recipient when n is even. So key 0 → owner0 + security0, key 1 → owner1
# alone, and keys 0 and 3 share owner0.


def reasons(service) -> set[str]:
    return {r.get("reason") for r in service.log_records()}


def test_owner_email_after_confirm(sandbox, make_service, smtp):
    service = make_service(smtp.env())
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token], url="https://github.com/octocat/demo/blob/main/.env")
    service.wait_state(key.token, "closed")
    assert sorted(a for m in smtp.received() for a in m.rcpt_tos) == [
        "owner0@example.test",
        "security0@example.test",
    ]
    message = smtp.to("owner0@example.test")[0]
    assert message.email["From"] == "leak-responder@example.test"
    assert message.email["Reply-To"] == "security@example.test"
    assert (
        message.email["Subject"]
        == f"Your Supermemory API key {redact(key.token)} was leaked and has been revoked"
    )
    for part in (message.part("plain"), message.part("html")):
        assert redact(key.token) in part
        assert key.name in part and key.org_id in part
        assert "https://github.com/octocat/demo/blob/main/.env" in part
        assert "source: content" in part
        assert "Create a replacement key" in part
        assert "security@example.test" in part
    assert "Hello Sandbox Owner 0" in message.part("plain")
    for m in smtp.received():
        assert key.token.encode() not in m.raw
        assert key.token[3:].encode() not in m.raw
    assert service.events(key.token)[-3:] == ["confirmed", "notified", "closed"]
    assert service.incident(key.token)["token_sealed"] is None


def test_one_email_lists_every_key_of_an_owner_in_one_alert(sandbox, make_service, smtp):
    service = make_service(smtp.env())
    keys = sandbox.supermemory.keys
    tokens = [keys[0].token, keys[3].token, keys[1].token]
    service.post_alert(sandbox.github, tokens)
    for token in tokens:
        service.wait_state(token, "closed")
    to_owner0 = smtp.to("owner0@example.test")
    assert len(to_owner0) == 1
    body = to_owner0[0].part("plain")
    assert redact(keys[0].token) in body and redact(keys[3].token) in body
    assert redact(keys[1].token) not in body
    assert to_owner0[0].email["Subject"] == "2 of your Supermemory API keys were leaked and have been revoked"
    assert len(smtp.to("security0@example.test")) == 1
    assert len(smtp.to("owner1@example.test")) == 1
    assert len(smtp.received()) == 3


def test_redelivery_sends_no_second_email(sandbox, make_service, smtp):
    service = make_service(smtp.env())
    token = sandbox.tokens[1]
    service.post_alert(sandbox.github, [token])
    service.wait_state(token, "closed")
    assert service.post_alert(sandbox.github, [token]).status_code == 200  # committed before the 200
    time.sleep(1.0)
    assert len(smtp.to("owner1@example.test")) == 1
    assert len(smtp.received()) == 1


def test_smtp_down_then_up_delivers_once(sandbox, make_service, smtp):
    smtp.stop()
    service = make_service(smtp.env())
    token = sandbox.tokens[1]
    service.post_alert(sandbox.github, [token])
    wait_until(lambda: service.events(token).count("notify_pending") >= 2)
    assert service.state(token) == "confirmed"
    assert service.incident(token)["last_reason"] == "smtp_unavailable"
    assert "smtp_unavailable" in reasons(service)
    smtp.start()
    service.wait_state(token, "closed")
    time.sleep(0.5)
    assert len(smtp.to("owner1@example.test")) == 1
    assert len(smtp.received()) == 1


def test_killed_after_send_before_commit_sends_again(sandbox, make_service, smtp, tmp_path):
    """At-least-once (docs/notify.md): the owner may get the same message twice, never none."""
    service = make_service(smtp.env())

    def kill_once(message) -> None:
        # The server holds the whole message; the service dies before it hears the 250 and so
        # before its outbox can record the send.
        if len(smtp.received()) == 1:
            service.kill()

    smtp.on_message = kill_once
    token = sandbox.tokens[1]
    service.post_alert(sandbox.github, [token])
    wait_until(lambda: service.proc.poll() is not None)
    assert service.state(token) == "confirmed"
    with service.db() as conn:
        assert [tuple(r) for r in conn.execute("SELECT status FROM deliveries")] == [("sending",)]

    restarted = make_service(smtp.env(), workdir=tmp_path)
    restarted.wait_state(token, "closed")
    copies = smtp.to("owner1@example.test")
    assert len(copies) == 2
    assert copies[0].email["Message-ID"] == copies[1].email["Message-ID"]
    assert "resend_unknown_outcome" in reasons(restarted)
    assert restarted.events(token).count("notified") == 1


def test_refused_recipient_tells_the_security_contact(sandbox, make_service, smtp):
    smtp.refuse = {"owner1@example.test"}
    service = make_service(smtp.env())
    key = sandbox.supermemory.keys[1]
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "closed")
    assert smtp.to("owner1@example.test") == []
    notices = smtp.to("security@example.test")
    assert len(notices) == 1
    assert "owner1@example.test" in notices[0].email["Subject"]
    assert redact(key.token) in notices[0].part("plain")
    assert "550" in notices[0].part("plain")
    assert "recipient_refused" in reasons(service)
    assert "owner_unreachable" in service.incident(key.token)["pages"]


def test_unconfirmed_key_gets_an_urgent_email_then_a_follow_up_when_it_dies(sandbox, make_service, smtp):
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service({**smtp.env(), "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.5"})
    key = sandbox.supermemory.keys[1]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: "notified" in service.events(key.token))
    # Told, but not closed: the key may still work, so its sealed token stays for the re-probes.
    incident = service.incident(key.token)
    assert incident["state"] == "unconfirmed" and incident["token_sealed"] is not None
    assert incident["notified_at"] is not None and incident["next_run_at"] is not None
    (message,) = smtp.to("owner1@example.test")
    assert message.email["Subject"].startswith("URGENT: rotate your Supermemory API key")
    assert message.email["Importance"] == "high"
    assert "may still work" in message.part("plain")
    assert "Rotate now" in message.part("html")
    events = service.events(key.token)
    assert events.index("unconfirmed") < events.index("notified")

    # A re-probe finds it dead: the owner hears the end of it, once, in a message of its own.
    sandbox.supermemory.set_knobs(never_revoke=False)
    service.wait_state(key.token, "closed")
    urgent, follow_up = smtp.to("owner1@example.test")
    assert follow_up.email["Subject"] == (
        f"Your leaked Supermemory API key {incident['redacted']} is now confirmed revoked"
    )
    assert follow_up.email["Message-ID"] != urgent.email["Message-ID"]
    assert "now answers 401" in follow_up.part("plain") and "may still work" not in follow_up.part("plain")
    assert "Revocation confirmed at" in follow_up.part("html")
    events = service.events(key.token)
    assert events[events.index("confirmed") :] == ["confirmed", "notified", "closed"]
    with service.db() as db:
        rows = db.execute(
            "SELECT purpose, status FROM deliveries WHERE incident_id = ?", (incident["id"],)
        ).fetchall()
    assert sorted(tuple(r) for r in rows) == [("owner", "sent"), ("owner_confirmed", "sent")]


SMTP_REFUSING = {"RCPT": "451 4.3.0 mail system temporarily unavailable, try again later"}


def test_an_unconfirmed_key_is_reprobed_while_its_urgent_email_cannot_go(sandbox, make_service, smtp):
    """The relay refuses every email for now: the owner of a key that still works cannot be told,
    and the key is probed again (its revoke re-issued) meanwhile; once it dies it is confirmed at
    its next re-probe, and when the relay takes mail again the owner gets one email, saying that
    the key leaked and is revoked for sure (nothing urgent was said that needs a follow-up)."""
    sandbox.supermemory.set_knobs(never_revoke=True)
    smtp.reply = dict(SMTP_REFUSING)
    service = make_service({**smtp.env(), "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.5"})
    key = sandbox.supermemory.keys[1]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: service.events(key.token).count("reprobed") >= 2)
    incident = service.incident(key.token)
    assert incident["state"] == "unconfirmed" and incident["notified_at"] is None
    assert incident["probed_at"] > incident["unconfirmed_at"]
    assert "notify_pending" in service.events(key.token) and smtp.received() == []
    assert "smtp_temporary_failure" in reasons(service)

    # The revoke re-issued at a re-probe now takes: the next re-probe finds the key dead, although
    # its owner has still not been told that it may work.
    sandbox.supermemory.set_knobs(never_revoke=False)
    service.wait_state(key.token, "confirmed")
    assert service.incident(key.token)["notified_at"] is None and smtp.received() == []

    smtp.reply.clear()
    service.wait_state(key.token, "closed")
    (message,) = smtp.to("owner1@example.test")
    assert (
        message.email["Subject"]
        == f"Your Supermemory API key {redact(key.token)} was leaked and has been revoked"
    )
    with service.db() as db:
        rows = db.execute("SELECT purpose, status FROM deliveries").fetchall()
    assert [tuple(r) for r in rows] == [("owner", "sent")], "the email left pending is the one that went"


def test_the_window_page_of_an_unconfirmed_key_does_not_wait_for_its_email(
    sandbox, make_service, smtp, sentry
):
    sandbox.supermemory.set_knobs(never_revoke=True)
    smtp.reply = dict(SMTP_REFUSING)
    env = {
        **smtp.env(),
        **sentry.env(),
        "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.3",
        "LEAK_RESPONDER_UNCONFIRMED_WINDOW": "1",
    }
    service = make_service(env)
    key = sandbox.supermemory.keys[1]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: sentry.pages("unconfirmed_window_over"))
    incident = service.incident(key.token)
    assert incident["notified_at"] is None and smtp.received() == []
    assert "unconfirmed_window_over" in incident["pages"]

    # The email still goes out once the relay takes mail; the key then waits for an operator.
    smtp.reply.clear()
    wait_until(lambda: service.incident(key.token)["notified_at"] is not None)
    (message,) = smtp.to("owner1@example.test")
    assert message.email["Subject"].startswith("URGENT: rotate your Supermemory API key")
    incident = service.incident(key.token)
    assert incident["state"] == "unconfirmed" and incident["next_run_at"] is None
    assert len(sentry.pages("unconfirmed_window_over")) == 1


def test_without_smtp_incidents_wait_then_resume(sandbox, make_service, smtp, tmp_path):
    service = make_service()
    assert "notify_disabled" in reasons(service)
    token = sandbox.tokens[1]
    service.post_alert(sandbox.github, [token])
    service.wait_state(token, "confirmed")
    # Parked, visibly: confirmed and scheduled for nothing until a notifier exists.
    assert service.incident(token)["next_run_at"] is None
    service.stop()

    restarted = make_service(smtp.env(), workdir=tmp_path)
    restarted.wait_state(token, "closed")
    assert len(smtp.to("owner1@example.test")) == 1


@pytest.mark.parametrize(
    ("reason", "reply", "login", "level"),
    [
        ("smtp_auth_failed", {}, "leak-responder:wrong-password", "error"),
        ("smtp_sender_refused", {"MAIL": "550 5.7.1 sender not allowed to relay"}, "", "error"),
        ("smtp_temporary_failure", {"RCPT": "451 4.7.1 greylisted, try again later"}, "", "warning"),
    ],
)
def test_refusals_that_are_not_the_owners_fault_are_retried_until_fixed(
    sandbox, make_service, smtp, tmp_path, reason, reply, login, level
):
    """Our credentials or sender refused (a configuration problem, logged as an error) and a 4xx:
    the owner's email waits, retried with backoff, and goes out once the relay takes it."""
    smtp.reply = dict(reply)
    if login:  # credentials are only ever sent over TLS: this relay offers STARTTLS
        smtp.stop()
        smtp.tls = True
        smtp.start()
    service = make_service(smtp.env(login=login))
    token = sandbox.tokens[1]
    service.post_alert(sandbox.github, [token])
    wait_until(lambda: service.events(token).count("notify_pending") >= 2)
    assert service.state(token) == "confirmed"
    assert service.incident(token)["last_reason"] == reason
    record = service.logged(reason)[0]
    assert (record["stage"], record["level"], record["recipient"]) == ("notify", level, "o***@example.test")
    assert service.failures("notify", reason) >= 2
    assert smtp.received() == []

    # Credentials went over TLS, or not at all.
    assert [tls for _, tls in smtp.auth_attempts] == [True] * len(smtp.auth_attempts)
    assert bool(smtp.auth_attempts) == bool(login)
    smtp.reply.clear()
    if login:  # credentials are settings: fixed by a restart with the right ones (here, none)
        service.stop()
        service = make_service(smtp.env(), workdir=tmp_path)
    service.wait_state(token, "closed")
    assert len(smtp.to("owner1@example.test")) == 1
    assert len(smtp.received()) == 1


def owned_by(sandbox, seed: str, owner_email: str) -> SandboxKey:
    """A new sandbox key whose lookup gives `owner_email` as its owner's address and no notify list."""
    key = dataclasses.replace(seeded_keys(1, seed=seed)[0], owner_email=owner_email, notify=[])
    sandbox.supermemory.add_keys([key])
    return key


def test_malformed_owner_address_is_skipped_and_the_contact_told(sandbox, make_service, smtp):
    key = owned_by(sandbox, "bad-address", "owner-at-example.test")
    service = make_service(smtp.env())
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "closed")
    (record,) = service.logged("bad_recipient_address")
    assert record["stage"] == "notify" and record["recipient"] == "o***@"
    assert service.failures("notify", "bad_recipient_address") == 1
    # Nothing was handed to SMTP for the owner; the security contact hears why.
    (notice,) = smtp.received()
    assert notice.rcpt_tos == ["security@example.test"]
    assert "owner-at-example.test" in notice.email["Subject"]
    assert "bad_recipient_address" in notice.part("plain")
    assert "owner_unreachable" in service.incident(key.token)["pages"]


def test_nobody_to_tell_is_no_recipient(sandbox, make_service, smtp):
    key = owned_by(sandbox, "no-owner", "")
    service = make_service(smtp.env(contact=""))
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "closed")
    (record,) = service.logged("no_recipient")
    assert record["stage"] == "notify" and record["incident_id"] == service.incident(key.token)["id"]
    assert service.failures("notify", "no_recipient") == 1
    assert smtp.received() == []
    assert "owner_unreachable" in service.incident(key.token)["pages"]


def test_credentials_are_never_sent_to_a_relay_without_tls(sandbox, make_service, smtp):
    """`smtp://user:pass@host` and a relay that offers no STARTTLS: AUTH would be the password in
    base64 over a clear channel. Not sent; the email waits, and on-call is paged once."""
    service = make_service(smtp.env(login="leak-responder:secret-password"))
    tokens = sandbox.tokens[1:3]
    service.post_alert(sandbox.github, tokens)
    wait_until(lambda: all(service.events(t).count("notify_pending") >= 2 for t in tokens))
    assert smtp.auth_attempts == [] and smtp.received() == []
    assert {service.incident(t)["last_reason"] for t in tokens} == {"smtp_tls_required"}
    record = service.logged("smtp_tls_required")[0]
    assert record["level"] == "error" and "secret-password" not in service.log_text()
    pages = [r for r in service.logged("smtp_tls_required") if r.get("page")]
    assert len(pages) == 1
    assert service.failures("notify", "smtp_tls_required") >= 2
