"""The embedded store: one SQLite file in WAL mode, every commit fsynced before it is answered.

A 2xx to a reporter promises the alert survives a power cut, so every commit is fsynced. That would
cap throughput at one fsync per request, so writes go through a single writer thread that groups
whatever is queued into one transaction (group commit): under load many requests share one fsync,
and a lone request still commits at once. The intakes of a group write their rows together (see
`_Batch`). One failing write does not undo its neighbours (see `_run_group`). Reads use a second
connection (WAL lets them run beside the writer) and never see uncommitted work.

The fsync is SQLite's `synchronous=FULL` moved to a thread of its own. FULL fsyncs the `-wal` file
inside every COMMIT, so the writer could not run the next group's statements during the fsync (a
few milliseconds, twelve at this disk's p99): requests queued behind it waited for both. Here the
writer's connection commits with `synchronous=NORMAL` (the frames are written to the `-wal`, not
yet fsynced; checkpoints and the WAL's header are still fsynced by SQLite) and hands the committed
group to the syncer thread, which fsyncs the `-wal` through a descriptor of its own and only then
answers the group's writers: nothing is answered, and nothing a caller does follows a write,
before its commit is on disk, as under FULL. One fsync covers every group committed before it, so
groups committed during a slow fsync share the next one. A read on the second connection can see
a commit up to one fsync before it is durable; no answer to a partner and no step of the pipeline
follows a read alone (each starts from a write: an intake, a claim).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.reasons import Reason
from service.store import common
from service.store.base import FailureHook, StoreError, ignore_failure
from service.store.common import Dialect, IntakePlan, RewrapReport, Take
from service.store.migrations import migrate_sqlite
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
from service.store.walindex import WalIndexGuard

_MAX_GROUP = 512
_RATES_PRUNE_EVERY = 60.0
# Pages of WAL after which a commit checkpoints it (SQLite's default), and how many bulky writes
# in a row may commit without that (see `_write_loop`).
_AUTOCHECKPOINT = 1000
_DEFERRED_CHECKPOINTS = 16
# Hashes per `IN (...)` lookup: well under SQLite's limit on host parameters.
_IN_CHUNK = 500

T = TypeVar("T")
# A write for the writer thread: the work, its caller's future, whether it is bulky.
_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]", bool]
# A committed group waiting for the syncer's fsync: its writes and their outcomes.
_Committed = tuple[list[_Job], list[tuple[bool, Any]]]

SQLITE = Dialect(mark="?", json=common.dumps)
# How long a connection waits for another's lock before giving up.
SQLITE_BUSY_MS = 30000


class SqliteStore:
    """One process owns the file: `open` takes an exclusive lock on `<file>.lock` (a second process
    refuses to start), so every lease it finds there belongs to a dead predecessor and is taken
    back at once instead of being waited out."""

    def __init__(
        self,
        path: Path,
        sealer: Sealer,
        clock: Callable[[], float] = time.time,
        on_failure: FailureHook = ignore_failure,
    ) -> None:
        self._path = path
        self._sealer = sealer
        self._clock = clock
        self._on_failure = on_failure
        self._lock_fd: int | None = None
        # The migrations the last `open` applied, for `leak-responder migrate` to report.
        self.migrated: list[str] = []
        # Writes are handed to the writer thread once per turn of the event loop, all the writes
        # that turn queued in one hand-over (see `_write`).
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._handing: list[_Job] = []
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._index: WalIndexGuard | None = None
        self._index_lost = False
        # Why the WAL could not be fsynced, once it could not: no write is answered after that.
        self._sync_failed: str | None = None
        # Rate buckets: one process owns a SQLite store, so they live in its memory, never on disk.
        self._rates: dict[str, float] = {}
        self._rates_pruned = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock, migrate, take back a dead predecessor's leases, and check the data keys."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._writer = threading.Thread(
                target=self._write_loop, args=(ready,), name="store-writer", daemon=True
            )
            self._writer.start()
            await ready
            self._index = WalIndexGuard(self._path)
            self._reader = self._connect()
            self._reader.execute("PRAGMA query_only = ON")
            await self.check_keys()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._hand_over()
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        lock_path = Path(f"{self._path}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreError(
                f"another process (pid {holder or '?'}) has {self._path} open; one process owns a"
                " SQLite store (use PostgreSQL for several replicas)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30, cached_statements=512
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        return conn

    def _cannot_open(self, exc: Exception) -> str:
        """Why the store cannot be opened, naming the file and, for SQLite's own refusals (a read-only
        directory or -shm file, a full disk), its error code and what the process needs."""
        name = getattr(exc, "sqlite_errorname", None)
        if name is None:
            return f"cannot open store {self._path}: {exc}"
        return (
            f"cannot open store {self._path}: {exc} ({name}); the process must be able to write the"
            " database, its directory and the -wal and -shm files beside it, on a volume with room"
        )

    # -- the writer thread -----------------------------------------------------------------------

    def _write_loop(self, ready: asyncio.Future[None]) -> None:
        loop = ready.get_loop()
        try:
            conn = self._connect()
            self.migrated = [m.label for m in migrate_sqlite(conn)]
            # The lock is ours, so any lease here is a dead predecessor's: its work runs now.
            conn.execute(*common.reclaim_leases("%", SQLITE))
            conn.execute(*common.reclaim_channel_holds("%", self._clock(), SQLITE))
            # Everything above was committed under FULL. From here on the syncer fsyncs the WAL
            # after each commit (see the module's docstring); SQLite keeps one WAL file for the
            # connection's lifetime, and the descriptor below is to that file.
            wal = os.open(f"{self._path}-wal", os.O_RDONLY)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT}")
        except Exception as exc:
            loop.call_soon_threadsafe(ready.set_exception, StoreError(self._cannot_open(exc)))
            return
        committed: queue.SimpleQueue[_Committed | None] = queue.SimpleQueue()
        syncer = threading.Thread(
            target=self._sync_loop, args=(committed, wal), name="store-syncer", daemon=True
        )
        syncer.start()
        loop.call_soon_threadsafe(ready.set_result, None)
        # Bulky writes (a big alert's parts) wait here for their own transaction: whatever else is
        # queued goes first, grouped as ever, then one bulky write, and so on in turn; so a small
        # alert waits for at most one part of a big one, and the big one for one group at a time.
        bulky: collections.deque[_Job] = collections.deque()
        # Handed over and not yet in a group (a hand-over may hold more than a group takes).
        handed: collections.deque[_Job] = collections.deque()
        closing = False
        # Bulky writes commit without SQLite's automatic checkpoint (copying the WAL's pages into
        # the database, and fsyncing it), for at most `_DEFERRED_CHECKPOINTS` in a row: a big
        # alert's parts grow the WAL by thousands of pages, which the checkpoint in a part's
        # COMMIT copied every thousand, the same index pages again each time, and its answer
        # waited for each copy. The next group's commit checkpoints it all at once.
        deferred = 0
        while True:
            group: list[_Job] = []
            while len(group) < _MAX_GROUP and not closing:
                if not handed:
                    try:
                        jobs = self._queue.get(block=not group and not bulky)
                    except queue.Empty:
                        break
                    if jobs is None:
                        closing = True
                        break
                    handed.extend(jobs)
                job = handed.popleft()
                if job[2]:
                    bulky.append(job)
                else:
                    group.append(job)
            if group:
                deferred = _checkpoints(conn, deferred, bulky=False)
                self._commit_group(conn, group, committed)
            if bulky:
                deferred = _checkpoints(conn, deferred, bulky=True)
                self._commit_group(conn, [bulky.popleft()], committed)
            elif closing and not group:
                break
        committed.put(None)
        syncer.join()
        conn.close()
        os.close(wal)

    def _commit_group(
        self, conn: sqlite3.Connection, group: list[_Job], committed: queue.SimpleQueue[_Committed | None]
    ) -> None:
        """Commit the group and hand it to the syncer; a group that failed is answered at once."""
        if self._sync_failed is not None:
            _hand_back([_refused(group, self._sync_failed)])
            return
        try:
            self._check_index(restore=True)
            tried = _run_group(conn, group, isolated=False)
            if tried is None:
                # One of the writes failed: all undone, then run again, each in its own savepoint,
                # so that only the failing one fails.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                tried = _run_group(conn, group, isolated=True)
                assert tried is not None  # isolated, a failure is an outcome
            conn.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._on_failure(Reason.STORE_COMMIT_FAILED, f"store commit failed: {exc}")
            _hand_back([_refused(group, exc)])
            return
        committed.put((group, tried))

    def _sync_loop(self, committed: queue.SimpleQueue[_Committed | None], wal: int) -> None:
        """Fsync the WAL for every group committed so far, then answer their writers; until the
        writer says it is done (None, after its last group)."""
        closing = False
        while not closing:
            batch: list[_Committed] = []
            item = committed.get()
            while item is not None:
                batch.append(item)
                try:
                    item = committed.get_nowait()
                except queue.Empty:
                    break
            closing = item is None
            if not batch:
                continue
            if self._sync_failed is None:
                try:
                    os.fsync(wal)
                except OSError as exc:
                    # Committed but perhaps not on disk, and a later commit's frames would sit
                    # behind these in the WAL, which recovery reads in order: nothing more is
                    # answered until the process restarts and SQLite recovers what the file
                    # holds (as PostgreSQL stops at a failed fsync). The senders retry, and a
                    # redelivery finds what did reach the file (an intake is safe to run again).
                    self._sync_failed = f"fsync of the WAL failed: {exc}"
                    self._on_failure(Reason.STORE_COMMIT_FAILED, f"store commit failed: {self._sync_failed}")
            if self._sync_failed is not None:
                batch = [_refused(group, self._sync_failed) for group, _ in batch]
            _hand_back(batch)

    def _check_index(self, restore: bool = False) -> None:
        """StoreError while SQLite's WAL index cannot be used safely (see `WalIndexGuard`), reported
        once per episode. The writer thread, between transactions, passes `restore`: holding the
        reader too, it gives a shrunk index its size back for SQLite to rebuild, and goes on."""
        if self._index is None:
            return  # opening: no transaction but the writer's own migrations yet
        try:
            self._index.check()
        except StoreError as exc:
            if not self._index_lost:
                self._on_failure(Reason.STORE_INDEX_LOST, str(exc))
            self._index_lost = True
            if not restore:
                raise
            with self._read_lock:
                if not self._index.restore():
                    raise
            self._index.check()
        self._index_lost = False

    async def _write(self, work: Callable[[sqlite3.Connection], T], bulky: bool = False) -> T:
        """`work` committed by the writer thread; a `bulky` one in a transaction of its own, after
        the writes queued beside it (see `_write_loop`)."""
        if self._writer is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._handing.append((work, future, bulky))
        if len(self._handing) == 1:
            loop.call_soon(self._hand_over)
        try:
            return await future
        except sqlite3.Error as exc:
            raise StoreError(f"write failed: {exc}") from exc

    def _hand_over(self) -> None:
        """The writes queued since the last hand-over, to the writer thread at once. Under load a
        turn of the event loop resumes dozens of requests that each queue their intake; handed
        over one by one, each woke the writer thread (a system call, and a thread that then
        takes the interpreter lock from the event loop for a write or two); once per turn, the
        writer wakes once and finds them all."""
        if self._handing:
            self._queue.put(self._handing)
            self._handing = []

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._reader is None:
                raise StoreError("store is not open")
            with self._read_lock:
                self._check_index()
                return work(self._reader)

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    async def _rows(self, sql: str, args: Sequence[Any]) -> list[common.Row]:
        def work(conn: sqlite3.Connection) -> list[common.Row]:
            return conn.execute(sql, args).fetchall()

        return await self._read(work)

    # -- intake ----------------------------------------------------------------------------------

    async def intake(
        self,
        alert: AlertRecord,
        items: Sequence[TokenSighting],
        match_after: float,
        decide: Decide | None = None,
    ) -> list[IncidentRef]:
        """Record an alert, one incident per distinct token and a sighting per item, atomically.

        A token already known adds a sighting only (see `common.IntakePlan` for what a new one is).
        Decided transitions are applied in the same transaction (one writer: nothing can move an
        incident between this read of it and that write).
        """
        now = self._clock()
        plan = await IntakePlan.prepare_beside_loop(items, self._sealer, now, match_after)
        work = _Intake(alert, items, plan, decide, now, self._sealer)
        return await self._write(work, bulky=len(plan.candidates) > common.OFFLOAD_ITEMS)

    # -- work ------------------------------------------------------------------------------------

    async def claim(self, owner: str, limit: int, lease: float) -> list[Incident]:
        """Lease up to `limit` due incidents. An expired lease is fair game: its holder died."""

        def work(conn: sqlite3.Connection) -> list[Incident]:
            now = self._clock()
            rows = conn.execute(
                "UPDATE incidents SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM incidents WHERE next_run_at IS NOT NULL AND next_run_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_run_at LIMIT ?)"
                " RETURNING *",
                (owner, now + lease, now, now, limit),
            ).fetchall()
            return [common.incident_from(r) for r in rows]

        return await self._write(work)

    async def apply(self, transitions: Sequence[Transition]) -> list[bool]:
        """Apply step outcomes; each one only if its incident is still as the step found it."""
        now = self._clock()
        common.check_transitions(transitions)
        channels = common.sealed_channels(transitions, self._sealer)

        def work(conn: sqlite3.Connection) -> list[bool]:
            return [_apply_one(conn, t, now, channels.get(t.incident_id, [])) for t in transitions]

        return await self._write(work)

    async def release(self, owner: str) -> None:
        """Hand back every lease of a process that is shutting down, so others need not wait them out."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE incidents SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)
            )

        await self._write(work)

    async def reclaim(self, replica: str) -> int:
        """Nothing left to take back: `open` took every lease and channel hold, as the lock makes
        them all a dead predecessor's."""
        return 0

    async def resume(self, state: State) -> int:
        """Schedule incidents that were parked in `state` (dry-run, or waiting for a notifier)."""

        def work(conn: sqlite3.Connection) -> int:
            now = self._clock()
            cur = conn.execute(
                "UPDATE incidents SET next_run_at = ? WHERE state = ? AND next_run_at IS NULL", (now, state)
            )
            return cur.rowcount

        return await self._write(work)

    async def reveal_token(self, incident_id: str) -> str | None:
        """The raw token, for the probe only. None once it was wiped at close."""

        def work(conn: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = conn.execute(
                "SELECT token_sealed, token_hash, sealed_key FROM incidents WHERE id = ?", (incident_id,)
            ).fetchone()
            return row

        row = await self._read(work)
        if row is None or row["token_sealed"] is None:
            return None
        return self._sealer.open(row["token_sealed"], row["token_hash"], row["sealed_key"])

    async def next_due(self) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            due: float | None
            (due,) = conn.execute(
                "SELECT min(max(next_run_at, coalesce(lease_until, 0))) FROM incidents"
                " WHERE next_run_at IS NOT NULL"
            ).fetchone()
            return due

        return await self._read(work)

    # -- reads -----------------------------------------------------------------------------------

    async def incidents(self, ids: Sequence[str]) -> list[Incident]:
        def work(conn: sqlite3.Connection) -> list[Incident]:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(f"SELECT * FROM incidents WHERE id IN ({marks})", list(ids)).fetchall()  # noqa: S608
            by_id = {r["id"]: common.incident_from(r) for r in rows}
            return [by_id[i] for i in ids if i in by_id]

        return await self._read(work) if ids else []

    async def detail(self, incident_id: str) -> IncidentDetail | None:
        def work(conn: sqlite3.Connection) -> IncidentDetail | None:
            row = conn.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            if row is None:
                return None
            events = [
                common.event_from(e)
                for e in conn.execute(
                    "SELECT * FROM events WHERE incident_id = ? ORDER BY id", (incident_id,)
                )
            ]
            sightings = [
                common.sighting_from(s)
                for s in conn.execute(
                    "SELECT * FROM sightings WHERE incident_id = ? ORDER BY id", (incident_id,)
                )
            ]
            deliveries = [
                common.delivery_from(d)
                for d in conn.execute("SELECT * FROM deliveries WHERE incident_id = ?", (incident_id,))
            ]
            channels = [
                common.channel_delivery_from(c)
                for c in conn.execute(*common.channel_deliveries([incident_id], SQLITE))
            ]
            return IncidentDetail(common.incident_from(row), events, sightings, deliveries, channels)

        return await self._read(work)

    async def list_incidents(self, where: IncidentFilter) -> list[Incident]:
        sql, args = common.incident_filter(where, SQLITE)
        return await self._read(lambda conn: [common.incident_from(r) for r in conn.execute(sql, args)])

    async def oldest_pending(self, limit: int) -> list[Incident]:
        sql, args = common.oldest_pending(limit, SQLITE)
        return await self._read(lambda conn: [common.incident_from(r) for r in conn.execute(sql, args)])

    async def percentiles(self, timed: Timed, since: float, until: float, width: float) -> list[Percentiles]:
        sql, args = common.percentiles_query(timed, since, until, width, SQLITE)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return common.percentiles_from(rows, since, width)

    # -- telling owners --------------------------------------------------------------------------

    async def alert_siblings(self, incident_ids: Sequence[str]) -> dict[str, list[Incident]]:
        """For each incident, the incidents first reported by the same alert (itself included).

        The first alert only: a redelivery or a later report must not pull an incident into a
        group that was already told about it.
        """

        def work(conn: sqlite3.Connection) -> dict[str, list[Incident]]:
            marks = ",".join("?" * len(incident_ids))
            firsts = {
                r["incident_id"]: r["alert_id"]
                for r in conn.execute(
                    f"SELECT incident_id, min(alert_id) AS alert_id FROM sightings"  # noqa: S608
                    f" WHERE incident_id IN ({marks}) GROUP BY incident_id",
                    list(incident_ids),
                )
            }
            alerts = sorted(set(firsts.values()))
            by_alert: dict[int, list[Incident]] = {a: [] for a in alerts}
            alert_marks = ",".join("?" * len(alerts))
            rows = conn.execute(
                f"SELECT DISTINCT s.alert_id AS first_alert, i.* FROM sightings s"  # noqa: S608
                f" JOIN incidents i ON i.id = s.incident_id WHERE s.alert_id IN ({alert_marks})"
                " AND s.alert_id = (SELECT min(alert_id) FROM sightings t WHERE t.incident_id = i.id)",
                alerts,
            )
            for row in rows:
                by_alert[row["first_alert"]].append(common.incident_from(row))
            return {i: by_alert[a] for i, a in firsts.items()}

        return await self._read(work) if incident_ids else {}

    async def sightings(self, incident_ids: Sequence[str]) -> dict[str, list[Sighting]]:
        def work(conn: sqlite3.Connection) -> dict[str, list[Sighting]]:
            found: dict[str, list[Sighting]] = {i: [] for i in incident_ids}
            marks = ",".join("?" * len(incident_ids))
            for s in conn.execute(
                f"SELECT * FROM sightings WHERE incident_id IN ({marks}) ORDER BY id",  # noqa: S608
                list(incident_ids),
            ):
                found[s["incident_id"]].append(common.sighting_from(s))
            return found

        return await self._read(work) if incident_ids else {}

    async def wake(self, incident_ids: Sequence[str]) -> None:
        """Make incidents scheduled for later due now (work another step finished for them)."""

        def work(conn: sqlite3.Connection) -> None:
            now = self._clock()
            marks = ",".join("?" * len(incident_ids))
            conn.execute(
                f"UPDATE incidents SET next_run_at = ? WHERE id IN ({marks}) AND next_run_at > ?",  # noqa: S608
                [now, *incident_ids, now],
            )

        if incident_ids:
            await self._write(work)

    async def deliveries(self, incident_ids: Sequence[str]) -> list[Delivery]:
        def work(conn: sqlite3.Connection) -> list[Delivery]:
            marks = ",".join("?" * len(incident_ids))
            rows = conn.execute(
                f"SELECT * FROM deliveries WHERE incident_id IN ({marks})",  # noqa: S608
                list(incident_ids),
            )
            return [common.delivery_from(r) for r in rows]

        return await self._read(work) if incident_ids else []

    async def reserve_deliveries(
        self, holder: str, recipient: str, purpose: str, incident_ids: Sequence[str], hold: float
    ) -> Reservation:
        """Hold the rows nobody else holds and nobody finished; new rows are created held.

        A row whose holder's time ran out while `sending` is taken over and reported as uncertain:
        its sender died somewhere between handing the message over and recording that it had.
        """

        def work(conn: sqlite3.Connection) -> Reservation:
            now = self._clock()
            taken, uncertain = [], []
            for incident_id in incident_ids:
                row = conn.execute(
                    "SELECT status, held_until FROM deliveries WHERE incident_id = ? AND recipient = ?"
                    " AND purpose = ?",
                    (incident_id, recipient, purpose),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO deliveries (incident_id, recipient, purpose, status, holder, held_until,"
                        " attempts, updated_at) VALUES (?,?,?,?,?,?,1,?)",
                        (incident_id, recipient, purpose, DeliveryStatus.SENDING, holder, now + hold, now),
                    )
                    taken.append(incident_id)
                    continue
                take = common.delivery_take(DeliveryStatus(row["status"]), row["held_until"], now)
                if take is Take.LEAVE:
                    continue
                conn.execute(
                    "UPDATE deliveries SET status = ?, holder = ?, held_until = ?, attempts = attempts + 1,"
                    " updated_at = ? WHERE incident_id = ? AND recipient = ? AND purpose = ?",
                    (DeliveryStatus.SENDING, holder, now + hold, now, incident_id, recipient, purpose),
                )
                taken.append(incident_id)
                if take is Take.TAKE_UNCERTAIN:
                    uncertain.append(incident_id)
            return Reservation(taken, uncertain)

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

        def work(conn: sqlite3.Connection) -> None:
            now = self._clock()
            conn.executemany(
                "UPDATE deliveries SET status = ?, holder = NULL, held_until = NULL, message_id = ?,"
                " detail = ?, updated_at = ? WHERE incident_id = ? AND recipient = ? AND purpose = ?"
                " AND holder = ? AND status = ?",
                [
                    (status, message_id, detail, now, i, recipient, purpose, holder, DeliveryStatus.SENDING)
                    for i in incident_ids
                ],
            )

        await self._write(work)

    # -- the channel outbox ------------------------------------------------------------------------

    async def claim_channel_events(self, holder: str, limit: int, hold: float) -> list[ChannelJob]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            now = self._clock()
            rows = conn.execute(*common.channel_due(now, limit, SQLITE)).fetchall()
            for row in rows:
                conn.execute(*common.channel_hold(holder, now + hold, now, row, SQLITE))
            return rows

        return [common.channel_job(row, self._sealer) for row in await self._write(work)]

    async def finish_channel_event(self, holder: str, job: ChannelJob, outcome: ChannelOutcome) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            if conn.execute(*common.channel_finish(holder, job, outcome, now, SQLITE)).rowcount != 1:
                return False
            if outcome.kind is not None:
                _event(conn, job.incident_id, now, outcome.kind, None, outcome.detail)
            if outcome.status is ChannelStatus.GONE:
                for statement in common.channel_stop(job, now, outcome.reason or "", SQLITE):
                    conn.execute(*statement)
            return True

        return await self._write(work)

    async def next_channel_due(self) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            due: float | None
            (due,) = conn.execute(
                "SELECT min(next_attempt_at) FROM channel_events WHERE next_attempt_at IS NOT NULL"
            ).fetchone()
            return due

        return await self._read(work)

    # -- Idempotency-Key ---------------------------------------------------------------------------

    async def begin_idempotent(
        self, operator: str, key: str, fingerprint: str, ttl: float, stale_after: float
    ) -> IdempotentRequest | None:
        """Claim `key` for a new request (None), or return what the earlier request left.

        A claim that is still running after `stale_after` seconds belongs to a process that died
        mid-request; it is taken over rather than answering 409 until it expires. Expired keys of
        everyone are swept here too: it is the one place keys are written.
        """

        def work(conn: sqlite3.Connection) -> IdempotentRequest | None:
            now = self._clock()
            conn.execute("DELETE FROM idempotency WHERE expires_at < ?", (now,))
            row = conn.execute(
                "SELECT * FROM idempotency WHERE operator = ? AND key = ?", (operator, key)
            ).fetchone()
            if row is not None and (earlier := common.idempotent_earlier(row, now, stale_after)) is not None:
                return earlier
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (operator, key, fingerprint, state, started_at,"
                " expires_at) VALUES (?,?,?,?,?,?)",
                (operator, key, fingerprint, IdempotencyState.RUNNING, now, now + ttl),
            )
            return None

        return await self._write(work)

    async def finish_idempotent(self, operator: str, key: str, status: int, response: bytes) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE idempotency SET state = ?, status = ?, response = ? WHERE operator = ? AND key = ?",
                (IdempotencyState.DONE, status, response, operator, key),
            )

        await self._write(work)

    async def drop_idempotent(self, operator: str, key: str) -> None:
        """Forget a claim whose request failed on our side, so that its retry runs afresh."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM idempotency WHERE operator = ? AND key = ?", (operator, key))

        await self._write(work)

    # -- housekeeping --------------------------------------------------------------------------

    async def purge_reporter_metadata(self, finished_before: float) -> int:
        """Forget where tokens were seen (sighting URLs) once their incident has long been over.

        GitHub's partner agreement asks for this 30 days after closing; a false positive is over
        from the moment it is labelled. Each purge is itself an audit event. Expired
        Idempotency-Key records go in the same sweep.
        """

        def work(conn: sqlite3.Connection) -> int:
            now = self._clock()
            sql, args = common.purge_candidates(finished_before, SQLITE)
            ids = [r[0] for r in conn.execute(sql, args)]
            for incident_id in ids:
                forgotten = sum(
                    conn.execute(sql, (incident_id,)).rowcount for sql in common.purge_sightings(SQLITE)
                )
                _event(conn, incident_id, now, "reporter_metadata_purged", None, {"sightings": forgotten})
            conn.execute("DELETE FROM idempotency WHERE expires_at < ?", (now,))
            return len(ids)

        return await self._write(work)

    async def stats(self) -> StoreStats:
        def work(conn: sqlite3.Connection) -> StoreStats:
            now = self._clock()
            by_state = {
                r[0]: r[1] for r in conn.execute("SELECT state, count(*) FROM incidents GROUP BY state")
            }
            pending, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM incidents WHERE state NOT IN (?, ?)",
                (State.CLOSED, State.FALSE_POSITIVE),
            ).fetchone()
            due = conn.execute(
                "SELECT count(*) FROM incidents WHERE next_run_at IS NOT NULL AND next_run_at <= ?", (now,)
            ).fetchone()[0]
            return StoreStats(by_state, pending, 0.0 if oldest is None else now - oldest, due)

        return await self._read(work)

    # -- data keys -------------------------------------------------------------------------------

    async def check_keys(self) -> None:
        """SealingError unless the configured keys open what the store holds (`common.check_samples`)."""
        common.check_samples(await self._rows(common.SEALED_SAMPLES, []), self._sealer)

    async def rewrap(self, batch: int = 500) -> RewrapReport:
        """Reseal every token under the current data key, a batch per transaction (so an interrupted
        run keeps what it did, and the next run goes on from there)."""
        report = RewrapReport()
        for kind in common.REWRAPS:
            after = kind.start
            while rows := await self._rows(*kind.batch(after, batch, self._sealer, SQLITE)):
                after = kind.cursor(rows[-1])
                updates = kind.reseal(rows, self._sealer, report)

                def work(
                    conn: sqlite3.Connection,
                    updates: list[tuple[Any, ...]] = updates,
                    sql: str = kind.update(SQLITE),
                ) -> int:
                    return sum(conn.execute(sql, u).rowcount for u in updates)

                report.resealed += await self._write(work)
        return report

    async def take_rates(self, buckets: Sequence[RateBucket]) -> RateRefusal | None:
        """In memory, on the event loop's thread (no await between reading and writing a bucket)."""
        now = self._clock()
        if now - self._rates_pruned >= _RATES_PRUNE_EVERY:
            # A bucket whose time has passed is full again: the same as no bucket at all.
            self._rates = {key: tat for key, tat in self._rates.items() if tat > now}
            self._rates_pruned = now
        taken, refusal = common.take_rates(self._rates, buckets, now)
        self._rates.update(taken)
        return refusal

    async def ping(self) -> None:
        """A commit through the writer, grouped with the alerts' own: readiness follows commits."""
        await self._write(lambda conn: conn.execute(common.heartbeat(SQLITE), (self._clock(),)))

    async def pending_migrations(self) -> list[str]:
        """None: `open` migrates (one process owns the file, so nothing can race it)."""
        return []

    async def watch(self, wake: Callable[[], None]) -> None:
        """Nothing to watch: one process, whose commits wake its worker in-process."""


def _checkpoints(conn: sqlite3.Connection, deferred: int, bulky: bool) -> int:
    """Turn the writer's automatic checkpoint off for a bulky write, unless `deferred` bulky
    writes in a row went without it already, and back on for any other; the bulky writes in a row
    without it so far."""
    defer = bulky and deferred < _DEFERRED_CHECKPOINTS
    if defer != (deferred > 0):
        conn.execute(f"PRAGMA wal_autocheckpoint = {0 if defer else _AUTOCHECKPOINT}")
    return deferred + 1 if defer else 0


def _run_group(conn: sqlite3.Connection, group: list[_Job], isolated: bool) -> list[tuple[bool, Any]] | None:
    """Each write's outcome, in a transaction left open for the caller to commit.

    A group first runs without savepoints (`isolated` false), and None says one of its writes
    failed: savepoints cost two statements per write, each one more wait for the interpreter lock
    in this thread, and a failing write is rare. Its intakes share one `_Batch`: their rows go in
    together, a few statements for the whole group (any other write first writes what is pending,
    so it sees the intakes before it). Isolated, each write runs in its own savepoint, an intake
    with its own batch, and a failing one is undone alone (the works only write, so running them
    again is safe).
    """
    conn.execute("BEGIN IMMEDIATE")
    outcomes: list[tuple[bool, Any]] = []
    if not isolated:
        batch = _Batch(d for work, _, _ in group if isinstance(work, _Intake) for d in work.plan.candidates)
        try:
            for work, _, _ in group:
                if isinstance(work, _Intake):
                    outcomes.append((True, work.record(conn, batch)))
                else:
                    batch.flush(conn)
                    outcomes.append((True, work(conn)))
            batch.flush(conn)
        except Exception:
            return None
        return outcomes
    for i, (work, _, _) in enumerate(group):
        conn.execute(f"SAVEPOINT w{i}")
        try:
            outcomes.append((True, work(conn)))
            conn.execute(f"RELEASE w{i}")
        except Exception as exc:
            conn.execute(f"ROLLBACK TO w{i}")
            conn.execute(f"RELEASE w{i}")
            outcomes.append((False, exc))
    return outcomes


def _refused(group: list[_Job], why: object) -> _Committed:
    """A group whose commit did not hold (failed, or not fsynced): every write in it is refused."""
    return group, [(False, StoreError(f"commit failed: {why}"))] * len(group)


def _hand_back(batch: list[_Committed]) -> None:
    """The writers' outcomes to their event loops: one hand-off per loop for the whole batch, as
    each call_soon_threadsafe wakes the loop with a system call, and under load a batch holds
    dozens of requests."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for group, outcomes in batch:
        for (_, future, _), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(future.get_loop(), []).append((future, ok, value))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """In the futures' loop: each one's result, or its exception (unless its waiter gave up)."""
    for future, ok, value in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _event(
    conn: sqlite3.Connection,
    incident_id: str,
    at: float,
    kind: str,
    state: State | None,
    detail: dict[str, Any],
) -> None:
    conn.execute(
        "INSERT INTO events (incident_id, at, kind, state, detail) VALUES (?,?,?,?,?)",
        common.event_args(SQLITE, incident_id, at, kind, state, detail),
    )


def _apply_one(
    conn: sqlite3.Connection, t: Transition, now: float, channels: Sequence[tuple[Any, ...]]
) -> bool:
    sql, args = common.fenced_update(t, SQLITE)
    if conn.execute(sql, args).rowcount != 1:
        return False
    _event(conn, t.incident_id, now, t.event, t.state, t.detail)
    _owed(conn, t, now, channels)
    return True


def _owes(t: Transition, now: float) -> bool:
    """Whether applying `t` writes more than its incident's row and event (see `_owed`)."""
    return bool(t.channels) or common.outbox_insert(t, now, SQLITE) is not None


def _owed(conn: sqlite3.Connection, t: Transition, now: float, channels: Sequence[tuple[Any, ...]]) -> None:
    """What an applied transition brings beside its row and event: its incident's channels
    (`channels`, sealed beforehand) and the outbox events it owes them."""
    if channels:
        conn.executemany(common.channel_insert(SQLITE), channels)
    outbox = common.outbox_insert(t, now, SQLITE)
    if outbox is not None:
        conn.execute(*outbox)


def _incident_insert(columns: Sequence[str]) -> str:
    """New incidents with these columns, a row per executemany item (`common.incident_rows`)."""
    return f"INSERT INTO incidents ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})"  # noqa: S608


# Rows per multi-row INSERT (see `_Batch`): a fixed size, so that the writer's statement cache
# holds every shape (a statement per row count up to it, and the full one for big intakes).
_ROWS_PER_INSERT = 64
_EVENT_INSERT = "INSERT INTO events (incident_id, at, kind, state, detail) VALUES (?,?,?,?,?)"
_VALUES = re.compile(r"VALUES (\([?, ]*\))")


def _insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`sql`, a one-row INSERT, for every row of `rows` in multi-row statements of at most
    `_ROWS_PER_INSERT` rows each: one step of SQLite per statement, where `executemany` takes one
    per row, and the writer thread gives up the interpreter lock for each step and then waits for
    the event loop to hand it back."""
    one = _VALUES.search(sql)
    assert one is not None, sql
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        many = f"{sql[: one.start(1)]}{','.join([one.group(1)] * len(chunk))}{sql[one.end(1) :]}"
        conn.execute(many, [value for row in chunk for value in row])


class _Batch:
    """The rows a group's intakes write: incidents, events and sightings, inserted together by
    `flush`, a few statements for the group instead of a few per intake (the intakes' statements
    were 84 for a group of 12 alerts, each one a wait for the interpreter lock in the writer).

    An intake reads the incidents of its tokens (`known`) as the intakes before it in the group
    left them: one read for all of them at first, and when an intake shares a token with one
    before it since the last flush, a flush and a new read of the shared ones, as if each intake
    had run alone in its turn."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._unread = set(digests)
        self._read: dict[str, common.Row] = {}
        self._touched: set[str] = set()
        self.incidents: dict[str, list[tuple[Any, ...]]] = {}
        self.events: list[tuple[str, float, str, State | None, dict[str, Any]]] = []
        self.sightings: list[tuple[Any, ...]] = []

    def known(self, conn: sqlite3.Connection, digests: Sequence[str]) -> dict[str, common.Row]:
        """The stored incidents of these token hashes, by hash."""
        if not self._touched.isdisjoint(digests):
            self.flush(conn)
            for digest in self._touched:
                self._read.pop(digest, None)
            self._unread |= self._touched
            self._touched.clear()
        # Every token of the group not read yet, in the first intake's read: one for the group.
        missing: list[str] = []
        if not self._unread.isdisjoint(digests):
            missing = list(self._unread)
            self._unread.clear()
        for i in range(0, len(missing), _IN_CHUNK):
            chunk = missing[i : i + _IN_CHUNK]
            for row in conn.execute(
                "SELECT id, token_hash, state, label, redacted FROM incidents"  # noqa: S608
                f" WHERE token_hash IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                self._read[row["token_hash"]] = row
        self._touched.update(digests)
        return {d: row for d in digests if (row := self._read.get(d)) is not None}

    def flush(self, conn: sqlite3.Connection) -> None:
        """Insert what the intakes so far added: incidents first, as events and sightings refer
        to them."""
        for sql, rows in self.incidents.items():
            _insert_rows(conn, sql, rows)
        # Serialized here, for the whole group: a detail shared by its events is serialized once.
        _insert_rows(conn, _EVENT_INSERT, list(common.events_args(SQLITE, self.events)))
        _insert_rows(conn, common.sighting_insert(SQLITE), self.sightings)
        self.incidents.clear()
        self.events.clear()
        self.sightings.clear()


@dataclass(frozen=True, slots=True)
class _Intake:
    """One intake as the writer thread runs it: alone (called), or with the group's other
    intakes (`record` into the group's `_Batch`)."""

    alert: AlertRecord
    items: Sequence[TokenSighting]
    plan: IntakePlan
    decide: Decide | None
    now: float
    sealer: Sealer

    def __call__(self, conn: sqlite3.Connection) -> list[IncidentRef]:
        batch = _Batch(self.plan.candidates)
        refs = self.record(conn, batch)
        batch.flush(conn)
        return refs

    def record(self, conn: sqlite3.Connection, batch: _Batch) -> list[IncidentRef]:
        """The intake's writes, its incidents, events and sightings left in `batch`; the refs of
        its tokens as they are once the batch is flushed."""
        plan, decide, now = self.plan, self.decide, self.now
        known = batch.known(conn, list(plan.candidates))
        refs = {
            digest: new.ref() if (row := known.get(digest)) is None else new.stored(row, created=False)
            for digest, new in plan.candidates.items()
        }
        decided = {
            digest: t
            for digest, ref in refs.items()
            if ref.state is State.RECEIVED and decide is not None and (t := decide(ref)) is not None
        }
        common.check_transitions(list(decided.values()))
        channels = common.sealed_channels(list(decided.values()), self.sealer)
        # A new incident goes in as its decision leaves it, in one INSERT; its events read as
        # the fenced UPDATE's would have: received, then the decision.
        news = [(new, decided.get(d)) for d, new in plan.candidates.items() if d not in known]
        for columns, inserts in common.incident_rows(news, now, SQLITE, self.sealer).items():
            batch.incidents.setdefault(_incident_insert(columns), []).extend(inserts)
        batch.events.extend((new.id, now, *e) for new, t in news for e in new.events(self.alert, t))
        owing = [t for _, t in news if t is not None and _owes(t, now)]
        if owing:
            # Their channels and outbox rows refer to the incidents: those go in first.
            batch.flush(conn)
        for t in owing:
            _owed(conn, t, now, channels.get(t.incident_id, []))
        # The fences hold for every decided transition of a known incident: this transaction
        # read the states just now, and it is the only writer. Those that owe nothing beyond
        # their row and event (a false positive, a key without channels to tell) go grouped by
        # statement, one executemany each; the others as `apply` writes them, channels and
        # outbox included.
        earlier = [t for digest, t in decided.items() if digest in known]
        plain = [t for t in earlier if not _owes(t, now)]
        updates: dict[str, list[list[Any]]] = {}
        for t in plain:
            sql, args = common.fenced_update(t, SQLITE)
            updates.setdefault(sql, []).append(args)
        for sql, rows in updates.items():
            if conn.executemany(sql, rows).rowcount != len(rows):
                raise StoreError("an incident moved under the writer's own transaction")
        batch.events.extend((t.incident_id, now, t.event, t.state, t.detail) for t in plain)
        for t in earlier:
            if _owes(t, now) and not _apply_one(conn, t, now, channels.get(t.incident_id, [])):
                raise StoreError("an incident moved under the writer's own transaction")
        for digest, t in decided.items():
            refs[digest] = common.after(refs[digest], t)
        created = len(news)
        alert = self.alert
        inserted = conn.execute(
            common.alert_insert(SQLITE),
            (alert.reporter, alert.operator, now, alert.body_sha256, alert.item_count, created),
        )
        alert_id = inserted.lastrowid if inserted.rowcount == 1 else None
        if alert_id is None:
            (alert_id,) = conn.execute(
                common.alert_id_query(SQLITE), (alert.reporter, alert.body_sha256)
            ).fetchone()
            if created:
                # A later part of a big alert, or its redelivery after a crash between parts.
                conn.execute(common.alert_counted(SQLITE), (created, alert_id))
        batch.sightings.extend(
            plan.sighting_rows(self.items, {d: r.id for d, r in refs.items()}, alert_id, now)
        )
        return list(refs.values())
