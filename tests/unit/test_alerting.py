"""What leaves for Sentry: the scrubber over events and breadcrumbs."""

from __future__ import annotations

from service.alerting import FILTERED, scrub_event
from service.tokens import redact

TOKEN = "sm_" + "A" * 22 + "_" + "b" * 64


def test_key_shaped_strings_are_redacted_at_any_depth():
    event = {
        "message": f"failed for {TOKEN}",
        "exception": {"values": [{"value": f"boom {TOKEN}", "stacktrace": {"frames": [{"x": [TOKEN]}]}}]},
        "breadcrumbs": {"values": [{"data": {"items": [{"body": [f"x{TOKEN}x", 3, None]}]}}]},
        "tuple": (TOKEN,),
    }
    scrubbed = scrub_event(event)
    assert TOKEN not in repr(scrubbed)
    assert scrubbed["message"] == f"failed for {redact(TOKEN)}"
    assert scrubbed["breadcrumbs"]["values"][0]["data"]["items"][0]["body"][1:] == [3, None]


def test_values_under_token_like_keys_are_dropped_whatever_they_look_like():
    event = {
        "request": {"headers": {"Authorization": "Bearer opaque", "X-Api-Key": "k", "Accept": "*/*"}},
        "extra": {"tokens": ["ghp_notakey"], "admin_token": "x", "password": "p", "smtp_url": "smtp://u:p@h"},
        "payload": [{"token": "ghp_123", "type": "github", "url": "https://x"}],
        "tags": {"token_hash_prefix": "abc123", "token_type": "t", "token_count": 2},
    }
    scrubbed = scrub_event(event)
    assert scrubbed["request"]["headers"] == {
        "Authorization": FILTERED,
        "X-Api-Key": FILTERED,
        "Accept": "*/*",
    }
    assert scrubbed["extra"]["tokens"] == FILTERED
    assert scrubbed["extra"]["admin_token"] == FILTERED
    assert scrubbed["extra"]["password"] == FILTERED
    assert scrubbed["payload"] == [{"token": FILTERED, "type": "github", "url": "https://x"}]
    assert scrubbed["tags"] == event["tags"]


def test_keys_themselves_are_scrubbed():
    assert scrub_event({TOKEN: 1}) == {redact(TOKEN): 1}
