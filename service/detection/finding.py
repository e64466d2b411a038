"""One key found in a text, in a form that is safe to print, log and store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from service.tokens import redact, token_hash

Confidence = Literal["high", "candidate"]
Encoding = Literal["plain", "percent", "base64"]


@dataclass(frozen=True)
class Finding:
    """A detected key: where it is, how sure we are and how it was encoded.

    `line` and `column` are 1-based and count characters of the scanned text; they point at the key
    itself for plain and percent-encoded keys, and at the start of the base64 blob that holds it
    otherwise (a position inside a decoding means nothing to a reader of the original).
    `encoding` is `base64` when any base64 layer was involved, else `percent` when a percent layer
    was, else `plain`.

    `token` is the raw key, there only so that the pipeline can encrypt it and revoke it. It must
    never be rendered: it is left out of `repr`/`str`, equality and hashing, but `dataclasses.asdict`,
    `astuple` and pickling still carry it, so never feed a Finding to those on the way to any output.
    """

    token_hash: str
    redacted: str
    confidence: Confidence
    line: int
    column: int
    encoding: Encoding
    token: str = field(repr=False, compare=False)

    @classmethod
    def of(cls, token: str, confidence: Confidence, line: int, column: int, encoding: Encoding) -> Finding:
        """Derive the hash and redacted form here so that no caller can get them out of step."""
        return cls(token_hash(token), redact(token), confidence, line, column, encoding, token)
