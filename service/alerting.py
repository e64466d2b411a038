"""Paging on-call: the events that mean a human must act, with fixed codes and levels.

The pipeline raises a page through `Pager.page`; what carries it (the log and the pages metric here,
Sentry once configured) is this module's business, and it never blocks or fails the caller: a
responder that stalls because its pager is down would turn one outage into two.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Any

from service.observability import PAGES, failure

log = logging.getLogger("service.alerting")


class PageCode(enum.StrEnum):
    REVOCATION_UNCONFIRMED = "revocation_unconfirmed"
    REVOCATION_FAILED = "revocation_failed"
    LOOKUP_UNAUTHORIZED = "lookup_unauthorized"
    REPORTER_KEYS_UNAVAILABLE = "reporter_keys_unavailable"
    SIGNING_KEY_CHANGED = "signing_key_changed"
    OWNER_UNREACHABLE = "owner_unreachable"


LEVELS: dict[PageCode, int] = {
    PageCode.REVOCATION_UNCONFIRMED: logging.CRITICAL,
    PageCode.REVOCATION_FAILED: logging.CRITICAL,
    PageCode.LOOKUP_UNAUTHORIZED: logging.CRITICAL,
    PageCode.REPORTER_KEYS_UNAVAILABLE: logging.ERROR,
    PageCode.SIGNING_KEY_CHANGED: logging.WARNING,
    PageCode.OWNER_UNREACHABLE: logging.WARNING,
}


class Pager:
    """Logs every page with its reason code and counts it; delivery channels build on this."""

    def page(self, code: PageCode, message: str, tags: Mapping[str, str], context: Mapping[str, Any]) -> None:
        PAGES.labels(event=str(code)).inc()
        failure(log, "alerting", code, message, level=LEVELS[code], page=True, **dict(tags))
