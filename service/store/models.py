"""What the store holds, as the pipeline and the operator API see it.

None of these types carries a raw token: the sealed token stays inside the store and is handed out
only by `Store.reveal_token`, for the one step that needs it (the probe).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    """contract.md §5, in order:
    received → matched | false_positive → revoked → confirmed | unconfirmed → notified → closed."""

    RECEIVED = "received"
    MATCHED = "matched"
    FALSE_POSITIVE = "false_positive"
    REVOKED = "revoked"
    CONFIRMED = "confirmed"
    UNCONFIRMED = "unconfirmed"
    NOTIFIED = "notified"
    CLOSED = "closed"


FINAL_STATES = frozenset({State.FALSE_POSITIVE, State.CLOSED})


class Label(enum.StrEnum):
    TRUE_POSITIVE = "true_positive"
    FALSE_POSITIVE = "false_positive"


@dataclass(frozen=True, slots=True)
class TokenSighting:
    """One item of an alert or a report. `__repr__` never shows the token."""

    token: str = field(repr=False)
    token_type: str
    url: str | None
    source: str | None
    reporter: str
    operator: str | None = None
    # An operator's free-text context for a manual report; never holds a key (refused at parsing).
    note: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """The hash-only record of every alert we acknowledged, kept for audits and replays."""

    reporter: str
    body_sha256: str
    item_count: int
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class IncidentRef:
    """One distinct token of an intake, in order of first appearance."""

    id: str
    token_hash: str
    token_type: str
    redacted: str
    state: State
    label: Label | None
    created: bool


@dataclass(frozen=True, slots=True)
class Incident:
    id: str
    token_hash: str
    redacted: str
    token_type: str
    state: State
    label: Label | None
    key_id: str | None
    org_id: str | None
    key_name: str | None
    recipients: list[dict[str, Any]]
    created_at: float
    matched_at: float | None
    revoked_at: float | None
    confirmed_at: float | None
    notified_at: float | None
    closed_at: float | None
    next_run_at: float | None
    attempts: int
    step_started_at: float | None
    revoke_reissued: bool
    pages: frozenset[str]
    last_reason: str | None
    has_token: bool
    unconfirmed_at: float | None = None

    @property
    def time_to_revoke(self) -> float | None:
        return None if self.revoked_at is None else self.revoked_at - self.created_at

    @property
    def time_to_confirm(self) -> float | None:
        return None if self.confirmed_at is None else self.confirmed_at - self.created_at


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str
    state: State | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Sighting:
    reporter: str
    url: str | None
    source: str | None
    token_type: str
    operator: str | None
    seen_at: float
    note: str | None = None


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: Incident
    events: list[Event]
    sightings: list[Sighting]


@dataclass(slots=True)
class Transition:
    """One step's outcome, applied only if the incident is still where the step found it.

    `expected_state` and `lease_owner` fence the write: a step that lost its lease (the process
    stalled past it and another worker took over) or that a concurrent path already finished
    changes nothing, which is what makes every step safe to run twice.
    """

    incident_id: str
    expected_state: State
    event: str
    lease_owner: str | None = None
    state: State | None = None
    next_run_at: float | None = None
    set: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    page: str | None = None
    wipe_token: bool = False


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # known not delivered (a failed attempt): anyone may take it at once
    SENDING = "sending"  # held by a sender; if its hold ran out, the outcome is unknown
    SENT = "sent"
    REFUSED = "refused"  # refused permanently by the recipient's side


DELIVERY_FINAL = frozenset({DeliveryStatus.SENT, DeliveryStatus.REFUSED})


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row: telling `recipient` about an incident, for `purpose` (the store does not care
    what a purpose means, only that each (incident, recipient, purpose) is done once)."""

    incident_id: str
    recipient: str
    purpose: str
    status: DeliveryStatus
    attempts: int
    message_id: str | None
    detail: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a sender may now send: `taken` rows are held by it; `uncertain` ones among them were
    held by a sender that never reported back, so they may have gone out already."""

    taken: list[str]
    uncertain: list[str]


@dataclass(frozen=True, slots=True)
class IncidentFilter:
    state: State | None = None
    reporter: str | None = None
    org_id: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    before_id: str | None = None


class IdempotencyState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """What an earlier request with the same Idempotency-Key left behind.

    `status` and `response` are set once it is done; they hold only what was sent to the operator,
    which never carries a raw token.
    """

    fingerprint: str
    state: IdempotencyState
    status: int | None
    response: bytes | None


class Timed(enum.StrEnum):
    """What the operator console times from an incident's arrival: the revoke and the 401 proof."""

    REVOKE = "revoked_at"
    CONFIRM = "confirmed_at"


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank p50 and p95 of one time bucket's durations (seconds); `start` is the bucket's
    first instant. Buckets holding no incident are absent, not zero."""

    start: float
    count: int
    p50: float
    p95: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What the metrics endpoint shows of the store: how much is where, and how long the oldest
    unfinished incident has waited (it grows while the pipeline is stuck, or parked on purpose)."""

    incidents_by_state: dict[str, int]
    pending: int
    oldest_pending_age: float
    due: int


@dataclass(frozen=True, slots=True)
class RateBucket:
    """A rate limit a request is taken from: at most `limit` requests in any `period` seconds (a
    burst of `limit`, refilled one every `period / limit` seconds). `key` names whose bucket it is;
    a client is named only by a keyed hash, so the store never holds an address."""

    key: str
    limit: int
    period: float


@dataclass(frozen=True, slots=True)
class RateRefusal:
    """Which of the buckets asked for was empty (its index), and in how many seconds it has room."""

    bucket: int
    retry_after: float
