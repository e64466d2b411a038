"""The channel outbox, held by SQLite and PostgreSQL alike: a transition to a channel state writes
one event per channel (and a second write of it nothing), events of a channel go out in order, one
sender holds an event at a time (two replicas included), a 410 stops the channel, a sender whose hold
ran out finds its outcome refused, and `rewrap` reseals channel URLs and secrets."""

from __future__ import annotations

import asyncio
import os

from service.store import (
    ChannelOutcome,
    ChannelSpec,
    ChannelStatus,
    ChannelType,
    Sealer,
    State,
    Store,
    Transition,
)
from tests.store.conftest import Backend
from tests.store.test_contract import due_now, key, run

HOOK = ChannelSpec("wh", ChannelType.WEBHOOK, "https://hooks.example/a?token=url-secret", "whsec_c2VjcmV0")
CHAT = ChannelSpec("sl", ChannelType.SLACK, "https://hooks.slack.com/services/T/B/url-secret")


async def matched(store: Store, channels: list[ChannelSpec]) -> str:
    (incident_id,) = await due_now(store, [key()])
    await store.claim("w", 10, 30)
    t = Transition(
        incident_id, State.RECEIVED, "matched", lease_owner="w", state=State.MATCHED, channels=channels
    )
    assert await store.apply([t]) == [True]
    return incident_id


async def move(store: Store, incident_id: str, old: State, new: State) -> bool:
    (applied,) = await store.apply([Transition(incident_id, old, new.value, state=new)])
    return applied


def sent() -> ChannelOutcome:
    return ChannelOutcome(ChannelStatus.SENT, "channel_delivered", {"channel_id": "x"}, http_status=200)


def test_a_transition_writes_one_event_per_channel_in_order(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            incident_id = await matched(store, [HOOK, CHAT])
            assert await move(store, incident_id, State.MATCHED, State.REVOKED)
            assert not await move(store, incident_id, State.MATCHED, State.REVOKED), "fenced: no second write"
            jobs = await store.claim_channel_events("a", 10, 30)
            # Only the matched events: each channel's revoked event waits behind its matched one.
            assert sorted((j.channel_id, j.state) for j in jobs) == [
                ("sl", State.MATCHED),
                ("wh", State.MATCHED),
            ]
            hook = next(j for j in jobs if j.channel_id == "wh")
            assert (hook.url, hook.secret, hook.type, hook.attempts) == (
                HOOK.url,
                HOOK.secret,
                ChannelType.WEBHOOK,
                1,
            )
            assert await store.claim_channel_events("b", 10, 30) == [], "held"
            for job in jobs:
                assert await store.finish_channel_event("a", job, sent())
            nxt = await store.claim_channel_events("a", 10, 30)
            assert sorted((j.channel_id, j.state) for j in nxt) == [
                ("sl", State.REVOKED),
                ("wh", State.REVOKED),
            ]
            detail = await store.detail(incident_id)
            assert detail is not None
            assert [e.kind for e in detail.events].count("channel_delivered") == 2
            assert {(c.channel_id, c.state, c.status) for c in detail.channels} == {
                ("wh", "matched", ChannelStatus.SENT),
                ("sl", "matched", ChannelStatus.SENT),
                ("wh", "revoked", ChannelStatus.SENDING),
                ("sl", "revoked", ChannelStatus.SENDING),
            }

    run(body())


def test_an_unconfirmed_key_confirmed_late_tells_the_channels(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            incident_id = await matched(store, [HOOK])
            assert await move(store, incident_id, State.MATCHED, State.REVOKED)
            assert await move(store, incident_id, State.REVOKED, State.UNCONFIRMED)
            late = Transition(incident_id, State.UNCONFIRMED, "confirmed", state=State.CONFIRMED)
            assert await store.apply([late]) == [True]
            states = []
            while jobs := await store.claim_channel_events("a", 10, 30):
                for job in jobs:
                    states.append(job.state)
                    assert await store.finish_channel_event("a", job, sent())
            assert states == [State.MATCHED, State.REVOKED, State.UNCONFIRMED, State.CONFIRMED]

    run(body())


def test_a_lost_hold_is_taken_over_as_uncertain_and_its_late_outcome_refused(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            await matched(store, [HOOK])
            (first,) = await store.claim_channel_events("a", 10, 5)
            backend.clock.advance(6)
            (second,) = await store.claim_channel_events("b", 10, 5)
            assert (second.uncertain, second.attempts, first.uncertain) == (True, 2, False)
            assert not await store.finish_channel_event("a", first, sent()), "a's hold is gone"
            assert await store.finish_channel_event("b", second, sent())

    run(body())


def test_gone_stops_the_channel_for_the_incident(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            incident_id = await matched(store, [HOOK])
            assert await move(store, incident_id, State.MATCHED, State.REVOKED)
            (job,) = await store.claim_channel_events("a", 10, 30)
            gone = ChannelOutcome(ChannelStatus.GONE, "channel_gone", {}, None, 410, "channel_gone")
            assert await store.finish_channel_event("a", job, gone)
            assert await move(store, incident_id, State.REVOKED, State.CONFIRMED)
            assert await store.claim_channel_events("a", 10, 30) == []
            detail = await store.detail(incident_id)
            assert detail is not None
            assert [(c.state, c.status) for c in detail.channels] == [
                ("matched", ChannelStatus.GONE),
                ("revoked", ChannelStatus.GONE),
            ], "the waiting event dropped, none written for confirmed"

    run(body())


def test_two_replicas_never_hold_one_event(postgres: Backend) -> None:
    async def body() -> None:
        async with postgres.opened(2) as (one, two):
            for _ in range(20):
                await matched(one, [HOOK, CHAT])
            a, b = await asyncio.gather(
                one.claim_channel_events("a", 25, 30), two.claim_channel_events("b", 25, 30)
            )
            held = [(j.incident_id, j.channel_id) for j in a + b]
            assert len(held) == 40 == len(set(held))

    run(body())


def test_rewrap_reseals_channel_urls_and_secrets(backend: Backend) -> None:
    old, new = os.urandom(32), os.urandom(32)

    async def body() -> None:
        backend.sealer = Sealer(old)
        async with backend.opened() as (store,):
            await matched(store, [HOOK, CHAT])
        backend.sealer = Sealer(new, [old])
        async with backend.opened() as (store,):
            report = await store.rewrap(batch=1)
            assert (report.resealed, report.unopenable) == (3, []), "the token and both channels"
            assert (await store.rewrap()).resealed == 0
        backend.sealer = Sealer(new)  # the old key retired: everything opens without it
        async with backend.opened() as (store,):
            jobs = await store.claim_channel_events("a", 10, 30)
            assert sorted((j.url, j.secret) for j in jobs) == sorted(
                [(HOOK.url, HOOK.secret), (CHAT.url, None)]
            )

    run(body())


def test_a_channel_no_configured_key_opens_is_handed_out_unsealable(backend: Backend) -> None:
    """Not an error that would stop every other channel: the sender refuses that one event."""

    async def body() -> None:
        old = os.urandom(32)
        backend.sealer = Sealer(old)
        async with backend.opened() as (store,):
            (incident_id,) = await due_now(store, [key()])
            await store.claim("w", 10, 30)
            # The token wiped (as at close), so only the channels hold values sealed under `old`.
            t = Transition(incident_id, State.RECEIVED, "matched", lease_owner="w", state=State.MATCHED,
                           channels=[HOOK], wipe_token=True)  # fmt: skip
            assert await store.apply([t]) == [True]
        backend.sealer = Sealer(os.urandom(32))
        async with backend.opened() as (store,):
            (job,) = await store.claim_channel_events("a", 10, 30)
            assert (job.unsealable, job.url, job.secret) == (True, "", None)

    run(body())


def test_a_restart_takes_back_its_predecessors_holds_at_once(backend: Backend) -> None:
    """SQLite: whoever opens the file owns every hold in it; PostgreSQL: a replica restarting under
    its id owns its predecessor's, and another replica's stay held."""

    async def body() -> None:
        async with backend.opened() as (store,):
            await matched(store, [HOOK, CHAT])
            jobs = await store.claim_channel_events("r1/100-dead", 1, 300)
            others = await store.claim_channel_events("r2/200-live", 1, 300)
            assert len(jobs) == len(others) == 1
        async with backend.opened() as (store,):
            await store.reclaim("r1")
            taken = await store.claim_channel_events("r1/101-new", 10, 300)
            expected = [jobs[0].channel_id] if backend.kind == "postgres" else sorted(["wh", "sl"])
            assert sorted(j.channel_id for j in taken) == sorted(expected)
            assert all(j.uncertain for j in taken), "it may have gone out: sent again under its id"

    run(body())
