"""Canary tokens planted in alerts must never come out through an email or a Sentry envelope, on
the paths that send the most: confirmed and unconfirmed keys, a refused owner and its notice to
the security contact, an unconfirmed key's follow-up once it dies, pages with timelines, a sighting
URL that itself holds a key, and a shaped token that is not a key."""

from __future__ import annotations

import pytest

from service.sandbox import SandboxKey
from tests.harness import wait_until

pytestmark = pytest.mark.integration

CANARIES = [
    "sm_CanaryConfirmedAAAAAAAAAAAAAAAA_" + "c" * 48,
    "sm_CanaryRefusedBBBBBBBBBBBBBBBBBBB_" + "r" * 48,
    "sm_CanaryUnconfirmedCCCCCCCCCCCCCCC_" + "u" * 48,
]
UNKNOWN = "sm_CanaryNotAKeyDDDDDDDDDDDDDDDDDDD_" + "n" * 48


def canary_key(i: int, token: str, owner: str) -> SandboxKey:
    return SandboxKey(token, f"key_canary_{i}", "org_canary", f"canary {i}", owner, "Canary Owner", [owner])


def fragments(token: str) -> list[bytes]:
    """The token, its body without the prefix, and its tail: a partial leak is still a leak."""
    return [token.encode(), token[3:].encode(), token[-16:].encode(), token[8:30].encode()]


def test_no_canary_in_any_email_or_sentry_envelope(sandbox, make_service, smtp, sentry):
    sandbox.supermemory.add_keys(
        [
            canary_key(0, CANARIES[0], "canary0@example.test"),
            canary_key(1, CANARIES[1], "canary1@example.test"),
            canary_key(2, CANARIES[2], "canary2@example.test"),
        ]
    )
    smtp.refuse = {"canary1@example.test"}
    service = make_service(
        {
            **smtp.env(),
            **sentry.env(LEAK_RESPONDER_SENTRY_CHECKIN_INTERVAL="0.3"),
            "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.3",
        }
    )

    leaky_url = f"https://github.com/octocat/demo/blob/main/.env?k={CANARIES[0]}"
    service.post_alert(sandbox.github, [CANARIES[0], CANARIES[1], UNKNOWN], url=leaky_url)
    service.wait_state(CANARIES[0], "closed")
    service.wait_state(CANARIES[1], "closed")
    sandbox.supermemory.set_knobs(never_revoke=True)
    # Sentry fails for a while: its page is posted again (those attempts are searched too).
    sentry.status = 503
    service.post_alert(sandbox.github, [CANARIES[2]])
    wait_until(lambda: "notified" in service.events(CANARIES[2]))
    wait_until(lambda: sentry.refused >= 2)
    sentry.status = None
    wait_until(lambda: sentry.pages("revocation_unconfirmed") and sentry.pages("owner_unreachable"))
    # Then it dies on a re-probe, and its owner gets the follow-up email too.
    sandbox.supermemory.set_knobs(never_revoke=False)
    service.wait_state(CANARIES[2], "closed")
    assert len(smtp.to("canary2@example.test")) == 2

    messages = smtp.received()
    assert {a for m in messages for a in m.rcpt_tos} == {
        "canary0@example.test",
        "canary2@example.test",
        "security@example.test",
    }
    owner_mail = [m for m in messages if m.email.is_multipart()]
    # The sighting URL is shown, with the key in it redacted.
    assert any(f"k={CANARIES[0][:7]}…" in m.part("plain") for m in owner_mail)
    outputs = [m.raw for m in messages]
    outputs += [m.part(subtype).encode() for m in owner_mail for subtype in ("plain", "html")]
    outputs += [m.email.get_content().encode() for m in messages if not m.email.is_multipart()]
    outputs.append(sentry.all_bytes())
    assert len(sentry.events()) >= 2
    # The log too, with the line that told of the page Sentry did not take at first.
    assert service.logged("page_delayed")
    outputs.append(service.log_text().encode())
    for token in [*CANARIES, UNKNOWN]:
        for fragment in fragments(token):
            for output in outputs:
                assert fragment not in output, f"canary fragment {fragment[:6]!r}… leaked"
