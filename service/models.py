"""The three things every stage may know about a token without holding it: its hash, its redacted
form and whether it has the shape of a Supermemory key.

Everything that leaves the process (logs, responses, metrics, rows) is built from these, never from
the raw string, which is why they live in one small module that every stage imports.
"""

from __future__ import annotations

import hashlib
import re

# contract.md §5 step 2: `sm_` then 20–300 of [A-Za-z0-9_-]. Anything else is a false positive with no
# network call, so a reporter cannot make us send arbitrary strings to Supermemory's admin API.
KEY_BODY_MIN = 20
KEY_SHAPE = re.compile(rf"sm_[A-Za-z0-9_-]{{{KEY_BODY_MIN},300}}")

_ELLIPSIS = "…"

# Looser than the shape gate on purpose: a net should also catch near-keys and fragments.
_KEYISH = re.compile(r"sm_[A-Za-z0-9_-]{8,}")
# The password in a URL's userinfo (`postgresql://user:password@host/db`).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")
# A lone UTF-16 surrogate: JSON's `\ud800` escape decodes to one, and no encoder will write it out.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def token_hash(token: str) -> str:
    """SHA-256 hex of the exact token string: the dedupe key, the label key and the lookup key."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def is_key_shaped(token: str) -> bool:
    return KEY_SHAPE.fullmatch(token) is not None


def redact(token: str) -> str:
    """At most `sm_`, the first 4 and the last 4 characters (contract.md §5 step 1).

    A short token shows nothing of its body: revealing 8 characters of a 12-character secret would
    give most of it away.
    """
    prefix = "sm_" if token.startswith("sm_") else ""
    body = token[len(prefix) :]
    if len(body) < 16:
        return f"{prefix}{_ELLIPSIS}"
    shown = f"{prefix}{body[:4]}{_ELLIPSIS}{body[-4:]}"
    # An ASCII token (every key-shaped one) holds no surrogate: no substitution to run.
    return shown if body.isascii() else _SURROGATE.sub(REPLACEMENT, shown)


def scrub(text: str) -> str:
    """Anything key-shaped in `text` replaced by its redacted form, and any URL's password masked."""
    return mask_url(_KEYISH.sub(lambda m: redact(m.group(0)), text))


def mask_url(text: str) -> str:
    """Every URL password in `text` as `***`: a database, SMTP or keys URL may carry one."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def safe_text(text: str) -> str:
    """A string from outside made fit to store and show: key-shaped parts redacted (a URL or a file
    name can hold the key itself) and lone surrogates replaced by U+FFFD, because JSON lets a
    sender put them in a string and every encoder after that (SQLite, PostgreSQL, the JSON answer)
    refuses them. Every string a sender gives us, except the token, goes through here before it is
    kept or echoed.

    Most such strings hold nothing to change, and an alert of 10,000 tokens brings 30,000 of them:
    a text that is ASCII (no surrogate) with no `sm_` (nothing key-shaped) and no `@` (no URL
    password) is returned as it is, after three scans in C instead of three regex substitutions."""
    if text.isascii() and "sm_" not in text and "@" not in text:
        return text
    return _SURROGATE.sub(REPLACEMENT, scrub(text))
