"""The owner email as rendered: recipients, wording, escaping, and no token."""

from __future__ import annotations

from service.notify.compose import Letter, message_id, owner_email
from service.notify.outbox import recipients
from service.store import Incident, Sighting, State

LETTER = Letter("leak-responder@example.test", "security@example.test")


def incident(state: State = State.CONFIRMED, **changes) -> Incident:
    fields = {
        "id": "inc_1",
        "token_hash": "h" * 64,
        "redacted": "sm_AbCd…wxyz",
        "token_type": "supermemory_api_key",
        "state": state,
        "label": None,
        "key_id": "key_1",
        "org_id": "org_1",
        "key_name": "<script>alert(1)</script>",
        "recipients": [
            {"email": "Ann@Example.test", "name": "Ann", "role": "owner"},
            {"email": "ann@example.test", "name": "", "role": "notify"},
        ],
        "created_at": 1.0,
        "matched_at": 1.0,
        "revoked_at": 2.0,
        "confirmed_at": 3.0,
        "notified_at": None,
        "closed_at": None,
        "next_run_at": None,
        "attempts": 0,
        "step_started_at": None,
        "revoke_reissued": False,
        "pages": frozenset(),
        "last_reason": None,
        "has_token": True,
    }
    return Incident(**{**fields, **changes})


def test_recipients_are_deduplicated_and_fall_back_to_the_contact():
    assert recipients(incident(), "security@example.test") == [{"email": "ann@example.test", "name": "Ann"}]
    assert recipients(incident(recipients=[]), "Sec@Example.test") == [
        {"email": "sec@example.test", "name": ""}
    ]
    assert recipients(incident(recipients=[]), None) == []


def test_html_is_escaped_and_urls_are_scrubbed():
    token = "sm_" + "Q" * 40
    sightings = {"inc_1": [Sighting("github", f"https://x.test/?k={token}", None, "t", None, 1.0)]}
    message = owner_email(
        LETTER, {"email": "ann@example.test", "name": "Ann"}, [incident()], sightings, "owner"
    )
    html = message.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert token not in message.as_string()
    assert "source: unknown" in message.get_body(("plain",)).get_content()


def test_message_id_is_stable_for_the_same_recipient_and_incidents():
    a = message_id("ann@example.test", "owner", ["inc_2", "inc_1"], LETTER.sender)
    assert a == message_id("ANN@example.test", "owner", ["inc_1", "inc_2"], LETTER.sender)
    assert a != message_id("ann@example.test", "owner", ["inc_1"], LETTER.sender)
    assert a.endswith("@example.test>")
