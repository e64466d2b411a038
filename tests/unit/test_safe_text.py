"""`safe_text` and `redact`: what a sender says around a token, and a token's redacted form, are stored and
shown only once made safe."""

from __future__ import annotations

import pytest

from service.store import TokenSighting
from service.tokens import redact, safe_text

# FAKE, shaped like a key and never issued.
KEY = "sm_FakeTestZq8Rk3Wm5Vn7Xp_" + "Ab3dEf6hJk9mNp2q" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "https://github.com/octo/repo/blob/abc/settings.py#L12",
            "https://github.com/octo/repo/blob/abc/settings.py#L12",
        ),
        ("supermemory_api_key", "supermemory_api_key"),
        ("café, sm_short, a@b", "café, sm_short, a@b"),
        (f"https://x.test/{KEY}", "https://x.test/sm_Fake…Np2q"),
        (f"é {KEY}", "é sm_Fake…Np2q"),
        ("postgresql://user:hunter2@db.test/app", "postgresql://user:***@db.test/app"),
        ("file \ud800.py", "file \ufffd.py"),
    ],
    ids=["url", "type", "nothing-to-change", "key-in-ascii", "key-in-latin-1", "url-password", "surrogate"],
)
def test_safe_text(text, expected):
    assert safe_text(text) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("sm_" + "Ab3dEf6hJk9mNp2q" * 2, "sm_Ab3d…Np2q"),
        # A lone surrogate in the shown characters of a token that is no key (JSON lets a sender
        # send one) becomes U+FFFD: no encoder after this would write it.
        ("sm_\ud800b3dEf6hJk9mNp2qAb3dEf6hJk9mNp2\udfff", "sm_\ufffdb3d…Np2\ufffd"),
        ("sm_short", "sm_…"),
    ],
    ids=["ascii", "surrogates", "short"],
)
def test_redact(token, expected):
    assert redact(token) == expected


def test_a_sighting_keeps_its_texts_only_made_safe():
    sighting = TokenSighting(KEY, "type \ud800", f"https://x.test/{KEY}", "content", "github", note="a note")
    assert (sighting.token_type, sighting.url, sighting.source, sighting.note) == (
        "type \ufffd",
        "https://x.test/sm_Fake…Np2q",
        "content",
        "a note",
    )
