"""Retry delays, one rule for every caller that retries a call to somebody else (the pipeline's steps,
the channel sender): a rule written twice drifts."""

from __future__ import annotations

import email.utils
import random
import time


def backoff(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential with equal jitter, so retries spread out but never collapse to zero.

    A server's Retry-After is a floor, not a suggestion: we wait at least that long.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
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
