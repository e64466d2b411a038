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
KEY_SHAPE = re.compile(r"sm_[A-Za-z0-9_-]{20,300}")

_ELLIPSIS = "…"


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
    return f"{prefix}{body[:4]}{_ELLIPSIS}{body[-4:]}"
