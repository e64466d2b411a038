"""The channel outbox's sender: a loop of its own that takes due events from the store and sends
each in its own task.

Exactly once, as far as an outbox can: the store wrote each event once, in the transaction of its
transition; a sender holds a row before sending (`claim_channel_events`) and records the outcome
only while it still holds it (`finish_channel_event`), so a restart or a second replica never sends
an event another sender has finished or is sending. One window stays, as for email: a sender killed
after the endpoint took the event and before the outcome was committed. Its row is found still
`sending` once its hold runs out and sent again with the same `webhook-id` and event id, which is
what receivers dedupe on (Standard Webhooks asks them to), and logged as `resend_unknown_outcome`.

Retries (5xx, 429, timeouts, connection errors) are rescheduled in the store with the pipeline's
backoff, never slept on, until `give_up_after` seconds after the event was written: then the event
is recorded as given up. Nothing here pages: the org's endpoint being down is the org's problem, and
the incident's timeline and the metrics show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable

from prometheus_client import Counter

from service.backoff import backoff
from service.channels.payload import cloud_event, event_id, slack_message
from service.channels.sender import Attempt, ChannelSender
from service.observability import failure
from service.reasons import Reason
from service.store import (
    ChannelJob,
    ChannelOutcome,
    ChannelStatus,
    ChannelType,
    Incident,
    Sighting,
    Store,
    StoreError,
)
from service.tasks import drain

log = logging.getLogger("service.channels")

DELIVERIES = Counter(
    "leak_responder_channel_deliveries_total",
    "Channel event attempts by channel type and outcome (sent, retry, refused, gone, gave_up).",
    ["type", "outcome"],
)

_IDLE_POLL = 1.0
_FINAL = {
    Reason.CHANNEL_ADDRESS_REFUSED: (ChannelStatus.REFUSED, "channel_refused"),
    Reason.CHANNEL_REDIRECTED: (ChannelStatus.REFUSED, "channel_refused"),
    Reason.CHANNEL_REJECTED: (ChannelStatus.REFUSED, "channel_refused"),
    Reason.CHANNEL_GONE: (ChannelStatus.GONE, "channel_gone"),
    Reason.TOKEN_UNSEALABLE: (ChannelStatus.REFUSED, "channel_refused"),
}


class ChannelDispatcher:
    def __init__(
        self,
        store: Store,
        sender: ChannelSender,
        *,
        replica: str,
        concurrency: int,
        hold: float,
        give_up_after: float,
        backoff_base: float,
        backoff_max: float,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        # `<replica>/<incarnation>`, as the worker's leases: a restart under the same replica id
        # takes back its dead predecessor's holds at once (Store.reclaim, run by the worker's start).
        self.holder = f"{replica}/{os.getpid()}-{secrets.token_hex(4)}"
        self._capacity = concurrency
        self._hold = hold
        self._give_up_after = give_up_after
        self._backoff = (backoff_base, backoff_max)
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="channel-dispatcher")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming and let sends in flight finish within `grace`; a send cut short is found
        `sending` past its hold and sent again (same event id)."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        await drain(self._inflight, grace)
        await self.sender.aclose()

    def wake(self) -> None:
        """A transition to a channel state was committed in this process: its events are due now."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            room = self._capacity - len(self._inflight)
            jobs: list[ChannelJob] = []
            # Claim in batches (a claim is a write): once a quarter of the room is free, or when idle.
            if room >= max(1, self._capacity // 4) or not self._inflight:
                try:
                    jobs = await self.store.claim_channel_events(self.holder, room, self._hold)
                except StoreError as exc:
                    failure(
                        log, "channels", Reason.STORE_UNAVAILABLE, f"claim failed: {exc}", level=logging.ERROR
                    )
            if jobs:
                # One read of the incidents and their sightings for the whole batch, not two per event.
                try:
                    ids = sorted({j.incident_id for j in jobs})
                    incidents = {i.id: i for i in await self.store.incidents(ids)}
                    sightings = await self.store.sightings(ids)
                except StoreError as exc:
                    # Held rows come free when their hold runs out: delayed, not lost.
                    failure(
                        log, "channels", Reason.STORE_UNAVAILABLE, f"read failed: {exc}", level=logging.ERROR
                    )
                    await self._sleep()
                    continue
                for job in jobs:
                    task = asyncio.create_task(
                        self._deliver(job, incidents[job.incident_id], sightings[job.incident_id])
                    )
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
                continue
            await self._sleep()

    async def _sleep(self) -> None:
        timeout = _IDLE_POLL
        with contextlib.suppress(StoreError):
            due = await self.store.next_channel_due()
            if due is not None:
                timeout = min(_IDLE_POLL, max(0.0, due - self._clock()) + 0.005)
        if self._inflight and self._capacity - len(self._inflight) < max(1, self._capacity // 4):
            timeout = _IDLE_POLL  # full: a finished send wakes the loop
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            failure(
                log,
                "channels",
                Reason.STEP_CRASHED,
                f"channel send raised {type(exc).__name__}",
                level=logging.ERROR,
                exc_info=exc,
            )

    async def _deliver(self, job: ChannelJob, incident: Incident, sightings: list[Sighting]) -> None:
        fields = {
            "incident_id": job.incident_id,
            "channel_id": job.channel_id,
            "channel_type": str(job.type),
            "event_state": str(job.state),
        }
        if job.uncertain:
            failure(
                log,
                "channels",
                Reason.RESEND_UNKNOWN_OUTCOME,
                "sending again: an earlier attempt died before recording whether it was delivered",
                context=fields,
            )
        if job.unsealable:
            attempt = Attempt(Reason.TOKEN_UNSEALABLE)
        else:
            build = cloud_event if job.type is ChannelType.WEBHOOK else slack_message
            attempt = await self.sender.send(job, build(job, incident, sightings), event_id(job))
        outcome = self._outcome(job, attempt)
        if not await self.store.finish_channel_event(self.holder, job, outcome):
            log.info("channel outcome superseded: the hold ran out mid-send", extra=fields)
            return
        DELIVERIES.labels(type=str(job.type), outcome=_label(outcome.status)).inc()
        if attempt.reason is None:
            log.info("channel event delivered", extra={**fields, "status": attempt.status})
            return
        reason = Reason.CHANNEL_GAVE_UP if outcome.status is ChannelStatus.GAVE_UP else attempt.reason
        failure(
            log,
            "channels",
            reason,
            f"channel event not delivered ({outcome.status})",
            status=attempt.status,
            attempt=job.attempts,
            context=fields,
        )

    def _outcome(self, job: ChannelJob, attempt: Attempt) -> ChannelOutcome:
        now = self._clock()
        detail = {
            "channel_id": job.channel_id,
            "channel_type": str(job.type),
            "event_state": str(job.state),
            "event_id": event_id(job),
            "attempt": job.attempts,
            "status": attempt.status,
        }
        if attempt.reason is None:
            return ChannelOutcome(ChannelStatus.SENT, "channel_delivered", detail, http_status=attempt.status)
        if attempt.reason in _FINAL:
            status, kind = _FINAL[attempt.reason]
            return ChannelOutcome(
                status, kind, {**detail, "reason": attempt.reason}, None, attempt.status, attempt.reason
            )
        assert attempt.retryable
        if now - job.created_at >= self._give_up_after:
            return ChannelOutcome(
                ChannelStatus.GAVE_UP,
                "channel_gave_up",
                {**detail, "reason": Reason.CHANNEL_GAVE_UP, "last_reason": attempt.reason},
                None,
                attempt.status,
                Reason.CHANNEL_GAVE_UP,
            )
        delay = backoff(job.attempts, *self._backoff, attempt.retry_after, self._rng)
        # The timeline shows the first failure of an event and its end, not every retry between.
        return ChannelOutcome(
            ChannelStatus.PENDING,
            "channel_retrying" if job.attempts == 1 else None,
            {**detail, "reason": attempt.reason, "retry_in": round(delay, 3)},
            now + delay,
            attempt.status,
            attempt.reason,
        )


def _label(status: ChannelStatus) -> str:
    return "retry" if status is ChannelStatus.PENDING else str(status)
