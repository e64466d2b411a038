"""What the store holds, as the pipeline and the operator API see it.

None of these types carries a raw token: the sealed token stays inside the store and is handed out
only by `Store.reveal_token`, for the one step that needs it (the probe).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from service.tokens import is_key_shaped, safe_text, token_hash


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
    # The token's hash and whether it has a key's shape, worked out once for every stage that asks
    # (the lookup, the intake: SHA-256 and the shape's pattern twice per token were a hundredth of
    # a big alert's time), on first use rather than here: a big alert's sightings are made while
    # its parsed body is still held, its peak of memory, which 10,000 hashes more would raise.
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)
    _shaped: bool | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Whoever builds a sighting (an alert, a report, a tool), what it says around the token is
        # stored and shown later, so it is made safe here, once, for every caller.
        # Set only if changed: most texts are safe already, and each set of a frozen field is a
        # call (a big alert makes tens of thousands of sightings).
        for name in ("token_type", "url", "source", "note"):
            value = getattr(self, name)
            if value is not None and (safe := safe_text(value)) is not value:
                object.__setattr__(self, name, safe)

    @property
    def digest(self) -> str:
        digest = self._digest
        if digest is None:
            digest = token_hash(self.token)
            object.__setattr__(self, "_digest", digest)
        return digest

    @property
    def shaped(self) -> bool:
        shaped = self._shaped
        if shaped is None:
            shaped = is_key_shaped(self.token)
            object.__setattr__(self, "_shaped", shaped)
        return shaped


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """The hash-only record of every alert we acknowledged, kept for audits and replays."""

    reporter: str
    body_sha256: str
    item_count: int
    operator: str | None = None


class IncidentRef(NamedTuple):
    """One distinct token of an intake, in order of first appearance; `applied` is the transition
    the intake applied to it in the same transaction (see `Decide`), its state and label after it.

    A named tuple, not a frozen dataclass: as immutable, and made in a third of the time (a frozen
    dataclass sets each field through `object.__setattr__`), which counts at two or three refs per
    token of a big alert."""

    id: str
    token_hash: str
    token_type: str
    redacted: str
    state: State
    label: Label | None
    created: bool
    applied: Transition | None = None

    def moved(self, state: State, label: Label | None, applied: Transition | None) -> IncidentRef:
        """This ref with another state, label and transition."""
        return IncidentRef(
            self.id, self.token_hash, self.token_type, self.redacted, state, label, self.created, applied
        )


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
    # An unconfirmed key's last probe: its re-probes count from it, apart from its owner's email.
    probed_at: float | None = None
    # What the lookup said of the key besides its owner (None when the admin API did not say).
    key_created_at: float | None = None
    key_last_used_at: float | None = None
    org_name: str | None = None

    @property
    def used_after_leak(self) -> bool:
        """The key was used after its first sighting: someone may have used the leaked copy."""
        return self.key_last_used_at is not None and self.key_last_used_at > self.created_at

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
    deliveries: list[Delivery] = field(default_factory=list)
    channels: list[ChannelDelivery] = field(default_factory=list)


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
    # The org's channels, as the lookup gave them: recorded (sealed) with a `matched` transition.
    channels: list[ChannelSpec] = field(default_factory=list)


# The states each of an incident's channels hears of, once each (the channel outbox).
CHANNEL_STATES = frozenset({State.MATCHED, State.REVOKED, State.CONFIRMED, State.UNCONFIRMED})


class ChannelType(enum.StrEnum):
    WEBHOOK = "webhook"
    SLACK = "slack"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One of the org's endpoints. URL and secret are secrets (a Slack URL is its own credential):
    they stay out of `repr` and are sealed at rest."""

    id: str
    type: ChannelType
    url: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)


class ChannelStatus(enum.StrEnum):
    PENDING = "pending"  # to be sent (again) from `next_attempt_at` on
    SENDING = "sending"  # held by a sender; past its hold, the outcome is unknown
    SENT = "sent"
    REFUSED = "refused"  # not sendable, or refused by the endpoint: not retried
    GONE = "gone"  # the endpoint answered 410: nothing more goes to it for this incident
    GAVE_UP = "gave_up"  # still failing after the give-up window


@dataclass(frozen=True, slots=True)
class ChannelJob:
    """One outbox row handed to a sender, with its channel's URL and secret opened."""

    incident_id: str
    channel_id: str
    type: ChannelType
    state: State
    url: str = field(repr=False)
    secret: str | None = field(repr=False)
    attempts: int
    created_at: float
    uncertain: bool
    # Its URL or secret opens with none of the configured data keys: it cannot be sent.
    unsealable: bool = False


@dataclass(frozen=True, slots=True)
class ChannelOutcome:
    """What became of one attempt: the row's new status (and when to try again, for `pending`), and
    the timeline event to append (`kind`, `detail`) when the row is settled or retried."""

    status: ChannelStatus
    kind: str | None
    detail: dict[str, Any]
    next_attempt_at: float | None = None
    http_status: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ChannelDelivery:
    """An outbox row as the operator API shows it: never the URL or the secret."""

    incident_id: str
    channel_id: str
    type: str
    state: str
    status: ChannelStatus
    attempts: int
    last_status: int | None
    reason: str | None
    created_at: float
    updated_at: float


# What an intake should do with one of its incidents still in `received` (new, or left there by an
# earlier delivery): the transition to apply in the intake's own transaction, or None to leave it.
# A new incident is inserted as its transition leaves it, which must then expect it as created
# (`received`, no lease). PostgreSQL asks about a new token before its insert: if another replica
# creates the token meanwhile, that answer is dropped and the row read back is asked about again.
Decide = Callable[[IncidentRef], Transition | None]


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
