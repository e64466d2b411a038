"""Retry delays, one rule for every caller that retries a call to somebody else (the pipeline's steps,
the channel sender): a rule written twice drifts."""

from __future__ import annotations

import email.utils
import math
import random
import time


def backoff(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential with equal jitter, so retries spread out but never collapse to zero.

    A server's Retry-After is a floor, not a suggestion: we wait at least that long.
    Past the cap the attempt count no longer matters, and is not raised to a power: a step failing
    for days (an SMTP relay down over a weekend) counts over a thousand attempts, and 2**1024 does
    not fit a float.
    """
    doublings = max(0, attempt - 1)
    ceiling = cap if doublings >= math.log2(cap / base) else base * 2**doublings
    delay: float = ceiling / 2 + rng.uniform(0, ceiling / 2)
    return max(delay, retry_after) if retry_after is not None else delay


def retry_after(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
