"""What counts as a Supermemory key, and how hard the detector looks for encoded ones.

The shapes are regex fragments rather than plain lengths so that a change in Supermemory's key
format (a longer org id, a different alphabet) is a configuration change, not a code change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Supermemory org ids are base58: no 0, O, I or l, which is what separates a real key from most
# identifiers that merely start with `sm_`.
BASE58 = "[1-9A-HJ-NP-Za-km-z]"
ALNUM = "[A-Za-z0-9]"


@dataclass(frozen=True)
class DetectorConfig:
    """Shapes and limits for `scan_text` / `scan_stream`.

    A key is `sm_<org>_<secret>`; `strict_*` is the documented shape (a hit is high confidence),
    `loose_*` catches keys whose shape drifted or was mangled (a hit is a candidate). Each fragment
    must match characters from [A-Za-z0-9] only, so that the `_` separator and the word boundary
    stay unambiguous.
    """

    strict_org: str = BASE58 + "{22}"
    strict_secret: str = ALNUM + "{64}"
    loose_org: str = ALNUM + "{16,40}"
    loose_secret: str = ALNUM + "{32,128}"
    # A body holding this many identical characters in a row is a placeholder (`sm_xxxx…`); in a
    # random 64-character secret such a run has a probability below 1e-7.
    placeholder_run: int = 6
    # Lower-case substrings that mark documentation placeholders. Only words of six letters or more:
    # a shorter word would turn up in real random secrets often enough to hide a leak.
    placeholder_words: tuple[str, ...] = (
        "example",
        "placeholder",
        "yourkey",
        "yourapikey",
        "apikeyhere",
        "redacted",
        "replaceme",
        "changeme",
        "abcdefgh",
        "12345678",
    )
    # base64 of a whole key is 120 characters; shorter runs are identifiers and hashes, which are
    # common and never hold a key.
    min_base64_run: int = 40
    # How many encodings may be stacked (percent-encoded base64 of JSON in a URL needs two).
    max_decode_depth: int = 2

    def __post_init__(self) -> None:
        for name in ("strict_org", "strict_secret", "loose_org", "loose_secret"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                raise ValueError(f"DetectorConfig.{name} is not a valid regex: {exc}") from None
        if self.placeholder_run < 2:
            raise ValueError("DetectorConfig.placeholder_run must be at least 2")
        if self.min_base64_run < 4:
            raise ValueError("DetectorConfig.min_base64_run must be at least 4")
        if self.max_decode_depth < 0:
            raise ValueError("DetectorConfig.max_decode_depth must not be negative")

    @property
    def strict_pattern(self) -> str:
        """The strict shape alone, without boundaries: also the benchmark's baseline."""
        return f"sm_(?:{self.strict_org})_(?:{self.strict_secret})"

    @property
    def loose_pattern(self) -> str:
        return f"sm_(?:{self.loose_org})_(?:{self.loose_secret})"


DEFAULT = DetectorConfig()
