"""The owner email as rendered: recipients, wording, escaping, and no token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.notify.compose import Letter, message_id, owner_email
from service.notify.outbox import recipients
from service.notify.remediation import place
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


# -- the second release's facts: admins, created / last used, used after the leak, clean-up steps --

SNAPSHOTS = Path(__file__).resolve().parents[1] / "data" / "email"


def exposed(**changes) -> Incident:
    facts = {
        "key_name": "deploy key",
        "org_name": "Acme",
        "key_created_at": 1735787045.0,  # 2025-01-02 03:04:05 UTC
        "key_last_used_at": 1764500000.0,
        "created_at": 1764400000.0,  # first seen: before that last use
        "revoked_at": 1764400000.2,
        "confirmed_at": 1764400000.4,
    }
    return incident(**{**facts, **changes})


def snapshot(name: str, text: str) -> None:
    """The rendered text against the file in tests/data/email; set UPDATE_SNAPSHOTS=1 to rewrite it
    (then read the diff: that is the review)."""
    path = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text()


def test_the_email_of_a_key_used_after_the_leak():
    sightings = {
        "inc_1": [
            Sighting(
                "github",
                "https://github.com/o/r/issues/1#issuecomment-2",
                "Issue_Comment",
                "t",
                None,
                1764400000.0,
            ),
            Sighting("github", "https://gist.github.com/o/abc", "gist_content", "t", None, 1764400001.0),
        ]
    }
    message = owner_email(
        LETTER, {"email": "ada@example.test", "name": "Ada"}, [exposed()], sightings, "owner"
    )
    assert (
        message["Subject"]
        == "URGENT: your Supermemory API key sm_AbCd…wxyz was used after the leak; it has been revoked"
    )
    assert message["Importance"] == "high"
    snapshot("owner_used_after_leak.txt", message.get_body(("plain",)).get_content())
    html = message.get_body(("html",)).get_content()
    for needle in ("used after the leak", "2025-01-02 03:04:05 UTC", "edit history", "Delete the gist"):
        assert needle in html


def test_the_email_of_a_key_last_used_before_the_leak():
    sightings = {
        "inc_1": [Sighting("gitlab", "https://gitlab.com/o/r/-/raw/main/.env", None, "t", None, 1.0)]
    }
    quiet = exposed(key_last_used_at=1764300000.0)
    message = owner_email(LETTER, {"email": "ada@example.test", "name": "Ada"}, [quiet], sightings, "owner")
    assert message["Subject"] == "Your Supermemory API key sm_AbCd…wxyz was leaked and has been revoked"
    assert message["Importance"] is None
    snapshot("owner_gitlab_not_used.txt", message.get_body(("plain",)).get_content())


def test_unconfirmed_and_used_after_the_leak_says_both():
    message = owner_email(LETTER, {"email": "a@x.test"}, [exposed(state=State.UNCONFIRMED)], {}, "owner")
    assert message["Subject"] == (
        "URGENT: rotate Supermemory API key sm_AbCd…wxyz now: used after the leak, it may still work"
    )
    text = message.get_body(("plain",)).get_content()
    assert "we could NOT confirm" in text and "used after the leak" in text


@pytest.mark.parametrize(
    ("reporter", "source", "title"),
    [
        ("github", "content", "In a file or commit of a repository"),
        ("github", "Commit", "In a file or commit of a repository"),
        *[
            ("github", s, "In a title, description or comment (issue, pull request, discussion or commit comment)")  # noqa: E501
            for s in (
                "pull_request_title", "pull_request_description", "pull_request_comment", "issue_title",
                "issue_description", "issue_comment", "discussion_title", "discussion_body",
                "discussion_comment", "commit_comment",
            )
        ],
        ("github", "gist_content", "In a gist or a gist comment"),
        ("github", "gist_comment", "In a gist or a gist comment"),
        ("github", "wiki_content", "In a wiki"),
        ("github", "wiki_commit", "In a wiki"),
        ("github", "npm", "In a published npm package"),
        ("github", "unknown", "Somewhere public"),
        ("github", None, "Somewhere public"),
        ("github", "something_new", "Somewhere public"),
        ("gitlab", None, "In a file of a GitLab repository"),
        ("depsdev", "npm", "In a published npm package"),
        ("manual", None, "Reported by a security engineer"),
        ("public", None, "Reported publicly"),
    ],
)  # fmt: skip
def test_clean_up_steps_follow_the_source(reporter, source, title):
    assert place(Sighting(reporter, None, source, "t", None, 1.0)).title == title
