"""The PostgreSQL store, for several replicas on one database (psycopg 3, async, pooled).

Same contract as the SQLite store, with the concurrency SQLite never had to face made explicit:

- **Intake** dedupes with `INSERT … ON CONFLICT (token_hash) DO NOTHING`: two replicas taking the
  same token at once make one incident (the second waits on the first's uncommitted row, then reads
  it). Candidate rows go in token-hash order, so two intakes with overlapping tokens lock them in the
  same order and cannot deadlock each other. Concurrent intakes of one process are batched into one
  transaction of a few statements, the way SQLite's writer groups its commits.
- **Claims** take due rows with `FOR UPDATE SKIP LOCKED`, so replicas never take the same incident
  and never wait on each other's claims; transitions stay fenced by expected state and lease owner.
- **Wake-ups** cross replicas by `NOTIFY` in a transaction that makes work due now (delivered at
  commit, never before): every process `LISTEN`s on one connection of its own and wakes its worker,
  which then claims. A process ignores its own notifications (it woke its worker in-process already);
  an intake notifies the others only for keys its lookup matched, while tokens it leaves in
  `received` are taken by its own process's worker. A missed notification costs at most the
  worker's idle poll.
- **Incidents are found by token hash one hash at a time** (a LATERAL subquery per hash, fenced
  with `OFFSET 0` so that the planner cannot turn it back into a join): a nested loop of unique-index
  probes whatever the statistics say. psycopg prepares a statement on its sixth run and the server
  then keeps one generic plan until the next ANALYZE of its tables; made on a new database, before
  autovacuum's first ANALYZE (a minute or more into the traffic), `token_hash = ANY(…)` and a join
  on token_hash were planned as sequential scans of a table the planner took for ten pages, and
  every intake batch read all of `incidents` until that ANALYZE came.
- Commits are durable (`synchronous_commit` stays on, the server's default). Deadlocks and
  serialization failures are retried a few times, since the transaction is simply run again; any
  other driver error is a `StoreError`, which the app answers with 503.

Times are epoch seconds as double precision, like SQLite's REAL, stamped by this process's clock
(the migration's header says why). JSON columns are jsonb, tokens bytea sealed by the same `Sealer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service.reasons import Reason
from service.store import common, migrations
from service.store.base import FailureHook, StoreError, ignore_failure
from service.store.common import OFFLOAD_ITEMS, Dialect, IntakePlan, NewIncident, RewrapReport, Take
from service.store.models import (
    AlertRecord,
    ChannelJob,
    ChannelOutcome,
    ChannelStatus,
    Decide,
    Delivery,
    DeliveryStatus,
    IdempotencyState,
    IdempotentRequest,
    Incident,
    IncidentDetail,
    IncidentFilter,
    IncidentRef,
    Percentiles,
    RateBucket,
    RateRefusal,
    Reservation,
    Sighting,
    State,
    StoreStats,
    Timed,
    TokenSighting,
    Transition,
)
from service.store.sealing import Sealer

POSTGRES = Dialect(mark="%s", json=Jsonb)
# JSON as text, for arrays of it passed in binary (see `_creation`) and cast to jsonb in SQL.
_TEXT_JSON = Dialect(mark="%s", json=common.dumps)
CHANNEL = "leak_responder_due"
_RETRIES = 4
_CONNECT_TIMEOUT = 10.0
_RATES_PRUNE_EVERY = 60.0

T = TypeVar("T")
Conn = psycopg.AsyncConnection[dict[str, Any]]

# Intake batches: how many may be recording at once (each holds a pooled connection), and how
# many intakes one transaction takes.
_BATCHERS = 4
_MAX_BATCH = 64


def _incident_by_hash(columns: str, token_hash: str) -> str:
    """The join that finds, as `i`, the incident whose hash is `token_hash` (an outer column): one
    unique-index probe per hash, whatever the statistics (see the module's docstring)."""
    return (
        f" CROSS JOIN LATERAL (SELECT {columns} FROM incidents"  # noqa: S608 (our own column names)
        f" WHERE incidents.token_hash = {token_hash} OFFSET 0) AS i"
    )


# Which of an intake batch's tokens are known already: only the others are decided before their insert.
_KNOWN = "SELECT i.token_hash FROM unnest(%b::text[]) AS h (token_hash)" + _incident_by_hash(  # noqa: S608
    "token_hash", "h.token_hash"
)
_EVENT_INSERT = "INSERT INTO events (incident_id, at, kind, state, detail) VALUES (%s, %s, %s, %s, %s)"


@dataclass(frozen=True, slots=True)
class _Intake:
    """One request's intake, waiting for a batch to record it."""

    alert: AlertRecord
    items: Sequence[TokenSighting]
    plan: IntakePlan
    decide: Decide | None
    future: asyncio.Future[list[IncidentRef]]


def _next_batch(queued: list[_Intake]) -> list[_Intake]:
    """Taken off `queued`, in order: a bulky intake (a big alert's part, of more than OFFLOAD_ITEMS
    tokens) alone, or else the small ones up to the next bulky one (at most `_MAX_BATCH`). A small
    alert never shares a transaction with a part's statements; it waits for a part to be taken by
    a batcher, not to be committed, since the other batchers go on beside it."""
    bulky = [len(intake.plan.candidates) > OFFLOAD_ITEMS for intake in queued[:_MAX_BATCH]]
    count = 1 if bulky[0] else next((n for n, big in enumerate(bulky) if big), len(bulky))
    batch = queued[:count]
    del queued[:count]
    return batch


def _creation(
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]],
    types: dict[str, str],
    events: list[tuple[Any, ...]],
) -> tuple[str, list[Any]]:
    """One statement that inserts new incidents (`groups`: rows by the columns they set, see
    `common.incident_rows`) and the events of those it created (`common.events_args` keyed by token
    hash, in order); it returns their hashes. Every row goes in an array per column, in binary:
    psycopg's text arrays (quoting and escaping every element) were 40 % of a big alert's time
    on the event loop.

    Each group goes in token-hash order, and the groups in the order of their columns, which two
    replicas deciding the same tokens alike share: their inserts wait on each other, never in a
    circle. (Replicas whose lookups disagree can deadlock; the transaction is then run again.)"""
    inserts, args = [], []
    for g, (columns, rows) in enumerate(sorted(groups.items())):
        names = ", ".join(columns)
        arrays = ", ".join(f"%b::{types[c]}[]" for c in columns)
        inserts.append(
            f"c{g} AS (INSERT INTO incidents ({names}) SELECT {names} FROM unnest({arrays}) AS n ({names})"  # noqa: S608
            " ORDER BY token_hash ON CONFLICT (token_hash) DO NOTHING RETURNING id, token_hash)"
        )
        for column, values in zip(columns, zip(*rows, strict=True), strict=True):
            # A binary array holds one type: a whole number among times is made a float.
            floats = types[column] == "double precision"
            args.append([float(v) if floats and v is not None else v for v in values])
    created = " UNION ALL ".join(f"SELECT * FROM c{g}" for g in range(len(inserts)))  # noqa: S608
    sql = (
        f"WITH {', '.join(inserts)}, created AS ({created}),"  # noqa: S608
        " logged AS (INSERT INTO events (incident_id, at, kind, state, detail)"
        " SELECT created.id, e.at, e.kind, e.state, e.detail::jsonb FROM created JOIN unnest(%b::text[],"
        " %b::float8[], %b::text[], %b::text[], %b::text[]) WITH ORDINALITY AS e (token_hash, at, kind,"
        " state, detail, n) ON e.token_hash = created.token_hash ORDER BY e.n)"
        " SELECT token_hash FROM created"
    )
    return sql, [*args, *(list(column) for column in zip(*events, strict=True))]


def _settle(future: asyncio.Future[list[IncidentRef]], outcome: list[IncidentRef] | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class PostgresStore:
    def __init__(
        self,
        url: str,
        sealer: Sealer,
        clock: Callable[[], float] = time.time,
        pool_size: int = 10,
        on_failure: FailureHook = ignore_failure,
    ) -> None:
        self._url = url
        self._sealer = sealer
        self._clock = clock
        self._on_failure = on_failure
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=_CONNECT_TIMEOUT,
            kwargs={"autocommit": True, "row_factory": dict_row},
            name="leak-responder",
        )
        self._listener: asyncio.Task[None] | None = None
        self._intakes: list[_Intake] = []
        self._batchers = 0
        self._batcher_tasks: set[asyncio.Task[None]] = set()
        # The payload of this process's notifications, so that its listener can skip them.
        self._instance = secrets.token_hex(8)
        self._rates_pruned = 0.0
        self._types: dict[str, str] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and refuse a database this release's migrations have not all been applied to."""
        try:
            await self._pool.open(wait=True, timeout=_CONNECT_TIMEOUT)
        except psycopg.Error as exc:
            await self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        missing = await self.pending_migrations()
        if missing:
            await self._pool.close()
            raise StoreError(
                f"the database needs migration(s) {', '.join(missing)}: run `leak-responder migrate`"
            )
        try:
            await self.check_keys()
        except BaseException:
            await self._pool.close()
            raise

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        # Queued and running intakes finish first: their requests wait for the commit.
        await asyncio.gather(*self._batcher_tasks, return_exceptions=True)
        await self._pool.close()

    async def ping(self) -> None:
        """A commit, as an alert's intake makes one: readiness follows commits."""

        async def work(conn: Conn) -> None:
            await conn.execute(common.heartbeat(POSTGRES), (self._clock(),))

        await self._write(work)

    async def pending_migrations(self) -> list[str]:
        async def work(conn: Conn) -> list[str]:
            return [m.label for m in migrations.pending("postgres", await migrations.postgres_applied(conn))]

        return await self._read(work)

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever any process commits work that is due (NOTIFY on `CHANNEL`)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(wake), name="store-listen")

    async def _listen(self, wake: Callable[[], None]) -> None:
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=int(_CONNECT_TIMEOUT)
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever was committed while nobody listened is picked up by this wake.
                    wake()
                    delay = 0.5
                    async for note in conn.notifies():
                        if note.payload != self._instance:
                            wake()
            except psycopg.Error as exc:
                self._on_failure(
                    Reason.STORE_LISTEN_LOST,
                    f"store wake-up channel lost; reconnecting ({type(exc).__name__})",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # -- running SQL -----------------------------------------------------------------------------

    async def _write(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `work` in one transaction, again if the server chose it as a deadlock's victim."""
        for attempt in range(_RETRIES):
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    return await work(conn)
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                if attempt == _RETRIES - 1:
                    raise StoreError(f"write failed: {exc}") from exc
                await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
            except psycopg.Error as exc:
                raise StoreError(f"write failed: {exc}") from exc
        raise AssertionError("unreachable")

    async def _read(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            async with self._pool.connection() as conn:
                return await work(conn)
        except psycopg.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    async def _notify(self, conn: Conn) -> None:
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._instance))

    async def _incident_types(self, conn: Conn) -> dict[str, str]:
        """Each column of `incidents` with its type, as the database has it: an intake's INSERT
        passes its rows as one typed array per column, whichever columns their decisions set."""
        if self._types is None:
            rows = await self._rows(
                conn,
                "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
                " WHERE attrelid = 'incidents'::regclass AND attnum > 0 AND NOT attisdropped",
            )
            self._types = {r["attname"]: r["type"] for r in rows}
        return self._types

    @staticmethod
    async def _rows(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()

    # -- intake ----------------------------------------------------------------------------------

    async def intake(
        self,
        alert: AlertRecord,
        items: Sequence[TokenSighting],
        match_after: float,
        decide: Decide | None = None,
    ) -> list[IncidentRef]:
        """Record an alert, one incident per distinct token and a sighting per item, and apply the
        decided transitions, atomically; batched with the intakes of concurrent requests.

        Intakes queue; up to `_BATCHERS` tasks each take whatever is queued (at most
        `_MAX_BATCH`) and record it in one transaction of five statements (see `_intake_batch`),
        so that under load an alert costs a fraction of a transaction, not one of its own, while a
        lone alert goes out at once. A batch that fails is retried one intake at a time, so that
        one bad intake fails only its own request.
        """
        plan = await IntakePlan.prepare_beside_loop(items, self._sealer, self._clock(), match_after)
        future: asyncio.Future[list[IncidentRef]] = asyncio.get_running_loop().create_future()
        self._intakes.append(_Intake(alert, items, plan, decide, future))
        if self._batchers < _BATCHERS:
            self._batchers += 1
            task = asyncio.create_task(self._run_intakes(), name="store-intake")
            self._batcher_tasks.add(task)
            task.add_done_callback(self._batcher_tasks.discard)
        return await future

    async def _run_intakes(self) -> None:
        batch: list[_Intake] = []
        try:
            while self._intakes:
                batch = _next_batch(self._intakes)
                if len(batch) > 1:
                    try:
                        done = await self._write(functools.partial(self._intake_batch, batch=batch))
                    except StoreError as exc:
                        if isinstance(exc.__cause__, psycopg.OperationalError):
                            # The database is out of reach (a pool timeout among them): each
                            # intake alone would wait as long again and fail the same way.
                            for intake in batch:
                                _settle(intake.future, exc)
                            continue
                    except Exception:  # noqa: S110 - retried one at a time just below
                        pass
                    else:
                        for intake, refs in zip(batch, done, strict=True):
                            _settle(intake.future, refs)
                        continue
                for intake in batch:
                    try:
                        (refs,) = await self._write(functools.partial(self._intake_batch, batch=[intake]))
                    except Exception as exc:
                        _settle(intake.future, exc)
                    else:
                        _settle(intake.future, refs)
        finally:
            self._batchers -= 1
            for intake in batch:
                # Only if this task was cancelled mid-batch (the store closing under it).
                _settle(intake.future, StoreError("the store closed before the intake committed"))

    async def _intake_batch(self, conn: Conn, batch: Sequence[_Intake]) -> list[list[IncidentRef]]:
        """Intakes in five statements whatever their number and size.

        The first finds which of their tokens are known already (only if one of them decides).
        The second inserts the new incidents, each as its intake's `decide` leaves it, with their
        events (see `_creation`); it waits on a concurrent insert of the same token by another
        replica and then skips it, so once it has run every token has a committed or own row. The
        third, with a snapshot taken after that wait, records the alerts and their sightings and
        reads the incidents back. The fourth applies the transitions `decide` makes of the known
        incidents still in `received` (a fresh alert has none) and writes what the decided ones
        owe their channels; the fifth is the commit.

        A token in several intakes of the batch is created by the first of them, and decided by
        the first that decides it; the others see it as they would after that intake committed.
        `decide` may be asked twice about a token another replica created meanwhile: its first
        answer, made for the row this batch would have created, is dropped.
        """
        now = self._clock()
        first: dict[str, tuple[int, NewIncident]] = {}
        for n, intake in enumerate(batch):
            for digest, new in intake.plan.candidates.items():
                first.setdefault(digest, (n, new))
        # A new incident goes in as its intake's decision leaves it (see NewIncident.row), unless
        # another replica creates it first: that one is decided below, once it is read back.
        deciding = any(intake.decide is not None for intake in batch)
        known = (
            {r["token_hash"] for r in await self._rows(conn, _KNOWN, [list(first)])} if deciding else set()
        )
        decided: dict[str, tuple[int, Transition]] = {}
        for digest, (n, new) in first.items():
            decide = batch[n].decide
            if new.state is not State.RECEIVED or decide is None or digest in known:
                continue
            if (t := decide(new.ref())) is not None:
                decided[digest] = (n, t)
        born = [t for _, t in decided.values()]
        common.check_transitions(born)
        news = [
            (new, decided[new.token_hash][1] if new.token_hash in decided else None)
            for _, new in first.values()
        ]
        news.sort(key=lambda pair: pair[0].token_hash)
        events = list(
            common.events_args(
                _TEXT_JSON,
                (
                    (new.token_hash, now, *event)
                    for new, t in news
                    for event in new.events(batch[first[new.token_hash][0]].alert, t)
                ),
            )
        )
        created: set[str] = set()
        if news:
            sql, args = _creation(
                common.incident_rows(news, now, POSTGRES, self._sealer),
                await self._incident_types(conn),
                events,
            )
            created = {r["token_hash"] for r in await self._rows(conn, sql, args)}
        # Decisions whose incident another replica created are dropped: they are made again below.
        decided = {d: decision for d, decision in decided.items() if d in created}
        ours = [
            {d for d in i.plan.candidates if d in created and first[d][0] == n} for n, i in enumerate(batch)
        ]
        seen = [
            (n + 1, digest, item)
            for n, intake in enumerate(batch)
            for digest, item in intake.plan.distinct_sightings(intake.items)
        ]
        # An alert is one per (reporter, body): a replay (or two copies in one batch) keeps the first
        # row. Each input alert's id is the row it inserted (RETURNING) or, for a replay, the row
        # already there (the statement's snapshot): the batch's n-th alert is numbered n either way.
        # The earlier row is looked up per replayed alert through the replay index, which leaves
        # public reports out, so the lookup says so too: as a join (or without `<> 'public'`) the
        # planner read the whole alerts table on every batch.
        # A sighting is one per (incident, reporter, url, source): a place already seen adds nothing.
        rows = await self._rows(
            conn,
            "WITH input AS (SELECT a.*, %s::double precision AS received_at"  # noqa: S608
            " FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[], %b::int[])"
            " WITH ORDINALITY AS a (reporter, operator, body_sha256, item_count, new_incidents, n)),"
            " alert AS (INSERT INTO alerts (reporter, operator, received_at, body_sha256, item_count,"
            " new_incidents) SELECT reporter, operator, received_at, body_sha256, item_count, new_incidents"
            f" FROM input ORDER BY n {common.REPLAY_CONFLICT} RETURNING id, reporter, body_sha256),"
            " numbered AS (SELECT DISTINCT ON (input.n) input.n, COALESCE(alert.id, (SELECT min(earlier.id)"
            " FROM alerts earlier WHERE earlier.reporter = input.reporter"
            " AND earlier.body_sha256 = input.body_sha256 AND earlier.reporter <> 'public')) AS id,"
            " alert.id IS NULL AS replay FROM input"
            " LEFT JOIN alert ON alert.reporter = input.reporter AND alert.body_sha256 = input.body_sha256"
            " ORDER BY input.n, alert.id),"
            # A later part of a big alert (or its redelivery after a crash between parts) adds the
            # incidents it created to the record the first part made (see common.alert_counted).
            " counted AS (UPDATE alerts SET new_incidents = alerts.new_incidents + input.new_incidents"
            " FROM numbered JOIN input ON input.n = numbered.n WHERE numbered.replay"
            " AND alerts.id = numbered.id AND input.new_incidents > 0),"
            " seen AS (INSERT INTO sightings (incident_id, alert_id, reporter, operator, url, source,"
            " token_type, seen_at, note) SELECT i.id, numbered.id, s.reporter, s.operator, s.url,"
            " s.source, s.token_type, %s, s.note FROM unnest(%b::int[], %b::text[], %b::text[],"
            " %b::text[], %b::text[], %b::text[], %b::text[], %b::text[]) WITH ORDINALITY AS s (alert_n,"
            " token_hash, reporter, operator, url, source, token_type, note, n)"
            " JOIN numbered ON numbered.n = s.alert_n"
            + _incident_by_hash("id", "s.token_hash")
            + " ORDER BY s.n ON CONFLICT DO NOTHING)"
            " SELECT i.* FROM unnest(%b::text[]) AS h (token_hash)"
            + _incident_by_hash("id, token_hash, state, label, redacted", "h.token_hash"),
            [
                now,
                [i.alert.reporter for i in batch], [i.alert.operator for i in batch],
                [i.alert.body_sha256 for i in batch], [i.alert.item_count for i in batch],
                [len(o) for o in ours],
                now,
                [n for n, _, _ in seen], [d for _, d, _ in seen], [i.reporter for _, _, i in seen],
                [i.operator for _, _, i in seen], [i.url for _, _, i in seen],
                [i.source for _, _, i in seen], [i.token_type for _, _, i in seen],
                [i.note for _, _, i in seen],
                list(first),
            ],
        )  # fmt: skip
        by_hash = {r["token_hash"]: r for r in rows}
        results: list[dict[str, IncidentRef]] = []
        for n, intake in enumerate(batch):
            refs: dict[str, IncidentRef] = {}
            for digest, new in intake.plan.candidates.items():
                refs[digest] = new.stored(by_hash[digest], created=digest in ours[n])
            results.append(refs)
        # The new incidents' decisions are in their rows already: what remains is their channels
        # and outbox events, and the decisions of known incidents still in `received`.
        born = [t for _, t in decided.values()]
        await self._owed(conn, born, now, common.sealed_channels(born, self._sealer))
        for digest, (n, t) in decided.items():
            results[n][digest] = common.after(results[n][digest], t)
        later: dict[str, tuple[int, Transition]] = {}
        for n, intake in enumerate(batch):
            for digest, ref in results[n].items():
                if ref.state is not State.RECEIVED or digest in later or intake.decide is None:
                    continue
                if (t := intake.decide(ref)) is not None:
                    later[digest] = (n, t)
        transitions = [t for _, t in later.values()]
        common.check_transitions(transitions)
        applied = await self._apply_in(
            conn, transitions, now, common.sealed_channels(transitions, self._sealer)
        )
        for (digest, (n, t)), ok in zip(later.items(), applied, strict=True):
            # Not applied: another replica moved the incident on since the read-back; the answer
            # then shows it as read, and its label comes with a later delivery.
            if ok:
                for m, refs in enumerate(results):
                    if digest in refs:
                        refs[digest] = common.after(refs[digest], t, own=m == n)
        return [list(refs.values()) for refs in results]

    # -- work ------------------------------------------------------------------------------------

    async def claim(self, owner: str, limit: int, lease: float) -> list[Incident]:
        """Lease up to `limit` due incidents no other claim holds. An expired lease is fair game."""

        async def work(conn: Conn) -> list[Incident]:
            now = self._clock()
            rows = await self._rows(
                conn,
                "UPDATE incidents SET lease_owner = %s, lease_until = %s WHERE id IN ("
                " SELECT id FROM incidents WHERE next_run_at IS NOT NULL AND next_run_at <= %s"
                " AND (lease_until IS NULL OR lease_until < %s) ORDER BY next_run_at LIMIT %s"
                " FOR UPDATE SKIP LOCKED) RETURNING *",
                (owner, now + lease, now, now, limit),
            )
            return [common.incident_from(r) for r in rows]

        return await self._write(work)

    async def apply(self, transitions: Sequence[Transition]) -> list[bool]:
        """Apply step outcomes; each one only if its incident is still as the step found it.

        Each transition is one statement (the fenced UPDATE feeding its event's INSERT), all sent in
        one pipeline: a batch of a thousand costs about one round trip, not a thousand.
        """
        now = self._clock()
        common.check_transitions(transitions)
        if not transitions:
            return []
        channels = common.sealed_channels(transitions, self._sealer)
        return await self._write(lambda conn: self._apply_in(conn, transitions, now, channels))

    async def _apply_in(
        self,
        conn: Conn,
        transitions: Sequence[Transition],
        now: float,
        channels: dict[str, list[tuple[Any, ...]]],
    ) -> list[bool]:
        """Each transition is one statement (the fenced UPDATE feeding its event's INSERT), all sent
        in one pipeline: a batch of a thousand costs about one round trip, not a thousand. Then the
        channel rows and outbox events the applied ones owe (`channels` sealed beforehand)."""
        if not transitions:
            return []
        cursors = []
        # Pipeline mode only pays for several statements: psycopg polls the socket while it waits.
        async with conn.pipeline() if len(transitions) > 1 else contextlib.nullcontext():
            for t in transitions:
                update, args = common.fenced_update(t, POSTGRES)
                _, *event = common.event_args(POSTGRES, t.incident_id, now, t.event, t.state, t.detail)
                cur = conn.cursor()
                await cur.execute(
                    f"WITH applied AS ({update} RETURNING id) INSERT INTO events"  # noqa: S608
                    " (incident_id, at, kind, state, detail) SELECT id, %s, %s, %s, %s FROM applied",
                    [*args, *event],
                )
                cursors.append(cur)
        applied = [cur.rowcount == 1 for cur in cursors]
        await self._owed(conn, [t for t, ok in zip(transitions, applied, strict=True) if ok], now, channels)
        return applied

    async def _owed(
        self, conn: Conn, done: Sequence[Transition], now: float, channels: dict[str, list[tuple[Any, ...]]]
    ) -> None:
        """What applied transitions bring beside their rows and events: their incidents' channels
        (`channels`, sealed beforehand), the outbox events they owe them, and a notification to the
        other replicas when they made work due now."""
        async with conn.cursor() as cur:
            rows = [row for t in done for row in channels.get(t.incident_id, [])]
            if rows:
                await cur.executemany(common.channel_insert(POSTGRES), rows)
            for t in done:
                outbox = common.outbox_insert(t, now, POSTGRES)
                if outbox is not None:
                    await cur.execute(*outbox)
        if any(t.next_run_at is not None and t.next_run_at <= now for t in done):
            await self._notify(conn)

    async def release(self, owner: str) -> None:
        """Hand back every lease of a process that is shutting down, and tell the others."""

        async def work(conn: Conn) -> None:
            cur = await conn.execute(
                "UPDATE incidents SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s", (owner,)
            )
            if cur.rowcount:
                await self._notify(conn)

        await self._write(work)

    async def reclaim(self, replica: str) -> int:
        """Hand back the leases (and channel holds) of this replica's dead predecessor (a process
        that ran under the same replica id: owners are `<replica>/<incarnation>`), at once; other
        replicas' are theirs until they expire. Two live processes must never share a replica id."""

        async def work(conn: Conn) -> int:
            pattern = common.like_prefix(f"{replica}/")
            cur = await conn.execute(*common.reclaim_leases(pattern, POSTGRES))
            await conn.execute(*common.reclaim_channel_holds(pattern, self._clock(), POSTGRES))
            if cur.rowcount:
                await self._notify(conn)
            return cur.rowcount

        return await self._write(work)

    async def resume(self, state: State) -> int:
        """Schedule incidents that were parked in `state` (dry-run, or waiting for a notifier)."""

        async def work(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE incidents SET next_run_at = %s WHERE state = %s AND next_run_at IS NULL",
                (self._clock(), str(state)),
            )
            if cur.rowcount:
                await self._notify(conn)
            return cur.rowcount

        return await self._write(work)

    async def reveal_token(self, incident_id: str) -> str | None:
        """The raw token, for the probe only. None once it was wiped at close."""
        rows = await self._read(
            lambda conn: self._rows(
                conn,
                "SELECT token_sealed, token_hash, sealed_key FROM incidents WHERE id = %s",
                (incident_id,),
            )
        )
        if not rows or rows[0]["token_sealed"] is None:
            return None
        row = rows[0]
        return self._sealer.open(bytes(row["token_sealed"]), row["token_hash"], row["sealed_key"])

    async def next_due(self) -> float | None:
        rows = await self._read(
            lambda conn: self._rows(
                conn,
                "SELECT min(greatest(next_run_at, coalesce(lease_until, 0))) AS due FROM incidents"
                " WHERE next_run_at IS NOT NULL",
            )
        )
        due: float | None = rows[0]["due"]
        return due

    # -- reads -----------------------------------------------------------------------------------

    async def incidents(self, ids: Sequence[str]) -> list[Incident]:
        if not ids:
            return []
        rows = await self._read(
            lambda conn: self._rows(conn, "SELECT * FROM incidents WHERE id = ANY(%s)", [list(ids)])
        )
        by_id = {r["id"]: common.incident_from(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    async def detail(self, incident_id: str) -> IncidentDetail | None:
        async def work(conn: Conn) -> IncidentDetail | None:
            rows = await self._rows(conn, "SELECT * FROM incidents WHERE id = %s", (incident_id,))
            if not rows:
                return None
            events = await self._rows(
                conn, "SELECT * FROM events WHERE incident_id = %s ORDER BY id", (incident_id,)
            )
            sightings = await self._rows(
                conn, "SELECT * FROM sightings WHERE incident_id = %s ORDER BY id", (incident_id,)
            )
            deliveries = await self._rows(
                conn, "SELECT * FROM deliveries WHERE incident_id = %s", (incident_id,)
            )
            channels = await self._rows(conn, *common.channel_deliveries([incident_id], POSTGRES))
            return IncidentDetail(
                common.incident_from(rows[0]),
                [common.event_from(e) for e in events],
                [common.sighting_from(s) for s in sightings],
                [common.delivery_from(d) for d in deliveries],
                [common.channel_delivery_from(c) for c in channels],
            )

        return await self._read(work)

    async def list_incidents(self, where: IncidentFilter) -> list[Incident]:
        sql, args = common.incident_filter(where, POSTGRES)
        rows = await self._read(lambda conn: self._rows(conn, sql, args))
        return [common.incident_from(r) for r in rows]

    async def oldest_pending(self, limit: int) -> list[Incident]:
        sql, args = common.oldest_pending(limit, POSTGRES)
        rows = await self._read(lambda conn: self._rows(conn, sql, args))
        return [common.incident_from(r) for r in rows]

    async def percentiles(self, timed: Timed, since: float, until: float, width: float) -> list[Percentiles]:
        sql, args = common.percentiles_query(timed, since, until, width, POSTGRES)
        rows = await self._read(lambda conn: self._rows(conn, sql, args))
        return common.percentiles_from(rows, since, width)

    # -- telling owners --------------------------------------------------------------------------

    async def alert_siblings(self, incident_ids: Sequence[str]) -> dict[str, list[Incident]]:
        """For each incident, the incidents first reported by the same alert (itself included)."""
        if not incident_ids:
            return {}

        async def work(conn: Conn) -> dict[str, list[Incident]]:
            firsts = {
                r["incident_id"]: r["alert_id"]
                for r in await self._rows(
                    conn,
                    "SELECT incident_id, min(alert_id) AS alert_id FROM sightings"
                    " WHERE incident_id = ANY(%s) GROUP BY incident_id",
                    [list(incident_ids)],
                )
            }
            by_alert: dict[int, list[Incident]] = {a: [] for a in set(firsts.values())}
            rows = await self._rows(
                conn,
                "SELECT DISTINCT s.alert_id AS first_alert, i.* FROM sightings s"
                " JOIN incidents i ON i.id = s.incident_id WHERE s.alert_id = ANY(%s)"
                " AND s.alert_id = (SELECT min(alert_id) FROM sightings t WHERE t.incident_id = i.id)",
                [sorted(by_alert)],
            )
            for row in rows:
                by_alert[row["first_alert"]].append(common.incident_from(row))
            return {i: by_alert[a] for i, a in firsts.items()}

        return await self._read(work)

    async def sightings(self, incident_ids: Sequence[str]) -> dict[str, list[Sighting]]:
        if not incident_ids:
            return {}
        rows = await self._read(
            lambda conn: self._rows(
                conn,
                "SELECT * FROM sightings WHERE incident_id = ANY(%s) ORDER BY id",
                [list(incident_ids)],
            )
        )
        found: dict[str, list[Sighting]] = {i: [] for i in incident_ids}
        for row in rows:
            found[row["incident_id"]].append(common.sighting_from(row))
        return found

    async def wake(self, incident_ids: Sequence[str]) -> None:
        """Make incidents scheduled for later due now (work another step finished for them)."""
        if not incident_ids:
            return

        async def work(conn: Conn) -> None:
            now = self._clock()
            cur = await conn.execute(
                "UPDATE incidents SET next_run_at = %s WHERE id = ANY(%s) AND next_run_at > %s",
                (now, sorted(incident_ids), now),
            )
            if cur.rowcount:
                await self._notify(conn)

        await self._write(work)

    async def deliveries(self, incident_ids: Sequence[str]) -> list[Delivery]:
        if not incident_ids:
            return []
        rows = await self._read(
            lambda conn: self._rows(
                conn, "SELECT * FROM deliveries WHERE incident_id = ANY(%s)", [list(incident_ids)]
            )
        )
        return [common.delivery_from(r) for r in rows]

    async def reserve_deliveries(
        self, holder: str, recipient: str, purpose: str, incident_ids: Sequence[str], hold: float
    ) -> Reservation:
        """Hold the rows nobody else holds and nobody finished; new rows are created held.

        New rows go in with `ON CONFLICT DO NOTHING` and existing ones are locked before they are
        judged (`common.delivery_take`), so two replicas reserving the same rows never both win.
        """

        async def work(conn: Conn) -> Reservation:
            now = self._clock()
            ids = sorted(set(incident_ids))
            inserted = await self._rows(
                conn,
                "INSERT INTO deliveries (incident_id, recipient, purpose, status, holder, held_until,"
                " attempts, updated_at) SELECT i, %s, %s, %s, %s, %s, 1, %s FROM unnest(%s::text[]) AS i"
                " ORDER BY i ON CONFLICT DO NOTHING RETURNING incident_id",
                (recipient, purpose, str(DeliveryStatus.SENDING), holder, now + hold, now, ids),
            )
            taken = {r["incident_id"] for r in inserted}
            existing = await self._rows(
                conn,
                "SELECT incident_id, status, held_until FROM deliveries WHERE recipient = %s"
                " AND purpose = %s AND incident_id = ANY(%s) ORDER BY incident_id FOR UPDATE",
                (recipient, purpose, [i for i in ids if i not in taken]),
            )
            uncertain = set()
            for row in existing:
                take = common.delivery_take(DeliveryStatus(row["status"]), row["held_until"], now)
                if take is Take.LEAVE:
                    continue
                taken.add(row["incident_id"])
                if take is Take.TAKE_UNCERTAIN:
                    uncertain.add(row["incident_id"])
            retaken = [r["incident_id"] for r in existing if r["incident_id"] in taken]
            if retaken:
                await conn.execute(
                    "UPDATE deliveries SET status = %s, holder = %s, held_until = %s,"
                    " attempts = attempts + 1, updated_at = %s WHERE recipient = %s AND purpose = %s"
                    " AND incident_id = ANY(%s)",
                    (str(DeliveryStatus.SENDING), holder, now + hold, now, recipient, purpose, retaken),
                )
            return Reservation(
                [i for i in incident_ids if i in taken], [i for i in incident_ids if i in uncertain]
            )

        return await self._write(work)

    async def finish_deliveries(
        self,
        holder: str,
        recipient: str,
        purpose: str,
        incident_ids: Sequence[str],
        status: DeliveryStatus,
        message_id: str | None,
        detail: str | None,
    ) -> None:
        """Record an attempt's outcome, only on the rows this holder still holds."""

        async def work(conn: Conn) -> None:
            await conn.execute(
                "UPDATE deliveries SET status = %s, holder = NULL, held_until = NULL, message_id = %s,"
                " detail = %s, updated_at = %s WHERE incident_id = ANY(%s) AND recipient = %s"
                " AND purpose = %s AND holder = %s AND status = %s",
                (str(status), message_id, detail, self._clock(), sorted(incident_ids), recipient, purpose,
                 holder, str(DeliveryStatus.SENDING)),
            )  # fmt: skip

        await self._write(work)

    # -- the channel outbox ------------------------------------------------------------------------

    async def claim_channel_events(self, holder: str, limit: int, hold: float) -> list[ChannelJob]:
        """Due rows no other replica holds (`SKIP LOCKED`), held for `hold` seconds."""

        async def work(conn: Conn) -> list[dict[str, Any]]:
            now = self._clock()
            rows = await self._rows(
                conn, *common.channel_due(now, limit, POSTGRES, " FOR UPDATE OF e SKIP LOCKED")
            )
            async with conn.cursor() as cur:
                for row in rows:
                    await cur.execute(*common.channel_hold(holder, now + hold, now, row, POSTGRES))
            return rows

        return [common.channel_job(row, self._sealer) for row in await self._write(work)]

    async def finish_channel_event(self, holder: str, job: ChannelJob, outcome: ChannelOutcome) -> bool:
        async def work(conn: Conn) -> bool:
            now = self._clock()
            cur = await conn.execute(*common.channel_finish(holder, job, outcome, now, POSTGRES))
            if cur.rowcount != 1:
                return False
            if outcome.kind is not None:
                await conn.execute(
                    _EVENT_INSERT,
                    common.event_args(POSTGRES, job.incident_id, now, outcome.kind, None, outcome.detail),
                )
            if outcome.status is ChannelStatus.GONE:
                for statement in common.channel_stop(job, now, outcome.reason or "", POSTGRES):
                    await conn.execute(*statement)
            return True

        return await self._write(work)

    async def next_channel_due(self) -> float | None:
        rows = await self._read(
            lambda conn: self._rows(
                conn,
                "SELECT min(next_attempt_at) AS due FROM channel_events WHERE next_attempt_at IS NOT NULL",
            )
        )
        due: float | None = rows[0]["due"]
        return due

    # -- Idempotency-Key ---------------------------------------------------------------------------

    async def begin_idempotent(
        self, operator: str, key: str, fingerprint: str, ttl: float, stale_after: float
    ) -> IdempotentRequest | None:
        """Claim `key` for a new request (None), or return what the earlier request left.

        The claim is an insert that either wins or meets the existing row, which is then locked and
        judged (`common.idempotent_earlier`): two replicas racing on one key never both run it.
        """

        async def work(conn: Conn) -> IdempotentRequest | None:
            now = self._clock()
            await conn.execute("DELETE FROM idempotency WHERE expires_at < %s", (now,))
            inserted = await self._rows(
                conn,
                "INSERT INTO idempotency (operator, key, fingerprint, state, started_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING key",
                (operator, key, fingerprint, str(IdempotencyState.RUNNING), now, now + ttl),
            )
            if inserted:
                return None
            (row,) = await self._rows(
                conn, "SELECT * FROM idempotency WHERE operator = %s AND key = %s FOR UPDATE", (operator, key)
            )
            earlier = common.idempotent_earlier(row, now, stale_after)
            if earlier is None:
                await conn.execute(
                    "UPDATE idempotency SET fingerprint = %s, state = %s, status = NULL, response = NULL,"
                    " started_at = %s, expires_at = %s WHERE operator = %s AND key = %s",
                    (fingerprint, str(IdempotencyState.RUNNING), now, now + ttl, operator, key),
                )
            return earlier

        return await self._write(work)

    async def finish_idempotent(self, operator: str, key: str, status: int, response: bytes) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(
                "UPDATE idempotency SET state = %s, status = %s, response = %s WHERE operator = %s"
                " AND key = %s",
                (str(IdempotencyState.DONE), status, response, operator, key),
            )

        await self._write(work)

    async def drop_idempotent(self, operator: str, key: str) -> None:
        """Forget a claim whose request failed on our side, so that its retry runs afresh."""

        async def work(conn: Conn) -> None:
            await conn.execute("DELETE FROM idempotency WHERE operator = %s AND key = %s", (operator, key))

        await self._write(work)

    # -- rate limits -----------------------------------------------------------------------------

    async def take_rates(self, buckets: Sequence[RateBucket]) -> RateRefusal | None:
        """One row per bucket, locked for the decision (`common.take_rates`), so that replicas taking
        from the same bucket at once queue on its row instead of both seeing room that is not there.
        Rows are locked in key order, so two requests sharing two buckets cannot deadlock."""
        now = self._clock()
        keys = sorted({b.key for b in buckets})

        async def work(conn: Conn) -> RateRefusal | None:
            await conn.execute(
                "INSERT INTO rate_buckets (key, tat) SELECT unnest(%s::text[]), 0 ON CONFLICT DO NOTHING",
                (keys,),
            )
            rows = await self._rows(
                conn, "SELECT key, tat FROM rate_buckets WHERE key = ANY(%s) ORDER BY key FOR UPDATE", (keys,)
            )
            taken, refusal = common.take_rates({r["key"]: r["tat"] for r in rows}, buckets, now)
            if taken:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "UPDATE rate_buckets SET tat = %s WHERE key = %s", [(t, k) for k, t in taken.items()]
                    )
            return refusal

        refusal = await self._write(work)
        if now - self._rates_pruned >= _RATES_PRUNE_EVERY:
            # Full buckets are the same as none: rows go once idle for their period, a hash with them.
            self._rates_pruned = now
            await self._write(lambda conn: conn.execute("DELETE FROM rate_buckets WHERE tat < %s", (now,)))
        return refusal

    # -- housekeeping --------------------------------------------------------------------------

    async def purge_reporter_metadata(self, finished_before: float) -> int:
        """Forget sighting URLs of incidents long over (see `common.purge_candidates`), each purge
        an audit event; expired Idempotency-Key records go in the same sweep."""

        async def work(conn: Conn) -> int:
            now = self._clock()
            sql, args = common.purge_candidates(finished_before, POSTGRES)
            ids = [r["incident_id"] for r in await self._rows(conn, sql, args)]
            for incident_id in ids:
                forgotten = 0
                for sql in common.purge_sightings(POSTGRES):
                    forgotten += (await conn.execute(sql, (incident_id,))).rowcount
                detail = {"sightings": forgotten}
                await conn.execute(
                    _EVENT_INSERT,
                    common.event_args(POSTGRES, incident_id, now, "reporter_metadata_purged", None, detail),
                )
            await conn.execute("DELETE FROM idempotency WHERE expires_at < %s", (now,))
            return len(ids)

        return await self._write(work)

    # -- data keys -------------------------------------------------------------------------------

    async def check_keys(self) -> None:
        """SealingError unless the configured keys open what the store holds (`common.check_samples`)."""
        samples = await self._read(lambda conn: self._rows(conn, common.SEALED_SAMPLES))
        common.check_samples(samples, self._sealer)

    async def rewrap(self, batch: int = 500) -> RewrapReport:
        """Reseal every token under the current data key, a batch per transaction (so an interrupted
        run keeps what it did; replicas may serve meanwhile, and a row they wipe is left alone)."""
        report = RewrapReport()
        for kind in common.REWRAPS:
            after = kind.start
            while True:
                sql, args = kind.batch(after, batch, self._sealer, POSTGRES)

                async def read(conn: Conn, sql: str = sql, args: list[Any] = args) -> list[dict[str, Any]]:
                    return await self._rows(conn, sql, args)

                rows = await self._read(read)
                if not rows:
                    break
                after = kind.cursor(rows[-1])
                updates = kind.reseal(rows, self._sealer, report)

                async def work(
                    conn: Conn, updates: list[tuple[Any, ...]] = updates, sql: str = kind.update(POSTGRES)
                ) -> int:
                    async with conn.cursor() as cur:
                        await cur.executemany(sql, updates)
                        return cur.rowcount

                report.resealed += await self._write(work)
        return report

    async def stats(self) -> StoreStats:
        async def work(conn: Conn) -> StoreStats:
            now = self._clock()
            by_state = {
                r["state"]: r["n"]
                for r in await self._rows(conn, "SELECT state, count(*) AS n FROM incidents GROUP BY state")
            }
            (row,) = await self._rows(
                conn,
                "SELECT count(*) FILTER (WHERE state NOT IN (%s, %s)) AS pending,"
                " min(created_at) FILTER (WHERE state NOT IN (%s, %s)) AS oldest,"
                " count(*) FILTER (WHERE next_run_at IS NOT NULL AND next_run_at <= %s) AS due"
                " FROM incidents",
                (str(State.CLOSED), str(State.FALSE_POSITIVE)) * 2 + (now,),
            )
            oldest = row["oldest"]
            return StoreStats(by_state, row["pending"], 0.0 if oldest is None else now - oldest, row["due"])

        return await self._read(work)
