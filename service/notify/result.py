"""What a notifier tells the pipeline about the incidents it was handed."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.reasons import Reason


@dataclass
class NotifyResult:
    """`done`: every recipient was told (or refused for good and the security contact told instead).
    `waiting`: incident id → when to look again, because sibling keys of its alert are still on
    their way and should go out in the same email. `pending`: incident id → the reason code of what
    is still in the way (retried with backoff). `unreachable`: incident id → recipients that refused
    mail permanently, for on-call."""

    done: set[str] = field(default_factory=set)
    waiting: dict[str, float] = field(default_factory=dict)
    pending: dict[str, Reason] = field(default_factory=dict)
    unreachable: dict[str, list[str]] = field(default_factory=dict)
