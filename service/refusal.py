"""A request refused with a reason code: one shape for every stage that says no to a caller.

The reason names the HTTP status (in each vocabulary's one table), the log line's `reason` and the
metric label, so a refusal can be followed from the caller's 4xx to the dashboards unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from service.reasons import Reason


class Refusal(Exception):
    """The message goes back to the caller, so it must never carry a token or quote a body."""

    STATUS: ClassVar[Mapping[Reason, int]]

    def __init__(self, reason: Reason, message: str, headers: Mapping[str, str] | None = None) -> None:
        # Reason and message go to args so the exception pickles and copies like any other.
        super().__init__(reason, message)
        self.reason = reason
        self.status = self.STATUS[reason]
        self.message = message
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.reason)!r}, {self.message!r})"
