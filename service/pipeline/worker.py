"""The worker: claims due incidents under a lease and runs the step each one is waiting for.

The commit of an alert wakes it at once (an in-process event, not a polling tick), so a matched key
is revoked within the same breath as the acknowledgement. Leases make a crash harmless: a killed
process's leases expire and the next claim runs the step again, and the steps are idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence

from service.observability import failure
from service.pipeline.retry import resolve_transition, retry_transition
from service.pipeline.steps import Lookup, Steps, gated, recorded
from service.reasons import Reason
from service.store import (
    AlertRecord,
    Incident,
    IncidentRef,
    Label,
    State,
    StoreError,
    TokenSighting,
    Transition,
    channel_state,
)
from service.store.common import OFFLOAD_ITEMS
from service.tasks import drain

log = logging.getLogger("service.pipeline")

_IDLE_POLL = 2.0
# Distinct tokens per intake transaction of one alert (see Worker.accept): big enough that a
# 10,000-token alert is ten commits, small enough that a part's transaction is tens of milliseconds.
INTAKE_PART = 1000
# Parts of one alert handed to the store at once: one being written, the next one queued behind it.
_PARTS_IN_FLIGHT = 2


class Worker:
    def __init__(
        self,
        steps: Steps,
        *,
        replica: str,
        concurrency: int,
        lease_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.steps = steps
        self.store = steps.store
        # `<replica>/<incarnation>`: a restart under the same replica id takes back its dead
        # predecessor's leases at once (Store.reclaim), while the fence still tells the two apart.
        self.replica = replica
        self.owner = f"{replica}/{os.getpid()}-{secrets.token_hex(4)}"
        self._capacity = concurrency * 4
        self._lease = lease_seconds
        self._clock = clock
        self._wake = asyncio.Event()
        # In-flight step tasks and how many claimed incidents each one holds.
        self._inflight: dict[asyncio.Task[None], int] = {}
        self._busy = 0
        self._claim_batch = max(1, self._capacity // 4)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.heartbeat = 0.0
        # Called after a commit that applied transitions the channels hear of: the channel outbox's
        # events of those transitions are due now (set by the runtime; the pipeline does not know
        # who listens).
        self.after_commit: Callable[[], None] = lambda: None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back a dead predecessor's leases, resume parked work that this configuration can
        now do, then start the loop, woken also by commits of other processes on a shared store."""
        reclaimed = await self.store.reclaim(self.replica)
        if reclaimed:
            log.info("leases of a dead predecessor taken back", extra={"incidents": reclaimed})
        if not self.steps.policy.dry_run:
            await self.store.resume(State.MATCHED)
        if self.steps.notifier is not None:
            await self.store.resume(State.CONFIRMED)
        await self.store.resume(State.UNCONFIRMED)
        await self.store.watch(self.wake)
        self._loop_task = asyncio.create_task(self._run(), name="pipeline-worker")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let in-flight steps finish within `grace`, and hand back the rest."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        await drain(self._inflight, grace)
        with contextlib.suppress(StoreError):
            await self.store.release(self.owner)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self.heartbeat = self._clock()
            self._wake.clear()
            room = self._capacity - self._busy
            # Claim in batches (a claim is a write): once a quarter of the room is free, or when idle.
            if room < self._claim_batch and self._busy:
                await self._sleep(_IDLE_POLL)
                continue
            claimed: list[Incident] = []
            try:
                claimed = await self.store.claim(self.owner, room, self._lease)
            except StoreError as exc:
                failure(log, "worker", Reason.STORE_UNAVAILABLE, f"claim failed: {exc}", level=logging.ERROR)
            if claimed:
                self._spawn(claimed)
                continue
            await self._sleep(await self._until_due())

    async def _until_due(self) -> float:
        with contextlib.suppress(StoreError):
            due = await self.store.next_due()
            if due is not None:
                return min(_IDLE_POLL, max(0.0, due - self._clock()) + 0.005)
        return _IDLE_POLL

    async def _sleep(self, seconds: float) -> None:
        """Until woken (a commit, a finished step) or `timeout`: whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _spawn(self, claimed: Sequence[Incident]) -> None:
        groups: dict[State, list[Incident]] = {}
        for incident in claimed:
            groups.setdefault(incident.state, []).append(incident)
        unconfirmed = groups.pop(State.UNCONFIRMED, [])
        # An unconfirmed key's owner is told once (in a batch, like the confirmed ones'); after
        # that, with nobody to tell, or when its re-probe is due while the email is still owed, it
        # is re-probed one by one.
        tell = [
            i
            for i in unconfirmed
            if i.notified_at is None and self.steps.notifier is not None and not self.steps.reprobe_due(i)
        ]
        if tell:
            groups[State.UNCONFIRMED] = tell
        for state, incidents in groups.items():
            if state in (State.RECEIVED, State.CONFIRMED, State.UNCONFIRMED):
                self._track(self._batch(state, incidents), len(incidents))
            else:
                for incident in incidents:
                    self._track(self._one(incident), 1)
        told = {i.id for i in tell}
        for incident in unconfirmed:
            if incident.id not in told:
                self._track(self._one(incident), 1)

    def _track(self, coro: Coroutine[object, object, None], size: int) -> None:
        task = asyncio.create_task(coro)
        self._inflight[task] = size
        self._busy += size
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._busy -= self._inflight.pop(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            failure(
                log,
                "worker",
                Reason.STEP_CRASHED,
                f"step raised {type(exc).__name__}",
                level=logging.ERROR,
                exc_info=exc,
            )

    async def _batch(self, state: State, incidents: list[Incident]) -> None:
        if state is State.RECEIVED:
            transitions = await self.steps.match(incidents, self.owner)
        else:
            transitions = await self.steps.notify(incidents, self.owner)
        await self._record(transitions)

    async def _one(self, incident: Incident) -> None:
        if incident.state is State.MATCHED:
            transition = await self.steps.revoke(incident, self.owner)
        elif incident.state is State.REVOKED:
            transition = await self.steps.probe(incident, self.owner)
        elif incident.state is State.UNCONFIRMED:
            transition = await self.steps.reprobe(incident, self.owner)
        elif incident.state is State.NOTIFIED:
            transition = self.steps.close(incident, self.owner)
        else:
            # A final state should never be due; clear it rather than spin on it.
            transition = Transition(incident.id, incident.state, "unscheduled", lease_owner=self.owner)
        await self._record([transition])

    async def _record(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        try:
            applied = await self.store.apply(transitions)
        except StoreError as exc:
            # The leases run out and the steps run again; nothing is lost, only delayed.
            failure(
                log,
                "worker",
                Reason.STORE_UNAVAILABLE,
                f"recording step outcomes failed: {exc}",
                level=logging.ERROR,
            )
            return
        recorded(transitions, applied)
        if _tell_channels(t for t, ok in zip(transitions, applied, strict=True) if ok):
            self.after_commit()
        if any(ok and t.next_run_at is not None for t, ok in zip(transitions, applied, strict=True)):
            self._wake.set()

    # -- the request path ------------------------------------------------------------------------

    async def accept(
        self, alert: AlertRecord, sightings: Sequence[TokenSighting], budget: float
    ) -> tuple[list[IncidentRef], dict[str, Label]]:
        """Look up an alert's key-shaped tokens within `budget` seconds, then commit the alert with
        the labels: one commit per alert, and nothing acknowledged before the last commit. The
        lookup only reads, so doing it first risks nothing.

        A big alert goes in parts of at most `INTAKE_PART` distinct tokens, one transaction each,
        each committed once its lookup is in while the later parts' lookups go on: every other
        request's commits go between two parts (and its lookup ahead of the big alert's queued
        ones), so a small alert never waits for a big one's whole work. A crash between two parts
        leaves those committed, each whole, and no 2xx: the sender redelivers the same body, whose
        intake finds the parts already there (a known token adds nothing, the alert row is found
        by its body's hash, no part is skipped because of it) and commits the rest. The parts cut
        no token in two: every item of one token is in the part of its first appearance. Two parts
        are in the store at once, so the writer goes from one part's commit to the next part's
        statements while the first one's fsync and answer are under way; the alert is answered
        only once every part's commit is fsynced.

        A token whose lookup failed or did not finish in time is committed in `received`, due at
        once, and gets no label here: a worker takes it over, so a slow Supermemory delays the
        answer's completeness, never the alert. A token already known keeps the label it has.
        Every intake passes here, so this is where the shape gate's own decisions are logged.
        """
        deadline = time.monotonic() + budget
        # Cutting 100,000 tokens in parts takes tens of milliseconds: beside the loop.
        big = len(sightings) > OFFLOAD_ITEMS
        parts, shaped = await asyncio.to_thread(_plan, sightings) if big else _plan(sightings)
        # Every part's lookup starts now, as one alert's did before it came in parts: the labels
        # are as complete within the budget, and a small alert's lookup still goes first.
        lookups = [self.steps.lookup(hashes, deadline - time.monotonic()) for hashes in shaped]
        if len(parts) == 1:
            # A small alert, nearly every one: its part in the request's own task (a task of its
            # own, and the gathering of tasks, cost a turn of the event loop per request); its
            # lookup is given up, if it must be, by `Lookup.answers`, the intake's first await.
            refs = await self._intake(alert, parts[0], lookups[0])
        else:
            refs = await self._intake_parts(alert, parts, lookups)
        return refs, {r.token_hash: r.label for r in refs if r.label is not None}

    async def _intake_parts(
        self, alert: AlertRecord, parts: Sequence[Sequence[TokenSighting]], lookups: Sequence[Lookup]
    ) -> list[IncidentRef]:
        """A big alert's parts, each committed once its lookup is in (see `accept`)."""
        refs: list[IncidentRef] = []
        # The next part is prepared and queued for the writer while the one before it is being
        # written and fsynced, so the writer goes from one part's commit straight to the next
        # part's statements; no more than two parts are held at once. The first part goes alone:
        # it creates the alert's record, which the later parts find (two transactions creating it
        # at once would each miss the other's).
        writing: collections.deque[asyncio.Task[list[IncidentRef]]] = collections.deque()
        try:
            for n, (part, lookup) in enumerate(zip(parts, lookups, strict=True)):
                if len(writing) == (1 if n == 1 else _PARTS_IN_FLIGHT):
                    refs += await writing.popleft()
                writing.append(asyncio.create_task(self._intake(alert, part, lookup)))
            while writing:
                refs += await writing.popleft()
        finally:
            for task in writing:
                task.cancel()
            for lookup in lookups:
                lookup.cancel()
            # Retrieve what the cancelled parts raised (a refused commit, the cancellation).
            await asyncio.gather(*writing, return_exceptions=True)
        return refs

    async def _intake(
        self,
        alert: AlertRecord,
        part: Sequence[TokenSighting],
        lookup: Lookup,
    ) -> list[IncidentRef]:
        """One transaction, once the part's `lookup` has answered: the part's incidents, sightings,
        the alert's record, the decided labels."""
        found = await lookup.answers()

        def decide(ref: IncidentRef) -> Transition | None:
            if ref.token_hash not in found:
                return None
            return self.steps.matched(ref.id, found[ref.token_hash], None)

        refs = await self.store.intake(alert, part, match_after=0, decide=decide)
        gated(refs)
        applied = [r.applied for r in refs if r.applied is not None]
        recorded(applied, [True] * len(applied))
        if _tell_channels(applied):
            self.after_commit()
        # Work this commit made due now: tokens left for a worker, keys just matched.
        if any(r.state is State.RECEIVED or (r.state is State.MATCHED and r.applied) for r in refs):
            self.wake()
        # The transitions are recorded now: the refs the caller keeps until the last part (for the
        # answer) do not keep them too, or a big alert would hold every one of them at once.
        return [r.moved(r.state, r.label, None) if r.applied else r for r in refs]

    async def retry(self, incident: Incident, operator: str) -> bool:
        """Run a stuck incident's step now, on an operator's word (see `retry_transition`).

        False when the incident is not stuck, or moved on between the caller's read and this write.
        """
        return await self._operator_action(retry_transition(incident, operator, self._clock()), operator)

    async def resolve(self, incident: Incident, operator: str, note: str) -> bool:
        """Close an open incident on an operator's word, with their note (see `resolve_transition`).

        False when it is already final, or moved on between the caller's read and this write.
        """
        return await self._operator_action(
            resolve_transition(incident, operator, note, self._clock()), operator
        )

    async def _operator_action(self, transition: Transition | None, operator: str) -> bool:
        if transition is None:
            return False
        applied = await self.store.apply([transition])
        recorded([transition], applied)
        if applied[0]:
            log.info(
                f"incident {transition.event}",
                extra={"incident_id": transition.incident_id, "operator": operator},
            )
            self.wake()
        return applied[0]


def _tell_channels(applied: Iterable[Transition]) -> bool:
    """Whether applied transitions wrote channel events, which are then due at once. Most of an ack
    path's transitions are false positives, which tell no channel: waking the channel sender for
    them cost a claim (a write) and a read per alert under load."""
    return any(channel_state(t) is not None for t in applied)


def _plan(sightings: Sequence[TokenSighting]) -> tuple[list[list[TokenSighting]], list[list[str]]]:
    """The alert's parts (`_parts`), and each part's key-shaped tokens' hashes, once each."""
    parts = _parts(sightings, INTAKE_PART) or [[]]
    shaped = [list(dict.fromkeys(s.digest for s in part if s.shaped)) for part in parts]
    return parts, shaped


def _parts(sightings: Sequence[TokenSighting], size: int) -> list[list[TokenSighting]]:
    """The items in parts of at most `size` distinct tokens, in order of first appearance; every
    item of a token goes to the part of the token's first appearance."""
    part_of: dict[str, int] = {}
    parts: list[list[TokenSighting]] = []
    for sighting in sightings:
        # Evaluated before the insertion: the token's rank among the distinct tokens seen so far.
        n = part_of.setdefault(sighting.token, len(part_of) // size)
        if n == len(parts):
            parts.append([])
        parts[n].append(sighting)
    return parts
