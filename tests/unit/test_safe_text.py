"""`safe_text`: what a sender says around a token is stored and shown only once made safe."""

from __future__ import annotations

import pytest

from service.tokens import safe_text

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
