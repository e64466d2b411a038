"""The incident pipeline's steps (contract.md §5): each takes incidents as the store holds them and returns
the transitions to record, so that a step is a decision and the store is the only writer.

Every step is safe to run twice: lookup and probe only read, a revoke of a revoked key answers 404
(which counts as revoked), and the transitions are fenced on the state the step started from.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.alerting import Pager
from service.backoff import backoff
from service.notify.result import NotifyResult
from service.observability import (
    SUPERMEMORY_CALLS,
    TIME_TO_CONFIRM,
    TIME_TO_REVOKE,
    TRANSITIONS,
    counter,
    failure,
)
from service.reasons import Reason
from service.store import Incident, IncidentRef, Label, SealingError, State, Store, Transition
from service.supermemory import (
    LOOKUP_BATCH,
    Asked,
    CallFailed,
    KeyInfo,
    ProbeVerdict,
    SupermemoryClient,
    give_up,
)

log = logging.getLogger("service.pipeline")


class Notifier(Protocol):
    """Tells key owners; says which incidents it has finished with, which wait for sibling keys
    of their alert, and which recipients refused mail for good."""

    async def notify(self, incidents: Sequence[Incident]) -> NotifyResult: ...


@dataclass(frozen=True)
class Policy:
    dry_run: bool
    probe_schedule: tuple[float, ...]
    probe_inconclusive_window: float
    revoke_retry_window: float
    backoff_base: float
    backoff_max: float
    # An `unconfirmed` key is probed again (and its revoke re-issued) this often, for this long.
    reprobe_interval: float = 3600.0
    unconfirmed_window: float = 7 * 24 * 3600.0


class Lookup:
    """A request path's lookup under way (see `Steps.lookup`)."""

    def __init__(self, asked: Asked, deadline: float, incomplete: bool = False) -> None:
        self._asked = asked
        self._deadline = deadline
        self._incomplete = incomplete

    async def answers(self) -> dict[str, KeyInfo | None]:
        """Per hash, its key or None (not a key), for the hashes answered by the deadline. A failed
        or unfinished call leaves its hashes out; they are committed as received and a worker
        takes them over. The answers are awaited here, in the caller's task: under load each task
        between a call's answer and the request was one more turn of the event loop to wait."""
        try:
            async with asyncio.timeout(self._deadline - time.monotonic()):
                for _, future in self._asked:
                    with contextlib.suppress(Exception):  # a failed chunk: read below
                        await future
        except TimeoutError:
            pass
        finally:
            self.cancel()
        outcomes: dict[str, KeyInfo | None] = {}
        incomplete = self._incomplete
        for chunk, future in self._asked:
            if future.cancelled():
                incomplete = True
                continue
            exc = future.exception()
            if isinstance(exc, CallFailed):
                SUPERMEMORY_CALLS.labels(call="lookup", outcome=exc.reason).inc()
                failure(log, "match", exc.reason, "key lookup failed", count=len(chunk), status=exc.status)
                continue
            if exc is not None:
                raise exc
            found = future.result()
            counter(SUPERMEMORY_CALLS, "lookup", "ok").inc()
            outcomes |= {h: found.get(h) for h in chunk}
        if incomplete:
            log.info("labels incomplete within the request budget", extra={"detail": "TimeoutError"})
        return outcomes

    def cancel(self) -> None:
        """Give up what is not answered yet."""
        give_up(self._asked)


class Steps:
    def __init__(
        self,
        store: Store,
        client: SupermemoryClient,
        pager: Pager,
        policy: Policy,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.pager = pager
        self.policy = policy
        self.notifier = notifier
        self._clock = clock
        self._rng = rng or random.Random()

    # -- helpers ---------------------------------------------------------------------------------

    def _retry(
        self,
        incident: Incident,
        owner: str | None,
        event: str,
        reason: Reason,
        retry_after: float | None = None,
    ) -> Transition:
        attempts = incident.attempts + 1
        now = self._clock()
        delay = backoff(attempts, self.policy.backoff_base, self.policy.backoff_max, retry_after, self._rng)
        return Transition(
            incident.id,
            incident.state,
            event,
            lease_owner=owner,
            next_run_at=now + delay,
            set={
                "attempts": attempts,
                "last_reason": reason,
                "step_started_at": incident.step_started_at or now,
            },
            detail={"reason": reason, "attempt": attempts, "retry_in": round(delay, 3)},
        )

    def _page(self, incident: Incident, transition: Transition, code: Reason, message: str) -> None:
        """Page once per incident and code: the code is recorded with the transition."""
        if code in incident.pages:
            return
        transition.page = code
        tags = {
            "incident_id": incident.id,
            "token_hash_prefix": incident.token_hash[:12],
            "org_id": incident.org_id or "",
        }
        self.pager.page(code, message, tags, {"state": incident.state, "redacted": incident.redacted})

    def _after_final_probe(self) -> float | None:
        """Confirmed incidents go on to notify at once, or wait (visibly) for a notifier."""
        return self._clock() if self.notifier is not None else None

    def _after_unconfirmed(self, now: float) -> float:
        """An unconfirmed key's owner is told at once when a notifier exists; its slow re-probes
        start one interval later either way."""
        return now if self.notifier is not None else now + self.policy.reprobe_interval

    def next_reprobe(self, incident: Incident) -> float | None:
        """When an `unconfirmed` key is due for its next re-probe: an interval after its last probe,
        whatever its owner's email is doing; None once a re-probe found its window over (it waits
        for an operator). Never probed since it became unconfirmed: at once."""
        started, last = incident.unconfirmed_at, incident.probed_at
        if started is None or last is None:
            return self._clock()
        if last - started >= self.policy.unconfirmed_window:
            return None
        return last + self.policy.reprobe_interval

    def reprobe_due(self, incident: Incident) -> bool:
        due = self.next_reprobe(incident)
        return due is not None and due <= self._clock()

    async def _reveal(self, incident: Incident) -> str | Reason:
        """The sealed token, or why there is none to probe with."""
        try:
            token = await self.store.reveal_token(incident.id)
        except SealingError as exc:
            failure(
                log,
                "confirm",
                Reason.TOKEN_UNSEALABLE,
                str(exc),
                level=logging.ERROR,
                incident_id=incident.id,
            )
            return Reason.TOKEN_UNSEALABLE
        if token is None:
            failure(
                log,
                "confirm",
                Reason.TOKEN_UNAVAILABLE,
                "cannot probe: the sealed token is gone",
                level=logging.ERROR,
                incident_id=incident.id,
            )
            return Reason.TOKEN_UNAVAILABLE
        return token

    # -- match -----------------------------------------------------------------------------------

    async def match(self, incidents: Sequence[Incident], owner: str) -> list[Transition]:
        """The worker's batched lookup of claimed incidents; a failed call reschedules its chunk."""
        chunks = [incidents[i : i + LOOKUP_BATCH] for i in range(0, len(incidents), LOOKUP_BATCH)]
        results = await asyncio.gather(*(self._match_chunk(chunk, owner) for chunk in chunks))
        return [t for chunk in results for t in chunk]

    async def _match_chunk(self, incidents: Sequence[Incident], owner: str) -> list[Transition]:
        try:
            found = await self.client.lookup([i.token_hash for i in incidents])
        except CallFailed as exc:
            SUPERMEMORY_CALLS.labels(call="lookup", outcome=exc.reason).inc()
            failure(log, "match", exc.reason, "key lookup failed", count=len(incidents), status=exc.status)
            transitions = []
            for incident in incidents:
                t = self._retry(incident, owner, "lookup_failed", exc.reason, exc.retry_after)
                if exc.reason == Reason.ADMIN_UNAUTHORIZED:
                    self._page(incident, t, Reason.LOOKUP_UNAUTHORIZED, "Supermemory refused the admin token")
                transitions.append(t)
            return transitions
        SUPERMEMORY_CALLS.labels(call="lookup", outcome="ok").inc()
        return [self.matched(i.id, found.get(i.token_hash), owner) for i in incidents]

    def lookup(self, hashes: Sequence[str], budget: float) -> Lookup:
        """The request path's lookup, started now (nothing is committed before it), to be answered
        within `budget` seconds (see `Lookup.answers`); nothing is asked when no budget is left."""
        if budget <= 0:
            return Lookup([], 0.0, incomplete=bool(hashes))
        return Lookup(self.client.ask(hashes), time.monotonic() + budget)

    def matched(self, incident_id: str, key: KeyInfo | None, owner: str | None) -> Transition:
        """A lookup's answer for one incident in `received`: matched to its key, or a false positive."""
        if key is None:
            return Transition(
                incident_id,
                State.RECEIVED,
                "false_positive",
                lease_owner=owner,
                state=State.FALSE_POSITIVE,
                wipe_token=True,
                set={"label": Label.FALSE_POSITIVE, "last_reason": Reason.NOT_A_KEY, "attempts": 0},
                detail={"reason": Reason.NOT_A_KEY},
            )
        for reason, path in key.problems:
            failure(
                log,
                "match",
                reason,
                "ignored an unusable optional field of the lookup",
                field=path,
                incident_id=incident_id,
            )
        now = self._clock()
        return Transition(
            incident_id,
            State.RECEIVED,
            "matched",
            lease_owner=owner,
            state=State.MATCHED,
            next_run_at=now,
            set={
                "label": Label.TRUE_POSITIVE,
                "key_id": key.id,
                "org_id": key.org_id,
                "key_name": key.name,
                "recipients": key.recipients,
                "matched_at": now,
                "attempts": 0,
                "step_started_at": None,
                "last_reason": None,
                "key_created_at": key.created_at,
                "key_last_used_at": key.last_used_at,
                "org_name": key.org_name,
            },
            detail={
                "key_id": key.id,
                "org_id": key.org_id,
                "enabled": key.enabled,
                "channels": len(key.channels),
            },
            channels=key.channels,
        )

    # -- revoke ----------------------------------------------------------------------------------

    async def revoke(self, incident: Incident, owner: str) -> Transition:
        if self.policy.dry_run:
            # Parked, visibly, at `matched`; switching to enforce resumes it (see Worker.start).
            return Transition(
                incident.id,
                State.MATCHED,
                "revoke_skipped",
                lease_owner=owner,
                set={"last_reason": Reason.DRY_RUN},
                detail={"reason": Reason.DRY_RUN},
            )
        assert incident.key_id is not None
        try:
            result = await self.client.revoke(incident.key_id)
        except CallFailed as exc:
            SUPERMEMORY_CALLS.labels(call="revoke", outcome=exc.reason).inc()
            failure(log, "revoke", exc.reason, "revoke failed", incident_id=incident.id, status=exc.status)
            t = self._retry(incident, owner, "revoke_failed", exc.reason, exc.retry_after)
            started = incident.step_started_at or self._clock()
            if exc.reason == Reason.ADMIN_UNAUTHORIZED:
                self._page(incident, t, Reason.LOOKUP_UNAUTHORIZED, "Supermemory refused the admin token")
            elif self._clock() - started >= self.policy.revoke_retry_window:
                self._page(
                    incident, t, Reason.REVOCATION_FAILED, "revoke still failing after its retry window"
                )
            return t
        SUPERMEMORY_CALLS.labels(call="revoke", outcome=result).inc()
        now = self._clock()
        TIME_TO_REVOKE.observe(now - incident.created_at)
        return Transition(
            incident.id,
            State.MATCHED,
            "revoked",
            lease_owner=owner,
            state=State.REVOKED,
            next_run_at=now + self.policy.probe_schedule[0],
            set={"revoked_at": now, "attempts": 0, "step_started_at": None, "last_reason": None},
            detail={"result": result},
        )

    # -- confirm ---------------------------------------------------------------------------------

    async def probe(self, incident: Incident, owner: str) -> Transition:
        assert incident.revoked_at is not None
        token = await self._reveal(incident)
        if isinstance(token, Reason):
            return self._unconfirmed(incident, owner, token, None, f"cannot probe: {token}")
        probe = await self.client.probe(token)
        del token
        now = self._clock()
        SUPERMEMORY_CALLS.labels(call="probe", outcome=probe.reason).inc()
        elapsed = now - incident.revoked_at
        schedule = self.policy.probe_schedule
        if probe.verdict is ProbeVerdict.DEAD:
            TIME_TO_CONFIRM.observe(now - incident.created_at)
            return Transition(
                incident.id,
                State.REVOKED,
                "confirmed",
                lease_owner=owner,
                state=State.CONFIRMED,
                next_run_at=self._after_final_probe(),
                set={"confirmed_at": now, "attempts": 0, "last_reason": None},
                detail={"status": probe.status, "after": round(elapsed, 3)},
            )
        if probe.verdict is ProbeVerdict.INCONCLUSIVE:
            failure(
                log,
                "confirm",
                probe.reason,
                "probe inconclusive",
                incident_id=incident.id,
                status=probe.status,
            )
            if elapsed > schedule[-1] + self.policy.probe_inconclusive_window:
                return self._unconfirmed(incident, owner, probe.reason, probe.status)
            return self._retry(incident, owner, "probe_inconclusive", probe.reason, probe.retry_after)
        # Alive: the revoke may not have propagated yet. Probe again on the schedule, re-issue the
        # revoke once halfway through, and page when the schedule runs out.
        failure(
            log,
            "confirm",
            probe.reason,
            "key still alive after revoke",
            incident_id=incident.id,
            status=probe.status,
            after=round(elapsed, 3),
        )
        upcoming = [p for p in schedule if incident.revoked_at + p > now]
        if not upcoming:
            return self._unconfirmed(incident, owner, probe.reason, probe.status)
        reissue = not incident.revoke_reissued and elapsed >= schedule[len(schedule) // 2]
        detail = {"status": probe.status, "after": round(elapsed, 3), "reissued_revoke": reissue}
        if reissue:
            await self._reissue(incident)
        return Transition(
            incident.id,
            State.REVOKED,
            "probe_alive",
            lease_owner=owner,
            next_run_at=incident.revoked_at + upcoming[0],
            set={"revoke_reissued": incident.revoke_reissued or reissue, "last_reason": probe.reason},
            detail=detail,
        )

    async def _reissue(self, incident: Incident) -> None:
        assert incident.key_id is not None
        try:
            result = await self.client.revoke(incident.key_id)
            SUPERMEMORY_CALLS.labels(call="revoke", outcome=result).inc()
        except CallFailed as exc:
            SUPERMEMORY_CALLS.labels(call="revoke", outcome=exc.reason).inc()
            failure(log, "confirm", exc.reason, "re-issued revoke failed", incident_id=incident.id)

    def _unconfirmed(
        self,
        incident: Incident,
        owner: str,
        reason: Reason,
        status: int | None,
        message: str = "key still works after revoke",
    ) -> Transition:
        now = self._clock()
        t = Transition(
            incident.id,
            State.REVOKED,
            "unconfirmed",
            lease_owner=owner,
            state=State.UNCONFIRMED,
            next_run_at=self._after_unconfirmed(now),
            set={"last_reason": reason, "unconfirmed_at": now, "probed_at": now, "attempts": 0},
            detail={"reason": reason, "status": status},
        )
        self._page(incident, t, Reason.REVOCATION_UNCONFIRMED, message)
        return t

    async def reprobe(self, incident: Incident, owner: str) -> Transition:
        """An `unconfirmed` key, on its slow schedule: a 401 confirms it (the token is wiped; the
        owner's follow-up email, then closed, as any confirmed key); still alive, the revoke is
        issued again; either way it is probed again an interval later, until the window runs out,
        when on-call is paged again and it waits, open, for an operator.

        The schedule does not wait for the owner's urgent email: while that email is still owed
        (SMTP down), the re-probes and the window's page go on, and the email is tried again right
        after each re-probe (its own retries are capped by the next re-probe, see `notify`)."""
        now = self._clock()
        started = incident.unconfirmed_at or now
        token = await self._reveal(incident)
        if isinstance(token, Reason):
            verdict, reason, status = ProbeVerdict.INCONCLUSIVE, token, None
        else:
            probe = await self.client.probe(token)
            del token
            SUPERMEMORY_CALLS.labels(call="probe", outcome=probe.reason).inc()
            verdict, reason, status = probe.verdict, probe.reason, probe.status
        if verdict is ProbeVerdict.DEAD:
            # Confirmed as any other key, so its owner, told urgently that it may still work, now
            # gets the follow-up saying it does not (a delivery of its own), and then it closes. The
            # token goes at once: nothing is left to probe.
            TIME_TO_CONFIRM.observe(now - incident.created_at)
            return Transition(
                incident.id,
                State.UNCONFIRMED,
                "confirmed",
                lease_owner=owner,
                state=State.CONFIRMED,
                next_run_at=self._after_final_probe(),
                wipe_token=True,
                set={"confirmed_at": now, "probed_at": now, "last_reason": None, "attempts": 0},
                detail={"status": status, "after_unconfirmed": round(now - started, 3)},
            )
        reissued = False
        if verdict is ProbeVerdict.ALIVE:
            failure(
                log, "confirm", reason, "unconfirmed key still alive", incident_id=incident.id, status=status
            )
            await self._reissue(incident)
            reissued = True
        over = now - started >= self.policy.unconfirmed_window
        owed = self.notifier is not None and incident.notified_at is None
        t = Transition(
            incident.id,
            State.UNCONFIRMED,
            "reprobed",
            lease_owner=owner,
            next_run_at=now if owed else None if over else now + self.policy.reprobe_interval,
            set={"last_reason": reason, "probed_at": now},
            detail={"reason": reason, "status": status, "reissued_revoke": reissued},
        )
        if over:
            self._page(
                incident,
                t,
                Reason.UNCONFIRMED_WINDOW_OVER,
                "a revoked key still did not answer 401 after its re-probe window; resolve it by hand",
            )
        return t

    # -- notify and close ------------------------------------------------------------------------

    async def notify(self, incidents: Sequence[Incident], owner: str) -> list[Transition]:
        if self.notifier is None:
            return [Transition(i.id, i.state, "awaiting_notifier", lease_owner=owner) for i in incidents]
        result = await self.notifier.notify(incidents)
        now = self._clock()
        transitions = []
        for incident in incidents:
            if incident.id in result.done and incident.state is State.UNCONFIRMED:
                # Told (urgently); the incident stays open, on its slow re-probe schedule.
                t = Transition(
                    incident.id,
                    State.UNCONFIRMED,
                    "notified",
                    lease_owner=owner,
                    next_run_at=self.next_reprobe(incident),
                    set={"notified_at": now, "attempts": 0, "step_started_at": None},
                    detail={"refused": len(result.unreachable.get(incident.id, ())), "urgent": True},
                )
            elif incident.id in result.done:
                t = Transition(
                    incident.id,
                    incident.state,
                    "notified",
                    lease_owner=owner,
                    state=State.NOTIFIED,
                    next_run_at=now,
                    set={"notified_at": now, "attempts": 0, "step_started_at": None, "last_reason": None},
                    detail={"refused": len(result.unreachable.get(incident.id, ()))},
                )
            elif incident.id in result.waiting:
                # Not a retry: the email waits for sibling keys of the same alert, then goes out once.
                until = result.waiting[incident.id]
                t = Transition(
                    incident.id,
                    incident.state,
                    "notify_grouping",
                    lease_owner=owner,
                    next_run_at=until,
                    detail={"until": round(until, 3)},
                )
            else:
                reason = result.pending.get(incident.id, Reason.NOTIFY_PENDING)
                t = self._retry(incident, owner, "notify_pending", reason)
                reprobe = self.next_reprobe(incident) if incident.state is State.UNCONFIRMED else None
                if reprobe is not None and t.next_run_at is not None and reprobe < t.next_run_at:
                    # An unconfirmed key's re-probe does not wait for its email's backoff.
                    t.next_run_at = reprobe
                if reason is Reason.SMTP_TLS_REQUIRED:
                    self._page(incident, t, reason, "SMTP credentials would go in clear: no email goes out")
            if incident.id in result.unreachable:
                self._page(incident, t, Reason.OWNER_UNREACHABLE, "a key owner could not be emailed")
            transitions.append(t)
        return transitions

    def close(self, incident: Incident, owner: str) -> Transition:
        """The raw token is wiped; hash, redacted form, timeline and sightings stay."""
        return Transition(
            incident.id,
            State.NOTIFIED,
            "closed",
            lease_owner=owner,
            state=State.CLOSED,
            wipe_token=True,
            set={"closed_at": self._clock()},
        )


def gated(refs: Sequence[IncidentRef]) -> None:
    """Log the tokens the intake's shape gate made false positives, as `recorded` logs those of the
    lookup: they never reach a step, so without this line no log would say why they were dropped."""
    for ref in refs:
        if ref.created and ref.state is State.FALSE_POSITIVE and ref.applied is None:
            log.info(
                "incident false_positive",
                extra={"incident_id": ref.id, "event": "false_positive", "reason": Reason.SHAPE_GATE},
            )


def recorded(transitions: Sequence[Transition], applied: Sequence[bool]) -> None:
    """Count and log what the store applied, whichever path (worker, request, operator) applied it.

    Counted once per state, and the log lines built only if they are logged: a big alert's intake
    records thousands of transitions at once, on the event loop."""
    counts: collections.Counter[State] = collections.Counter()
    logged = log.isEnabledFor(logging.INFO)
    for t, ok in zip(transitions, applied, strict=True):
        if not ok:
            if logged:
                log.info("step outcome superseded", extra={"incident_id": t.incident_id, "event": t.event})
        elif t.state is not None:
            counts[t.state] += 1
            if logged:
                log.info(
                    f"incident {t.state}", extra={"incident_id": t.incident_id, "event": t.event, **t.detail}
                )
    for state, count in counts.items():
        counter(TRANSITIONS, str(state)).inc(count)
