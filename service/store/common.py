"""What the SQLite and PostgreSQL backends share: the pure logic between the pipeline's requests and
the SQL each backend runs.

Kept apart from both so that the semantics (which columns a transition may set and how its write is
fenced, what a new incident looks like, which incidents a purge touches, when a delivery or an
Idempotency-Key may be taken over, how a row becomes a model) are written once and cannot drift.
SQL stays per backend, except where it only differs by its parameter marker and how JSON is passed,
which a `Dialect` carries.
"""

from __future__ import annotations

import asyncio
import enum
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from service.reasons import Reason
from service.store.models import (
    CHANNEL_STATES,
    AlertRecord,
    ChannelDelivery,
    ChannelJob,
    ChannelOutcome,
    ChannelStatus,
    ChannelType,
    Delivery,
    DeliveryStatus,
    Event,
    IdempotencyState,
    IdempotentRequest,
    Incident,
    IncidentFilter,
    IncidentRef,
    Label,
    Percentiles,
    RateBucket,
    RateRefusal,
    Sighting,
    State,
    Timed,
    TokenSighting,
    Transition,
)
from service.store.sealing import Sealer, SealingError
from service.tokens import redact

# Intakes of more items than this are prepared beside the event loop (see IntakePlan).
OFFLOAD_ITEMS = 500

# Columns a Transition may set; anything else is a programming error, caught before SQL is built.
SETTABLE = frozenset(
    {
        "label",
        "key_id",
        "org_id",
        "key_name",
        "recipients",
        "matched_at",
        "revoked_at",
        "confirmed_at",
        "notified_at",
        "closed_at",
        "attempts",
        "step_started_at",
        "revoke_reissued",
        "last_reason",
        "unconfirmed_at",
        "probed_at",
        "key_created_at",
        "key_last_used_at",
        "org_name",
    }
)

# A row as either driver hands it out: sqlite3.Row and psycopg's dict rows both index by column name.
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Dialect:
    """How a backend spells a parameter, and how it wants a JSON value passed."""

    mark: str
    json: Callable[[Any], Any]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def loads(value: Any) -> Any:
    """JSON columns come back as text from SQLite and already decoded from PostgreSQL's jsonb."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def plain(value: Any) -> Any:
    """Enum members as their values: drivers must never see (or guess at) an enum's name."""
    # `_value_`, the member's own attribute: `value` goes through a descriptor in Python, and a big
    # alert's rows pass three enums per token through here.
    return value._value_ if isinstance(value, enum.Enum) else value


def new_incident_ids(count: int) -> Iterator[str]:
    """Time-ordered so that listing by id is listing by arrival, and unguessable past the prefix.

    One call to the system's randomness for all of them: a 10,000-token alert would otherwise
    make 10,000 system calls for its ids alone.
    """
    prefix = f"inc_{int(time.time() * 1000):012x}"
    noise = secrets.token_hex(6 * count)
    return (prefix + noise[i : i + 12] for i in range(0, 12 * count, 12))


# -- intake ------------------------------------------------------------------------------------------


class NewIncident(NamedTuple):
    """The first sighting of a token, as it is inserted: key-shaped tokens are sealed and wait
    `match_after` seconds for the request's own lookup; anything else is a false positive at once,
    stored hash-only. `token` is the key-shaped token, to seal (see `row`); `repr` leaves it out.

    A named tuple, not a frozen dataclass: as immutable, and made in a third of the time (a big
    alert makes one per token)."""

    id: str
    token_hash: str
    redacted: str
    token: str | None
    sealed_key: str | None
    token_type: str
    state: State
    label: Label | None
    next_run_at: float | None
    last_reason: str | None

    def __repr__(self) -> str:
        return f"NewIncident(id={self.id!r}, redacted={self.redacted!r}, state={self.state!r})"

    def events(
        self, alert: AlertRecord, decided: Transition | None = None
    ) -> list[tuple[str, State | None, dict[str, Any]]]:
        """(kind, state, detail) of the audit events its creation writes, `decided`'s last: the
        timeline reads as if the incident had been received, then moved on by `decided`."""
        found: list[tuple[str, State | None, dict[str, Any]]] = [
            ("received", State.RECEIVED, {"reporter": alert.reporter})
        ]
        if self.state is State.FALSE_POSITIVE:
            found.append(("false_positive", self.state, {"reason": Reason.SHAPE_GATE}))
        if decided is not None:
            found.append((decided.event, decided.state, decided.detail))
        return found

    def ref(self) -> IncidentRef:
        """The incident as created, before any decision."""
        return IncidentRef(
            self.id, self.token_hash, self.token_type, self.redacted, self.state, self.label, True
        )

    def stored(self, row: Row, created: bool) -> IncidentRef:
        """The incident as the store holds it (`row`: its id, redacted form, state and label, read
        back in the intake's transaction), seen through this sighting's token type."""
        return IncidentRef(
            row["id"],
            self.token_hash,
            self.token_type,
            row["redacted"],
            State(row["state"]),
            Label(row["label"]) if row["label"] else None,
            created=created,
        )

    def row(self, now: float, decided: Transition | None, d: Dialect, sealer: Sealer) -> dict[str, Any]:
        """Column → value of its INSERT: the incident as created or, when its intake decided it
        (`decided`, which must expect it as created and unleased: its fence holds by
        construction), as that transition leaves it, in the same columns and values the fenced
        UPDATE would write. A decided incident is inserted once, not inserted then updated.

        The token is sealed here, in the intake's transaction, and only if the decision keeps it:
        most of a big alert's tokens are no key, and sealing each of them before learning that
        was the largest part of preparing it."""
        wiped = decided is not None and decided.wipe_token
        row = {
            "id": self.id,
            "token_hash": self.token_hash,
            "redacted": self.redacted,
            "token_sealed": None if self.token is None or wiped else sealer.seal(self.token, self.token_hash),
            "sealed_key": self.sealed_key,
            "token_type": self.token_type,
            "state": str(self.state),
            "label": plain(self.label),
            "created_at": now,
            "next_run_at": self.next_run_at,
            "last_reason": self.last_reason,
        }
        if decided is None:
            return row
        if decided.expected_state is not self.state or decided.lease_owner is not None:
            raise ValueError("a new incident's transition must expect it as created, unleased")
        row.update(transition_values(decided, d))
        if decided.page:
            row["pages"] = decided.page
        return row


@dataclass(frozen=True, slots=True)
class IntakePlan:
    """An intake prepared outside the transaction: one candidate incident per distinct token, by its
    hash, in order of first appearance. Its sealing waits for the intake's decision (see
    `NewIncident.row`)."""

    candidates: dict[str, NewIncident]

    @classmethod
    def prepare(
        cls, items: Sequence[TokenSighting], sealer: Sealer, now: float, match_after: float
    ) -> IntakePlan:
        candidates: dict[str, NewIncident] = {}
        firsts: dict[str, TokenSighting] = {}
        for item in items:
            firsts.setdefault(item.digest, item)
        ids = new_incident_ids(len(firsts))
        for item in firsts.values():
            digest, shaped = item.digest, item.shaped
            candidates[digest] = NewIncident(
                id=next(ids),
                token_hash=digest,
                redacted=redact(item.token),
                token=item.token if shaped else None,
                sealed_key=sealer.current if shaped else None,
                token_type=item.token_type,
                state=State.RECEIVED if shaped else State.FALSE_POSITIVE,
                label=None if shaped else Label.FALSE_POSITIVE,
                next_run_at=now + match_after if shaped else None,
                last_reason=None if shaped else "shape_gate",
            )
        return cls(candidates)

    @classmethod
    async def prepare_beside_loop(
        cls, items: Sequence[TokenSighting], sealer: Sealer, now: float, match_after: float
    ) -> IntakePlan:
        """`prepare`, in a thread when the intake is big: redacting thousands of tokens and drawing
        their candidates on the event loop would hold every other request behind one alert."""
        if len(items) <= OFFLOAD_ITEMS:
            return cls.prepare(items, sealer, now, match_after)
        return await asyncio.to_thread(cls.prepare, items, sealer, now, match_after)

    def distinct_sightings(self, items: Sequence[TokenSighting]) -> list[tuple[str, TokenSighting]]:
        """(token hash, item) per distinct (token, url, source) of the alert: a repeated item adds
        nothing."""
        seen: set[tuple[str, str | None, str | None]] = set()
        found = []
        for item in items:
            if (item.digest, item.url, item.source) not in seen:
                seen.add((item.digest, item.url, item.source))
                found.append((item.digest, item))
        return found

    def sighting_rows(
        self, items: Sequence[TokenSighting], ids: Mapping[str, str], alert_id: int, now: float
    ) -> list[tuple[Any, ...]]:
        """(incident_id, alert_id, reporter, operator, url, source, token_type, seen_at, note) per
        distinct sighting."""
        return [
            (ids[digest], alert_id, item.reporter, item.operator, item.url, item.source,
             item.token_type, now, item.note)
            for digest, item in self.distinct_sightings(items)
        ]  # fmt: skip


def incident_rows(
    news: Iterable[tuple[NewIncident, Transition | None]], now: float, d: Dialect, sealer: Sealer
) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
    """An intake's new incidents as rows to insert (`NewIncident.row`), grouped by the columns they
    set, one INSERT each: those left in `received` or stopped by the shape gate, those its lookup
    made false positives, those it matched."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for new, decided in news:
        row = new.row(now, decided, d, sealer)
        groups.setdefault(tuple(row), []).append(tuple(row.values()))
    return groups


def after(ref: IncidentRef, t: Transition, own: bool = True) -> IncidentRef:
    """`ref` once an intake applied `t` to it: this ref's own intake, or (`own` false) another one
    in the same transaction, whose transition this ref only sees the result of."""
    return ref.moved(t.state or ref.state, t.set.get("label", ref.label), t if own else None)


# An alert is one per (reporter, body), public reports apart (migration 0003 says why): the
# conflict target names the unique index's predicate, as a partial index requires.
REPLAY_CONFLICT = "ON CONFLICT (reporter, body_sha256) WHERE reporter <> 'public' DO NOTHING"


def alert_insert(d: Dialect) -> str:
    """An alert's record; a redelivery (same reporter, same body) keeps the first one, whose id
    `alert_id_query` then finds."""
    m = d.mark
    return (
        "INSERT INTO alerts (reporter, operator, received_at, body_sha256, item_count, new_incidents)"  # noqa: S608
        f" VALUES ({m}, {m}, {m}, {m}, {m}, {m}) {REPLAY_CONFLICT}"
    )


def alert_id_query(d: Dialect) -> str:
    """The first alert of a body, for a redelivery whose insert did nothing."""
    return f"SELECT min(id) FROM alerts WHERE reporter = {d.mark} AND body_sha256 = {d.mark}"  # noqa: S608


def alert_counted(d: Dialect) -> str:
    """Add (first argument) to the incidents an alert's record says it created (second: its id):
    an alert committed in parts (see `Worker.accept`) creates its incidents in each of them, and
    a redelivery after a crash between two parts creates those the crash left out."""
    return f"UPDATE alerts SET new_incidents = new_incidents + {d.mark} WHERE id = {d.mark}"  # noqa: S608


def sighting_insert(d: Dialect) -> str:
    """One sighting per (incident, reporter, url, source): a place already recorded adds nothing."""
    marks = ", ".join([d.mark] * 9)
    return (
        "INSERT INTO sightings (incident_id, alert_id, reporter, operator, url, source, token_type,"  # noqa: S608
        f" seen_at, note) VALUES ({marks}) ON CONFLICT DO NOTHING"
    )


def heartbeat(d: Dialect) -> str:
    """The readiness check's write: one row, rewritten, committed like any alert."""
    return (
        f"INSERT INTO heartbeat (id, at) VALUES (1, {d.mark})"  # noqa: S608
        " ON CONFLICT (id) DO UPDATE SET at = excluded.at"
    )


def purge_sightings(d: Dialect) -> list[str]:
    """Forget an incident's sighting URLs (one argument, the incident id, per statement). Rows that
    would become the same place once their URL is gone are dropped first, keeping one per place:
    a row already without URL, or else the first."""
    m = d.mark
    return [
        f"DELETE FROM sightings WHERE incident_id = {m} AND url IS NOT NULL AND EXISTS ("  # noqa: S608
        "SELECT 1 FROM sightings o WHERE o.incident_id = sightings.incident_id"
        " AND o.reporter = sightings.reporter AND COALESCE(o.source, '') = COALESCE(sightings.source, '')"
        " AND (o.url IS NULL OR o.id < sightings.id))",
        f"UPDATE sightings SET url = NULL WHERE incident_id = {m} AND url IS NOT NULL",  # noqa: S608
    ]


# -- fenced transitions ------------------------------------------------------------------------------


def check_transitions(transitions: Sequence[Transition]) -> None:
    for t in transitions:
        unknown = set(t.set) - SETTABLE
        if unknown:
            raise ValueError(f"transition may not set {sorted(unknown)}")


def transition_values(t: Transition, d: Dialect) -> dict[str, Any]:
    """Column → value of what `t` writes on its incident's row, but for the lease it hands back and
    the page it adds: `fenced_update` writes these on an existing incident, `NewIncident.row` on
    one its intake inserts already decided."""
    values: dict[str, Any] = {"next_run_at": t.next_run_at}
    if t.state is not None:
        values["state"] = str(t.state)
    for column, value in t.set.items():
        values[column] = d.json(value) if column == "recipients" else plain(value)
    if t.wipe_token:
        values["token_sealed"] = None
    return values


def fenced_update(t: Transition, d: Dialect) -> tuple[str, list[Any]]:
    """The UPDATE that applies `t` only if the incident is still in `t.expected_state` and, for a
    worker's step, still leased to it; it hands the lease back either way it applies.

    Exactly one row changes when the transition applies, none when it was superseded.
    """
    m = d.mark
    values = transition_values(t, d)
    assignments = [f"{column} = {m}" for column in values] + ["lease_owner = NULL", "lease_until = NULL"]
    args: list[Any] = list(values.values())
    if t.page:
        assignments.append(f"pages = CASE WHEN pages = '' THEN {m} ELSE pages || ',' || {m} END")
        args += [t.page, t.page]
    fence = f"id = {m} AND state = {m}"
    args += [t.incident_id, str(t.expected_state)]
    if t.lease_owner is not None:
        fence += f" AND lease_owner = {m}"
        args.append(t.lease_owner)
    return f"UPDATE incidents SET {', '.join(assignments)} WHERE {fence}", args  # noqa: S608


def event_args(
    d: Dialect, incident_id: str, at: float, kind: str, state: State | None, detail: dict[str, Any]
) -> tuple[Any, ...]:
    """Parameters of `INSERT INTO events (incident_id, at, kind, state, detail)`."""
    return (incident_id, at, kind, None if state is None else str(state), d.json(detail))


# Events to insert: (incident_id, at, kind, state, detail) each.
Events = Iterable[tuple[str, float, str, State | None, dict[str, Any]]]


def events_args(d: Dialect, events: Events) -> Iterator[tuple[Any, ...]]:
    """`event_args` of many events, (incident_id, at, kind, state, detail) each. A detail whose
    values are all text (a reporter, a reason) is serialized once: a big alert's thousands of
    events share a handful of them, and serializing each one again was a tenth of its intake.
    Text only, because equal keys must mean equal JSON (1 and True are equal keys); a detail is
    looked up before its values are checked, since only all-text details are ever stored and no
    other value equals a text."""
    serialized: dict[tuple[tuple[str, Any], ...], Any] = {}
    for incident_id, at, kind, state, detail in events:
        key = tuple(detail.items())
        try:
            json_detail = serialized.get(key)
        except TypeError:  # an unhashable value (a list, a dict): not text, not shared
            json_detail = d.json(detail)
        else:
            if json_detail is None:
                json_detail = d.json(detail)
                if all(isinstance(value, str) for value in detail.values()):
                    serialized[key] = json_detail
        yield (incident_id, at, kind, None if state is None else str(state), json_detail)


# -- reads -------------------------------------------------------------------------------------------


def incident_filter(where: IncidentFilter, d: Dialect) -> tuple[str, list[Any]]:
    """The operator API's listing: newest first, keyset-paginated by id."""
    m = d.mark
    clauses: list[str] = []
    args: list[Any] = []
    if where.state is not None:
        clauses.append(f"state = {m}")
        args.append(str(where.state))
    if where.org_id is not None:
        clauses.append(f"org_id = {m}")
        args.append(where.org_id)
    if where.reporter is not None:
        clauses.append(f"id IN (SELECT incident_id FROM sightings WHERE reporter = {m})")  # noqa: S608
        args.append(where.reporter)
    if where.since is not None:
        clauses.append(f"created_at >= {m}")
        args.append(where.since)
    if where.until is not None:
        clauses.append(f"created_at < {m}")
        args.append(where.until)
    if where.before_id is not None:
        clauses.append(f"id < {m}")
        args.append(where.before_id)
    sql = "SELECT * FROM incidents"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY id DESC LIMIT {m}"
    args.append(where.limit)
    return sql, args


def oldest_pending(limit: int, d: Dialect) -> tuple[str, list[Any]]:
    """Unfinished incidents, oldest first: what the pipeline (or an operator) owes an answer to."""
    m = d.mark
    return (
        f"SELECT * FROM incidents WHERE state NOT IN ({m}, {m}) ORDER BY created_at, id LIMIT {m}",  # noqa: S608
        [str(State.CLOSED), str(State.FALSE_POSITIVE), limit],
    )


_QUANTILES = (50, 95)


def percentiles_query(
    timed: Timed, since: float, until: float, width: float, d: Dialect
) -> tuple[str, list[Any]]:
    """Each bucket's nearest-rank p50 and p95 rows (rank = ceil(q·n)), ranked by window functions
    that SQLite and PostgreSQL both have, so that only the p50/p95 rows leave the database.

    Buckets are counted in whole milliseconds with integer division, which truncates alike in both
    (a float cast to an integer does not: SQLite truncates, PostgreSQL rounds).
    """
    m = d.mark
    wanted = " OR ".join(f"rank = (n * {q} + 99) / 100" for q in _QUANTILES)
    sql = (
        "WITH timed AS ("  # noqa: S608 (the column comes from the Timed enum, never from a caller)
        f" SELECT (CAST(created_at * 1000 AS BIGINT) - {m}) / {m} AS bucket,"
        f" {timed.value} - created_at AS took"
        f" FROM incidents WHERE {timed.value} IS NOT NULL AND created_at >= {m} AND created_at < {m}),"
        " ranked AS (SELECT bucket, took, ROW_NUMBER() OVER (PARTITION BY bucket ORDER BY took) AS rank,"
        " COUNT(*) OVER (PARTITION BY bucket) AS n FROM timed)"
        f" SELECT bucket, n, rank, took FROM ranked WHERE {wanted} ORDER BY bucket, rank"
    )
    return sql, [round(since * 1000), max(1, round(width * 1000)), since, until]


def percentiles_from(rows: Sequence[Row], since: float, width: float) -> list[Percentiles]:
    """The query's rows, two per bucket (one when p50 and p95 are the same row), as models."""
    by_bucket: dict[int, tuple[int, dict[int, float]]] = {}
    for row in rows:
        _, ranks = by_bucket.setdefault(int(row["bucket"]), (int(row["n"]), {}))
        ranks[int(row["rank"])] = float(row["took"])
    found = []
    for bucket, (n, ranks) in sorted(by_bucket.items()):
        p50, p95 = (ranks[(n * q + 99) // 100] for q in _QUANTILES)
        found.append(Percentiles(since + bucket * width, n, p50, p95))
    return found


# -- housekeeping ------------------------------------------------------------------------------------


def purge_candidates(finished_before: float, d: Dialect) -> tuple[str, list[Any]]:
    """Incidents whose sightings still hold URLs and that have been over since `finished_before`:
    closed then, or labelled a false positive (over from the moment it is labelled) by then."""
    m = d.mark
    return (
        "SELECT DISTINCT s.incident_id FROM sightings s JOIN incidents i ON i.id = s.incident_id"  # noqa: S608
        f" WHERE s.url IS NOT NULL AND ((i.state = {m} AND i.closed_at < {m})"
        f" OR (i.state = {m} AND i.created_at < {m})) ORDER BY s.incident_id",
        [str(State.CLOSED), finished_before, str(State.FALSE_POSITIVE), finished_before],
    )


def reclaim_leases(pattern: str, d: Dialect) -> tuple[str, list[Any]]:
    """Hand back the leases whose owner matches the LIKE `pattern` (`!` escapes): those of a dead
    predecessor, taken back at once instead of waiting for them to expire."""
    m = d.mark
    sql = f"UPDATE incidents SET lease_owner = NULL, lease_until = NULL WHERE lease_owner LIKE {m} ESCAPE '!'"  # noqa: S608
    return sql, [pattern]


def reclaim_channel_holds(pattern: str, now: float, d: Dialect) -> tuple[str, list[Any]]:
    """Make the channel events held by senders whose holder matches `pattern` due now, as their
    predecessor's leases are: they stay `sending`, so whoever takes them knows they may have gone
    out (and sends them again under the same event id)."""
    m = d.mark
    return (
        f"UPDATE channel_events SET next_attempt_at = {m} WHERE status = {m} AND holder LIKE {m} ESCAPE '!'",  # noqa: S608
        [now, str(ChannelStatus.SENDING), pattern],
    )


def like_prefix(prefix: str) -> str:
    """A LIKE pattern (escape `!`) matching every string that starts with `prefix`."""
    return prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


# -- data keys ---------------------------------------------------------------------------------------

# One sealed row per data key id (NULL: sealed before key ids existed), to check the keys against.
SEALED_SAMPLES = (
    "SELECT id, token_hash, token_sealed, sealed_key FROM incidents WHERE id IN"
    " (SELECT min(id) FROM incidents WHERE token_sealed IS NOT NULL GROUP BY sealed_key)"
)


def check_samples(samples: Sequence[Row], sealer: Sealer) -> None:
    """SealingError unless the configured keys open one sealed row of every key id the store holds:
    a data key that is not the one the store was sealed with must stop start-up, not fail every
    probe later."""
    for row in samples:
        try:
            sealer.open(bytes(row["token_sealed"]), row["token_hash"], row["sealed_key"])
        except SealingError:
            held = row["sealed_key"] or "(one from before key ids)"
            raise SealingError(
                f"the store holds tokens sealed under data key {held}, which none of the configured"
                f" keys ({', '.join(sealer.key_ids)}) opens"
            ) from None


@dataclass(slots=True)
class RewrapReport:
    """What `rewrap` did: rows resealed under the current key, and rows no configured key opens
    (left as they are; each is named by incident id, never by content)."""

    resealed: int = 0
    unopenable: list[str] = field(default_factory=list)


def rewrap_batch(after: str, limit: int, sealer: Sealer, d: Dialect) -> tuple[str, list[Any]]:
    """The next rows (by id, after `after`) not sealed under the current key."""
    m = d.mark
    return (
        "SELECT id, token_hash, token_sealed, sealed_key FROM incidents WHERE token_sealed IS NOT NULL"  # noqa: S608
        f" AND (sealed_key IS NULL OR sealed_key <> {m}) AND id > {m} ORDER BY id LIMIT {m}",
        [sealer.current, after, limit],
    )


def reseal(rows: Sequence[Row], sealer: Sealer, report: RewrapReport) -> list[tuple[Any, ...]]:
    """(new blob, key id, incident id, old blob) for each row that opens; the UPDATE matches the old
    blob, so a row wiped or resealed meanwhile is left alone."""
    updates = []
    for row in rows:
        old = bytes(row["token_sealed"])
        try:
            token = sealer.open(old, row["token_hash"], row["sealed_key"])
        except SealingError:
            report.unopenable.append(row["id"])
            continue
        updates.append((sealer.seal(token, row["token_hash"]), sealer.current, row["id"], old))
    return updates


def reseal_update(d: Dialect) -> str:
    m = d.mark
    return f"UPDATE incidents SET token_sealed = {m}, sealed_key = {m} WHERE id = {m} AND token_sealed = {m}"  # noqa: S608


def channel_rewrap_batch(
    after: tuple[str, str], limit: int, sealer: Sealer, d: Dialect
) -> tuple[str, list[Any]]:
    """The next channels (by incident and channel id, after `after`) not sealed under the current key."""
    m = d.mark
    return (
        "SELECT incident_id, channel_id, url_sealed, secret_sealed, sealed_key FROM channels"  # noqa: S608
        f" WHERE sealed_key <> {m} AND (incident_id > {m} OR (incident_id = {m} AND channel_id > {m}))"
        f" ORDER BY incident_id, channel_id LIMIT {m}",
        [sealer.current, after[0], after[0], after[1], limit],
    )


def channel_reseal(rows: Sequence[Row], sealer: Sealer, report: RewrapReport) -> list[tuple[Any, ...]]:
    """(new URL blob, new secret blob, key id, incident id, channel id, old URL blob) per channel."""
    updates = []
    for row in rows:
        incident_id, channel_id, key = row["incident_id"], row["channel_id"], row["sealed_key"]
        old = bytes(row["url_sealed"])
        try:
            url = sealer.open(old, _sealing_context(incident_id, channel_id, "url"), key)
            secret = row["secret_sealed"]
            if secret is not None:
                context = _sealing_context(incident_id, channel_id, "secret")
                secret = sealer.seal(sealer.open(bytes(secret), context, key), context)
        except SealingError:
            report.unopenable.append(incident_id)
            continue
        url_context = _sealing_context(incident_id, channel_id, "url")
        updates.append((sealer.seal(url, url_context), secret, sealer.current, incident_id, channel_id, old))
    return updates


def channel_reseal_update(d: Dialect) -> str:
    m = d.mark
    return (
        f"UPDATE channels SET url_sealed = {m}, secret_sealed = {m}, sealed_key = {m}"  # noqa: S608
        f" WHERE incident_id = {m} AND channel_id = {m} AND url_sealed = {m}"
    )


@dataclass(frozen=True, slots=True)
class Rewrap:
    """One kind of sealed row `rewrap` walks: how to page through it, reseal it and write it back."""

    batch: Callable[[Any, int, Sealer, Dialect], tuple[str, list[Any]]]
    reseal: Callable[[Sequence[Row], Sealer, RewrapReport], list[tuple[Any, ...]]]
    update: Callable[[Dialect], str]
    cursor: Callable[[Row], Any]
    start: Any


# Raw tokens, then the channels' URLs and secrets: everything sealed with the data key.
REWRAPS = (
    Rewrap(rewrap_batch, reseal, reseal_update, lambda row: row["id"], ""),
    Rewrap(
        channel_rewrap_batch,
        channel_reseal,
        channel_reseal_update,
        lambda row: (row["incident_id"], row["channel_id"]),
        ("", ""),
    ),
)


# -- the channel outbox ------------------------------------------------------------------------------


def _sealing_context(incident_id: str, channel_id: str, part: str) -> str:
    """Associated data: a sealed URL copied onto another channel's row fails to open."""
    return f"channel\0{incident_id}\0{channel_id}\0{part}"


def sealed_channels(transitions: Sequence[Transition], sealer: Sealer) -> dict[str, list[tuple[Any, ...]]]:
    """Rows of `channels` each transition brings, sealed outside the transaction (it is CPU work):
    (incident_id, channel_id, type, url_sealed, secret_sealed, sealed_key)."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for t in transitions:
        for c in t.channels:
            secret = (
                None
                if c.secret is None
                else sealer.seal(c.secret, _sealing_context(t.incident_id, c.id, "secret"))
            )
            rows.setdefault(t.incident_id, []).append(
                (t.incident_id, c.id, str(c.type),
                 sealer.seal(c.url, _sealing_context(t.incident_id, c.id, "url")), secret, sealer.current)
            )  # fmt: skip
    return rows


def channel_insert(d: Dialect) -> str:
    m = d.mark
    return (
        "INSERT INTO channels (incident_id, channel_id, type, url_sealed, secret_sealed, sealed_key)"  # noqa: S608
        f" VALUES ({m}, {m}, {m}, {m}, {m}, {m}) ON CONFLICT DO NOTHING"
    )


def channel_state(t: Transition) -> State | None:
    """The state a transition tells the channels of: the state it enters, if the channels hear of it."""
    return t.state if t.state in CHANNEL_STATES else None


def outbox_insert(t: Transition, now: float, d: Dialect) -> tuple[str, list[Any]] | None:
    """The outbox rows an applied transition owes: one per channel of the incident, for a state the
    channels hear of. A channel that answered 410 for this incident hears nothing more."""
    state = channel_state(t)
    if state is None:
        return None
    m = d.mark
    return (
        "INSERT INTO channel_events (incident_id, channel_id, state, seq, status, attempts, next_attempt_at,"  # noqa: S608
        f" created_at, updated_at) SELECT incident_id, channel_id, {m}, {m}, {m}, 0, {m}, {m}, {m}"
        f" FROM channels WHERE incident_id = {m} AND disabled_at IS NULL ON CONFLICT DO NOTHING",
        [str(state), _SEQ[state], str(ChannelStatus.PENDING), now, now, now, t.incident_id],
    )


# The order in which a channel hears of an incident's states (an unconfirmed key may later confirm).
_SEQ = {State.MATCHED: 1, State.REVOKED: 2, State.UNCONFIRMED: 3, State.CONFIRMED: 4}


def channel_due(now: float, limit: int, d: Dialect, lock: str = "") -> tuple[str, list[Any]]:
    """Outbox rows due now, with their channel: pending ones whose time has come, and rows still
    `sending` past their sender's hold (it died mid-send). A channel hears of an incident's states in
    order: an event waits while an earlier one of the same incident and channel is unsettled."""
    m = d.mark
    return (
        "SELECT e.incident_id, e.channel_id, e.state, e.status, e.attempts, e.created_at, c.type,"  # noqa: S608
        " c.url_sealed, c.secret_sealed, c.sealed_key FROM channel_events e JOIN channels c"
        " ON c.incident_id = e.incident_id AND c.channel_id = e.channel_id"
        f" WHERE e.next_attempt_at IS NOT NULL AND e.next_attempt_at <= {m}"
        " AND NOT EXISTS (SELECT 1 FROM channel_events p WHERE p.incident_id = e.incident_id"
        " AND p.channel_id = e.channel_id AND p.seq < e.seq AND p.next_attempt_at IS NOT NULL)"
        f" ORDER BY e.next_attempt_at LIMIT {m}{lock}",
        [now, limit],
    )


def channel_hold(holder: str, until: float, now: float, row: Row, d: Dialect) -> tuple[str, list[Any]]:
    m = d.mark
    return (
        f"UPDATE channel_events SET status = {m}, holder = {m}, attempts = attempts + 1,"  # noqa: S608
        f" next_attempt_at = {m}, updated_at = {m} WHERE incident_id = {m} AND channel_id = {m}"
        f" AND state = {m}",
        [str(ChannelStatus.SENDING), holder, until, now, row["incident_id"], row["channel_id"], row["state"]],
    )


def channel_job(row: Row, sealer: Sealer) -> ChannelJob:
    """The row as a sender gets it, URL and secret opened; a value no configured data key opens makes
    a job marked `unsealable` (the sender records it as refused) rather than an error that would
    stop every other channel."""
    incident_id, channel_id, key = row["incident_id"], row["channel_id"], row["sealed_key"]
    url, secret, unsealable = "", None, False
    try:
        url = sealer.open(bytes(row["url_sealed"]), _sealing_context(incident_id, channel_id, "url"), key)
        if row["secret_sealed"] is not None:
            context = _sealing_context(incident_id, channel_id, "secret")
            secret = sealer.open(bytes(row["secret_sealed"]), context, key)
    except SealingError:
        unsealable = True
    return ChannelJob(
        incident_id=incident_id,
        channel_id=channel_id,
        type=ChannelType(row["type"]),
        state=State(row["state"]),
        url=url,
        secret=secret,
        attempts=row["attempts"] + 1,
        created_at=row["created_at"],
        uncertain=row["status"] == ChannelStatus.SENDING,
        unsealable=unsealable,
    )


def channel_finish(
    holder: str, job: ChannelJob, outcome: ChannelOutcome, now: float, d: Dialect
) -> tuple[str, list[Any]]:
    """Record an attempt's outcome, only if this sender still holds the row."""
    m = d.mark
    return (
        f"UPDATE channel_events SET status = {m}, holder = NULL, next_attempt_at = {m}, updated_at = {m},"  # noqa: S608
        f" last_status = {m}, reason = {m} WHERE incident_id = {m} AND channel_id = {m} AND state = {m}"
        f" AND holder = {m} AND status = {m}",
        [str(outcome.status), outcome.next_attempt_at, now, outcome.http_status, outcome.reason,
         job.incident_id, job.channel_id, str(job.state), holder, str(ChannelStatus.SENDING)],
    )  # fmt: skip


def channel_stop(job: ChannelJob, now: float, reason: str, d: Dialect) -> list[tuple[str, list[Any]]]:
    """After a 410: the channel is off for this incident, and its rows still waiting are dropped."""
    m = d.mark
    return [
        (
            f"UPDATE channels SET disabled_at = {m} WHERE incident_id = {m} AND channel_id = {m}",  # noqa: S608
            [now, job.incident_id, job.channel_id],
        ),
        (
            f"UPDATE channel_events SET status = {m}, next_attempt_at = NULL, updated_at = {m}, reason = {m}"  # noqa: S608
            f" WHERE incident_id = {m} AND channel_id = {m} AND status = {m}",
            [
                str(ChannelStatus.GONE),
                now,
                reason,
                job.incident_id,
                job.channel_id,
                str(ChannelStatus.PENDING),
            ],
        ),
    ]


def channel_deliveries(incident_ids: Sequence[str], d: Dialect) -> tuple[str, list[Any]]:
    m = d.mark
    marks = ", ".join([m] * len(incident_ids))
    return (
        "SELECT e.*, c.type FROM channel_events e JOIN channels c"  # noqa: S608
        " ON c.incident_id = e.incident_id AND c.channel_id = e.channel_id"
        f" WHERE e.incident_id IN ({marks}) ORDER BY e.seq, e.channel_id",
        list(incident_ids),
    )


def channel_delivery_from(row: Row) -> ChannelDelivery:
    return ChannelDelivery(
        incident_id=row["incident_id"],
        channel_id=row["channel_id"],
        type=row["type"],
        state=row["state"],
        status=ChannelStatus(row["status"]),
        attempts=row["attempts"],
        last_status=row["last_status"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# -- the outbox and Idempotency-Key ------------------------------------------------------------------


class Take(enum.Enum):
    """What a sender may do with an existing delivery row."""

    LEAVE = "leave"  # finished, or held by a live sender
    TAKE = "take"  # known not delivered
    TAKE_UNCERTAIN = "take_uncertain"  # its sender's hold ran out mid-send: it may have gone out


def delivery_take(status: DeliveryStatus, held_until: float | None, now: float) -> Take:
    if status in (DeliveryStatus.SENT, DeliveryStatus.REFUSED):
        return Take.LEAVE
    if status is DeliveryStatus.SENDING:
        return Take.LEAVE if (held_until or 0) >= now else Take.TAKE_UNCERTAIN
    return Take.TAKE


def idempotent_earlier(row: Row, now: float, stale_after: float) -> IdempotentRequest | None:
    """What an existing Idempotency-Key row answers, or None when it may be taken over: a claim
    still running after `stale_after` seconds belongs to a process that died mid-request."""
    state = IdempotencyState(row["state"])
    if state is IdempotencyState.RUNNING and row["started_at"] < now - stale_after:
        return None
    response = row["response"]
    return IdempotentRequest(
        row["fingerprint"], state, row["status"], None if response is None else bytes(response)
    )


# -- rate limits -------------------------------------------------------------------------------------


def take_rates(
    tats: Mapping[str, float], buckets: Sequence[RateBucket], now: float
) -> tuple[dict[str, float], RateRefusal | None]:
    """One request taken from every bucket, or from none: the buckets' new theoretical arrival times
    (GCRA), or the first bucket without room.

    A bucket's state is one number, the time at which it would be full again (`tats`, absent = full),
    which is what lets replicas share it as one row each, with no window edge where the count resets.
    All or nothing, so a request refused by a later bucket (everyone's) costs nothing in an earlier
    one (its client's).
    """
    taken: dict[str, float] = {}
    for index, bucket in enumerate(buckets):
        interval = bucket.period / bucket.limit
        arrival = max(taken.get(bucket.key, tats.get(bucket.key, 0.0)), now) + interval
        # The tolerance absorbs float error in limit × interval, so that exactly `limit` fit.
        if arrival - now > bucket.period + 1e-9:
            return {}, RateRefusal(index, arrival - bucket.period - now)
        taken[bucket.key] = arrival
    return taken, None


# -- rows to models ----------------------------------------------------------------------------------


def incident_from(row: Row) -> Incident:
    return Incident(
        id=row["id"],
        token_hash=row["token_hash"],
        redacted=row["redacted"],
        token_type=row["token_type"],
        state=State(row["state"]),
        label=Label(row["label"]) if row["label"] else None,
        key_id=row["key_id"],
        org_id=row["org_id"],
        key_name=row["key_name"],
        recipients=loads(row["recipients"]),
        created_at=row["created_at"],
        matched_at=row["matched_at"],
        revoked_at=row["revoked_at"],
        confirmed_at=row["confirmed_at"],
        notified_at=row["notified_at"],
        closed_at=row["closed_at"],
        next_run_at=row["next_run_at"],
        attempts=row["attempts"],
        step_started_at=row["step_started_at"],
        revoke_reissued=bool(row["revoke_reissued"]),
        pages=frozenset(filter(None, row["pages"].split(","))),
        last_reason=row["last_reason"],
        has_token=row["token_sealed"] is not None,
        unconfirmed_at=row["unconfirmed_at"],
        probed_at=row["probed_at"],
        key_created_at=row["key_created_at"],
        key_last_used_at=row["key_last_used_at"],
        org_name=row["org_name"],
    )


def sighting_from(row: Row) -> Sighting:
    return Sighting(
        row["reporter"],
        row["url"],
        row["source"],
        row["token_type"],
        row["operator"],
        row["seen_at"],
        row["note"],
    )


def event_from(row: Row) -> Event:
    return Event(row["at"], row["kind"], State(row["state"]) if row["state"] else None, loads(row["detail"]))


def delivery_from(row: Row) -> Delivery:
    return Delivery(
        incident_id=row["incident_id"],
        recipient=row["recipient"],
        purpose=row["purpose"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        message_id=row["message_id"],
        detail=row["detail"],
        updated_at=row["updated_at"],
    )
