"""The store's reads for the operator console, held by SQLite and PostgreSQL alike: time-to-revoke
and time-to-confirm percentiles per time bucket, and the oldest unfinished incidents."""

from __future__ import annotations

import asyncio
import secrets

from service.store import AlertRecord, State, Store, Timed, TokenSighting, Transition
from tests.store.conftest import Backend

ALERT = AlertRecord("github", "0" * 64, 1)
HOUR = 3600.0


def key() -> str:
    return f"sm_{secrets.token_hex(20)}"


async def arrive(store: Store, backend: Backend, at: float, count: int = 1) -> list[str]:
    """`count` incidents created at `at` (the store stamps arrival with its clock)."""
    backend.clock.now = at
    items = [TokenSighting(key(), "supermemory_api_key", None, "content", "github") for _ in range(count)]
    return [r.id for r in await store.intake(ALERT, items, match_after=0)]


async def advance(store: Store, incident_id: str, *steps: tuple[State, State, dict[str, float]]) -> None:
    for expected, state, values in steps:
        assert await store.apply([Transition(incident_id, expected, str(state), state=state, set=values)])


def test_percentiles_per_bucket_of_revoke_and_confirm(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            since = 1_700_000_000.0
            # Bucket 0: ten incidents revoked after 1..10 s, confirmed 0.5 s after that.
            for took in range(1, 11):
                at = since + 60 * took
                (incident,) = await arrive(store, backend, at)
                await advance(
                    store,
                    incident,
                    (State.RECEIVED, State.REVOKED, {"revoked_at": at + took}),
                    (State.REVOKED, State.CONFIRMED, {"confirmed_at": at + took + 0.5}),
                )
            # Bucket 2: one revoked after 7 s, never confirmed; one never revoked at all.
            (lone,) = await arrive(store, backend, since + 2 * HOUR + 5)
            await advance(store, lone, (State.RECEIVED, State.REVOKED, {"revoked_at": since + 2 * HOUR + 12}))
            await arrive(store, backend, since + 2 * HOUR + 6)
            # Outside [since, until): just before, and exactly at the end.
            for outside in (since - 1, since + 3 * HOUR):
                (incident,) = await arrive(store, backend, outside)
                await advance(store, incident, (State.RECEIVED, State.REVOKED, {"revoked_at": outside + 99}))

            revoke = await store.percentiles(Timed.REVOKE, since, since + 3 * HOUR, HOUR)
            assert [(p.start, p.count) for p in revoke] == [(since, 10), (since + 2 * HOUR, 1)]
            assert (revoke[0].p50, revoke[0].p95) == (5.0, 10.0)
            assert (revoke[1].p50, revoke[1].p95) == (7.0, 7.0)

            confirm = await store.percentiles(Timed.CONFIRM, since, since + 3 * HOUR, HOUR)
            assert [(p.start, p.count, p.p50, p.p95) for p in confirm] == [(since, 10, 5.5, 10.5)]

            # One bucket as wide as the window is the window's own p50/p95.
            (whole,) = await store.percentiles(Timed.REVOKE, since, since + 3 * HOUR, 3 * HOUR)
            assert (whole.count, whole.p50, whole.p95) == (11, 6.0, 10.0)
            assert await store.percentiles(Timed.REVOKE, since + 5 * HOUR, since + 6 * HOUR, HOUR) == []

    asyncio.run(body())


def test_oldest_pending_skips_finished_incidents(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            start = 1_700_000_000.0
            closed, waiting, newer, newest = [(await arrive(store, backend, start + i))[0] for i in range(4)]
            await advance(
                store,
                closed,
                (State.RECEIVED, State.REVOKED, {"revoked_at": start + 1}),
                (State.REVOKED, State.CLOSED, {"closed_at": start + 2}),
            )
            backend.clock.now = start - 10
            await store.intake(
                ALERT, [TokenSighting("not-a-key", "supermemory_api_key", None, None, "github")], 0
            )
            await advance(store, newer, (State.RECEIVED, State.MATCHED, {"matched_at": start + 3}))

            assert [i.id for i in await store.oldest_pending(10)] == [waiting, newer, newest]
            assert [i.id for i in await store.oldest_pending(2)] == [waiting, newer]
            assert [i.state for i in await store.oldest_pending(2)] == [State.RECEIVED, State.MATCHED]

    asyncio.run(body())
