"""The store's contract, held by SQLite and PostgreSQL alike: what the app and the pipeline rely on.

Concurrency is part of the contract: two stores opened on one database stand for two replicas, and
must never make two incidents of one token, take one incident twice, or both win one delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from service.store import (
    AlertRecord,
    ChannelSpec,
    ChannelType,
    DeliveryStatus,
    IdempotencyState,
    Incident,
    IncidentFilter,
    IncidentRef,
    Label,
    Sealer,
    State,
    Store,
    StoreError,
    TokenSighting,
    Transition,
)
from service.store import postgres as postgres_store
from service.store.common import OFFLOAD_ITEMS, IntakePlan
from service.store.migrations import migrate_postgres as migrate
from service.store.migrations import migrations
from service.store.postgres import CHANNEL, PostgresStore
from service.store.sqlite import SQLITE, SqliteStore
from service.tokens import token_hash
from tests.harness import wait_until
from tests.store.conftest import Backend

ALERT = AlertRecord("github", "0" * 64, 1)


def key() -> str:
    return f"sm_{secrets.token_hex(20)}"


def sighting(token: str, url: str | None = "https://github.com/o/r/blob/main/.env") -> TokenSighting:
    return TokenSighting(token, "supermemory_api_key", url, "content", "github")


def run(body: Awaitable[None]) -> None:
    asyncio.run(body)  # type: ignore[arg-type]


async def due_now(store: Store, tokens: list[str]) -> list[str]:
    """Intake `tokens` scheduled at once (no request budget to wait for); their incident ids."""
    # Each call is its own alert: the same body twice would be one alert (a redelivery).
    alert = AlertRecord("github", hashlib.sha256("".join(tokens).encode()).hexdigest(), len(tokens))
    refs = await store.intake(alert, [sighting(t) for t in tokens], match_after=0)
    return [r.id for r in refs]


# -- intake ----------------------------------------------------------------------------------------


def test_intake_makes_one_incident_per_distinct_token(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            a, b = key(), key()
            items = [
                sighting(a),
                sighting("not-a-key"),
                sighting(a),
                sighting(a, url="https://x.test/2"),
                sighting(b),
            ]
            refs = await store.intake(ALERT, items, match_after=5)
            assert [r.token_hash for r in refs] == [token_hash(t) for t in (a, "not-a-key", b)]
            assert [r.created for r in refs] == [True, True, True]
            assert refs[0].state is State.RECEIVED and refs[0].label is None
            assert refs[1].state is State.FALSE_POSITIVE and refs[1].label is Label.FALSE_POSITIVE
            assert refs[0].redacted == f"{a[:7]}…{a[-4:]}"

            again = await store.intake(ALERT, [sighting(a)], match_after=5)
            assert again[0].id == refs[0].id and not again[0].created

            detail = await store.detail(refs[0].id)
            assert detail is not None
            # The repeated (token, url, source) of the first alert added nothing, nor did the
            # redelivery: a sighting is one per (incident, reporter, url, source).
            assert [s.url for s in detail.sightings] == [
                "https://github.com/o/r/blob/main/.env",
                "https://x.test/2",
            ]
            assert [e.kind for e in detail.events] == ["received"]
            assert detail.incident.has_token and detail.incident.next_run_at == backend.clock() + 5
            fp = await store.detail(refs[1].id)
            assert fp is not None and not fp.incident.has_token
            assert [e.kind for e in fp.events] == ["received", "false_positive"]

    run(body())


def test_two_replicas_taking_the_same_tokens_at_once_make_one_incident_each(backend: Backend) -> None:
    async def body() -> None:
        tokens = [key() for _ in range(40)]
        async with backend.opened(2) as (one, two):
            results = await asyncio.gather(
                *(
                    store.intake(ALERT, [sighting(t) for t in order], match_after=5)
                    for store, order in ((one, tokens), (two, tokens[::-1])) * 3
                )
            )
            by_hash: dict[str, set[str]] = {}
            created: dict[str, int] = {}
            for refs in results:
                for r in refs:
                    by_hash.setdefault(r.token_hash, set()).add(r.id)
                    created[r.token_hash] = created.get(r.token_hash, 0) + r.created
            assert len(by_hash) == len(tokens)
            assert all(len(ids) == 1 for ids in by_hash.values())
            assert set(created.values()) == {1}
            stats = await one.stats()
            assert stats.incidents_by_state == {"received": len(tokens)}

    run(body())


def not_a_key(ref: IncidentRef) -> Transition:
    """What the lookup's "unknown hash" makes of an incident (as Steps.matched decides it)."""
    return Transition(
        ref.id,
        State.RECEIVED,
        "false_positive",
        state=State.FALSE_POSITIVE,
        wipe_token=True,
        set={"label": Label.FALSE_POSITIVE, "last_reason": "not_a_key"},
        detail={"reason": "not_a_key"},
    )


def test_intake_applies_the_decided_transitions_in_its_own_transaction(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            shaped, decided = key(), []

            def decide(ref: IncidentRef) -> Transition:
                decided.append(ref.token_hash)
                return not_a_key(ref)

            refs = await store.intake(ALERT, [sighting(shaped), sighting("nope")], 0, decide)
            # Only the incident still in `received` is decided; the shape gate's is final already.
            assert decided == [token_hash(shaped)]
            assert [(r.state, r.label, r.created) for r in refs] == [
                (State.FALSE_POSITIVE, Label.FALSE_POSITIVE, True)
            ] * 2
            assert refs[0].applied is not None and refs[0].applied.event == "false_positive"
            assert refs[1].applied is None
            detail = await store.detail(refs[0].id)
            assert detail is not None and not detail.incident.has_token
            assert detail.incident.last_reason == "not_a_key" and detail.incident.next_run_at is None
            assert [e.kind for e in detail.events] == ["received", "false_positive"]

    run(body())


def matched_at_intake(ref: IncidentRef) -> Transition:
    """A key match with everything a transition can write on a row: columns, JSON, a page, channels."""
    return Transition(
        ref.id,
        State.RECEIVED,
        "matched",
        state=State.MATCHED,
        next_run_at=123.0,
        set={
            "label": Label.TRUE_POSITIVE,
            "key_id": "key_1",
            "org_id": "org_1",
            "recipients": [{"email": "owner@example.test", "name": "Owner"}],
            "matched_at": 120,
            "attempts": 0,
            "key_created_at": 100.5,
        },
        detail={"key_id": "key_1", "enabled": True, "channels": 1},
        page="key_matched",
        channels=[ChannelSpec("wh", ChannelType.WEBHOOK, "https://hooks.example/a", "whsec_c2VjcmV0")],
    )


@pytest.mark.parametrize("decide", [not_a_key, matched_at_intake], ids=["not_a_key", "matched"])
def test_a_new_incident_decided_at_intake_is_the_row_its_transition_leaves(
    backend: Backend, decide: Callable[[IncidentRef], Transition]
) -> None:
    """A new incident decided by its intake is inserted as the decision leaves it: the same row,
    timeline and outbox as one received first and moved on by the same transition afterwards."""

    async def body() -> None:
        async with backend.opened() as (store,):
            direct, stepwise, beside, undecided = key(), key(), key(), key()
            # Two decided alike in one intake, one's key creation time a whole number and the other's
            # not, beside one left undecided (its lookup missed the budget): rows of other columns.
            whole = {token_hash(beside)}

            def deciding(ref: IncidentRef) -> Transition | None:
                if ref.token_hash == token_hash(undecided):
                    return None
                t = decide(ref)
                if "key_created_at" in t.set and ref.token_hash in whole:
                    t.set["key_created_at"] = 100
                return t

            items = [sighting(direct), sighting(beside), sighting(undecided)]
            ref, _, waiting = await store.intake(ALERT, items, 0, deciding)
            assert (waiting.state, waiting.applied, await store.reveal_token(waiting.id)) == (
                State.RECEIVED,
                None,
                undecided,
            )
            (received,) = await store.intake(AlertRecord("github", "1" * 64, 1), [sighting(stepwise)], 0)
            assert await store.apply([decide(received)]) == [True]
            assert (ref.state, ref.applied is not None) == (decide(received).state, True)
            one, other = await store.detail(ref.id), await store.detail(received.id)
            assert one is not None and other is not None

            def row(incident: Incident) -> dict[str, object]:
                return {
                    k: v
                    for k, v in dataclasses.asdict(incident).items()
                    if k not in ("id", "token_hash", "redacted", "created_at")
                }

            assert row(one.incident) == row(other.incident)
            assert [(e.kind, e.state, e.detail) for e in one.events] == [
                (e.kind, e.state, e.detail) for e in other.events
            ]
            assert [(c.channel_id, c.state, c.status) for c in one.channels] == [
                (c.channel_id, c.state, c.status) for c in other.channels
            ]
            # A kept token is sealed and opens; a wiped one was never stored.
            assert await store.reveal_token(ref.id) == (
                None if one.incident.state is State.FALSE_POSITIVE else direct
            )

    run(body())


def test_a_new_incidents_token_is_sealed_only_if_its_decision_keeps_it() -> None:
    """Most of a big alert's tokens are no key: sealing waits for the decision, and a wiped token is
    never sealed at all."""

    class Recording(Sealer):
        def __init__(self) -> None:
            super().__init__(os.urandom(32))
            self.sealed: list[str] = []

        def seal(self, plain: str, associated: str) -> bytes:
            self.sealed.append(plain)
            return super().seal(plain, associated)

    sealer = Recording()
    plan = IntakePlan.prepare([sighting(t) for t in (key(), key(), key())], sealer, 0.0, 0.0)
    wiped, kept, undecided = plan.candidates.values()
    assert sealer.sealed == []
    assert wiped.row(0.0, not_a_key(wiped.ref()), SQLITE, sealer)["token_sealed"] is None
    assert sealer.sealed == []
    for new, decided in ((kept, matched_at_intake(kept.ref())), (undecided, None)):
        blob = new.row(0.0, decided, SQLITE, sealer)["token_sealed"]
        assert sealer.open(blob, new.token_hash, sealer.current) == new.token
    assert sealer.sealed == [kept.token, undecided.token]


def test_a_new_incidents_transition_must_expect_it_as_created() -> None:
    """On a new row the fence holds by construction, so a transition that expects another state or a
    lease is a mistake in the caller, refused rather than written."""
    (new,) = IntakePlan.prepare([sighting(key())], Sealer(os.urandom(32)), 0.0, 0.0).candidates.values()
    sealer = Sealer(os.urandom(32))
    for wrong in (
        Transition(new.id, State.MATCHED, "revoked", state=State.REVOKED),
        Transition(new.id, State.RECEIVED, "matched", lease_owner="w", state=State.MATCHED),
    ):
        with pytest.raises(ValueError, match="expect it as created"):
            new.row(0.0, wrong, SQLITE, sealer)


def test_a_redelivery_keeps_the_label_and_decides_only_what_is_still_received(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            labelled, waiting = key(), key()
            await store.intake(ALERT, [sighting(labelled)], 0, not_a_key)
            await store.intake(ALERT, [sighting(waiting)], 0)  # its lookup missed the budget
            decided: list[str] = []

            def decide(ref: IncidentRef) -> Transition:
                decided.append(ref.token_hash)
                return not_a_key(ref)

            again = await store.intake(ALERT, [sighting(labelled), sighting(waiting)], 0, decide)
            assert decided == [token_hash(waiting)]
            assert [(r.created, r.label) for r in again] == [(False, Label.FALSE_POSITIVE)] * 2
            detail = await store.detail(again[0].id)
            assert detail is not None and [e.kind for e in detail.events] == ["received", "false_positive"]

    run(body())


def test_an_intake_whose_decision_fails_records_nothing(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            token = key()

            def broken(ref: IncidentRef) -> Transition:
                raise RuntimeError("a bug in a decision")

            with pytest.raises(RuntimeError):
                await store.intake(ALERT, [sighting(token)], 0, broken)
            stats = await store.stats()
            assert stats.incidents_by_state == {}
            (ref,) = await store.intake(ALERT, [sighting(token)], 0)
            assert ref.created

    run(body())


def test_two_replicas_deciding_the_same_tokens_at_once_apply_each_decision_once(backend: Backend) -> None:
    async def body() -> None:
        tokens = [key() for _ in range(20)]
        async with backend.opened(2) as (one, two):
            # Already known and still received (their first lookup missed the budget): each intake
            # below reads them as received and decides, and only one decision per token may apply.
            await one.intake(ALERT, [sighting(t) for t in tokens], 0)
            results = await asyncio.gather(
                *(
                    store.intake(ALERT, [sighting(t) for t in order], 0, not_a_key)
                    for store, order in ((one, tokens), (two, tokens[::-1])) * 3
                )
            )
            applied: dict[str, int] = {}
            for refs in results:
                for r in refs:
                    applied[r.token_hash] = applied.get(r.token_hash, 0) + (r.applied is not None)
                    assert r.label is Label.FALSE_POSITIVE or r.state is State.RECEIVED
            assert set(applied.values()) == {1}
            stats = await one.stats()
            assert stats.incidents_by_state == {"false_positive": len(tokens)}
            for refs in results[:1]:
                for r in refs:
                    detail = await one.detail(r.id)
                    assert detail is not None
                    assert [e.kind for e in detail.events] == ["received", "false_positive"]

    run(body())


async def lock_waits(conn: psycopg.AsyncConnection[tuple[int]]) -> int:
    """How many transactions of the server wait for another's row."""
    cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
    (count,) = await cur.fetchone() or (0,)
    return int(count)


def test_a_token_another_replica_creates_meanwhile_is_decided_once_as_read(postgres: Backend) -> None:
    """PostgreSQL decides a new token before inserting it; when another replica creates the token in
    between, that decision (made for a row this intake would have created) is dropped, and the row
    read back is decided as read: one decision applied, on the row that exists."""

    async def body() -> None:
        async with postgres.opened() as (store,):
            token, decided = key(), []

            def decide(ref: IncidentRef) -> Transition:
                decided.append(ref.id)
                return not_a_key(ref)

            assert postgres.url is not None
            async with await psycopg.AsyncConnection.connect(postgres.url) as other:
                async with other.transaction():
                    # The other replica's insert of the token, not committed yet.
                    await other.execute(
                        "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at)"
                        " VALUES ('inc_other', %s, 'sm_…', 'supermemory_api_key', 'received', 1.0)",
                        [token_hash(token)],
                    )
                    intake = asyncio.ensure_future(store.intake(ALERT, [sighting(token)], 0, decide))
                    while not await lock_waits(other):
                        assert not intake.done(), "the intake must wait on the other replica's row"
                        await asyncio.sleep(0.01)
                (ref,) = await intake
            assert decided[1:] == ["inc_other"] and decided[0] != "inc_other"
            assert (ref.id, ref.created, ref.state, ref.applied is not None) == (
                "inc_other",
                False,
                State.FALSE_POSITIVE,
                True,
            )
            detail = await store.detail("inc_other")
            assert detail is not None and detail.incident.state is State.FALSE_POSITIVE
            assert [e.kind for e in detail.events] == ["false_positive"]
            assert (await store.stats()).incidents_by_state == {"false_positive": 1}

    run(body())


def test_concurrent_intakes_record_each_alert_with_its_own_sightings(backend: Backend) -> None:
    """Intakes arriving together may share a transaction (PostgreSQL batches them, SQLite groups
    its commits): each alert still gets its own record, its own sightings and its own count."""

    async def body() -> None:
        shared, own = key(), [key() for _ in range(12)]
        async with backend.opened() as (store,):
            results = await asyncio.gather(
                *(
                    store.intake(
                        AlertRecord("github", f"{n:064x}", 2),
                        [sighting(shared, f"https://x.test/{n}"), sighting(own[n], f"https://x.test/{n}")],
                        0,
                    )
                    for n in range(12)
                )
            )
        assert sum(refs[0].created for refs in results) == 1
        assert all(refs[1].created for refs in results)
        assert len({refs[0].id for refs in results}) == 1
        rows = backend.query(
            "SELECT a.body_sha256, a.new_incidents, s.url, i.token_hash FROM sightings s"
            " JOIN alerts a ON a.id = s.alert_id JOIN incidents i ON i.id = s.incident_id"
        )
        assert len(rows) == 24
        for body_sha256, _, url, digest in rows:
            n = int(str(body_sha256), 16)
            assert url == f"https://x.test/{n}"
            assert digest in (token_hash(shared), token_hash(own[n]))
        assert sorted({(r[0], r[1]) for r in rows}, key=lambda r: r[1]) == sorted(
            {(f"{n:064x}", 1 + (results[n][0].created)) for n in range(12)}, key=lambda r: r[1]
        )

    run(body())


def test_a_failing_intake_among_concurrent_ones_fails_alone(backend: Backend) -> None:
    async def body() -> None:
        tokens = [key() for _ in range(6)]

        def broken(ref: IncidentRef) -> Transition:
            raise RuntimeError("a bug in one decision")

        async with backend.opened() as (store,):
            results = await asyncio.gather(
                *(
                    store.intake(ALERT, [sighting(t)], 0, broken if n == 3 else not_a_key)
                    for n, t in enumerate(tokens)
                ),
                return_exceptions=True,
            )
            assert isinstance(results[3], RuntimeError)
            for n, refs in enumerate(results):
                if n != 3:
                    assert isinstance(refs, list) and refs[0].label is Label.FALSE_POSITIVE
            stats = await store.stats()
            assert stats.incidents_by_state == {"false_positive": 5}

    run(body())


def test_one_token_in_concurrent_intakes_is_decided_once(backend: Backend) -> None:
    async def body() -> None:
        token = key()
        async with backend.opened() as (store,):
            results = await asyncio.gather(
                *(store.intake(ALERT, [sighting(token)], 0, not_a_key) for _ in range(8))
            )
            assert [refs[0].label for refs in results] == [Label.FALSE_POSITIVE] * 8
            assert sum(refs[0].applied is not None for refs in results) == 1
            assert sum(refs[0].created for refs in results) == 1
            detail = await store.detail(results[0][0].id)
            assert detail is not None
            assert [e.kind for e in detail.events] == ["received", "false_positive"]
            # The same alert eight times is one alert and one sighting (a replay grows nothing).
            assert len(detail.sightings) == 1

    run(body())


# -- claims and leases -----------------------------------------------------------------------------


def test_claim_takes_due_work_under_a_lease_and_an_expired_lease_is_retaken(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            (incident_id,) = [r.id for r in await store.intake(ALERT, [sighting(key())], match_after=5)]
            assert await store.claim("a", 10, lease=30) == []
            assert await store.next_due() == pytest.approx(clock() + 5)
            clock.advance(5)
            (claimed,) = await store.claim("a", 10, lease=30)
            assert claimed.id == incident_id and claimed.state is State.RECEIVED
            assert await store.claim("b", 10, lease=30) == []
            assert await store.next_due() == pytest.approx(clock() + 30)

            clock.advance(31)
            (retaken,) = await store.claim("b", 10, lease=30)
            assert retaken.id == incident_id
            late = Transition(incident_id, State.RECEIVED, "matched", lease_owner="a", state=State.MATCHED)
            assert await store.apply([late]) == [False]
            mine = Transition(incident_id, State.RECEIVED, "matched", lease_owner="b", state=State.MATCHED)
            assert await store.apply([mine]) == [True]

    run(body())


def test_concurrent_claimers_never_take_the_same_incident(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened(2) as (one, two):
            ids = await due_now(one, [key() for _ in range(150)])
            taken: dict[str, list[str]] = {"one": [], "two": []}

            async def claimer(store: Store, owner: str) -> None:
                while batch := await store.claim(owner, 7, lease=60):
                    taken[owner] += [i.id for i in batch]
                    await asyncio.sleep(0)

            await asyncio.gather(*(claimer(s, o) for s, o in ((one, "one"), (two, "two"), (one, "one"))))
            assert not set(taken["one"]) & set(taken["two"])
            everything = taken["one"] + taken["two"]
            assert sorted(everything) == sorted(ids)

    run(body())


def test_release_hands_leases_back_and_resume_schedules_parked_work(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            ids = await due_now(store, [key(), key()])
            assert len(await store.claim("a", 10, lease=60)) == 2
            await store.release("a")
            assert len(await store.claim("b", 10, lease=60)) == 2

            # Parked: applied with no next run (dry-run, or no notifier configured).
            parked = [
                Transition(i, State.RECEIVED, "matched", lease_owner="b", state=State.MATCHED) for i in ids
            ]
            assert await store.apply(parked) == [True, True]
            assert await store.claim("b", 10, lease=60) == []
            assert await store.resume(State.MATCHED) == 2
            assert {i.id for i in await store.claim("b", 10, lease=60)} == set(ids)

    run(body())


# -- fenced transitions and the audit trail ----------------------------------------------------------


def test_apply_is_fenced_by_state_and_lease_and_records_an_event(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            token = key()
            (incident_id,) = await due_now(store, [token])
            await store.claim("w", 1, lease=60)
            recipients = [{"email": "owner@example.test", "name": "Owner"}]
            match = Transition(
                incident_id,
                State.RECEIVED,
                "matched",
                lease_owner="w",
                state=State.MATCHED,
                next_run_at=clock(),
                set={"label": Label.TRUE_POSITIVE, "key_id": "key_1", "recipients": recipients,
                     "matched_at": clock(), "revoke_reissued": True},
                detail={"key_id": "key_1"},
                page="revocation_failed",
            )  # fmt: skip
            wrong_state = Transition(incident_id, State.REVOKED, "revoked", state=State.CONFIRMED)
            wrong_owner = Transition(
                incident_id, State.RECEIVED, "matched", lease_owner="x", state=State.MATCHED
            )
            assert await store.apply([wrong_state, wrong_owner, match]) == [False, False, True]
            # Applied once: the same step's outcome a second time is superseded.
            assert await store.apply([match]) == [False]

            (incident,) = await store.incidents([incident_id])
            assert incident.state is State.MATCHED and incident.label is Label.TRUE_POSITIVE
            assert incident.recipients == recipients and incident.key_id == "key_1"
            assert incident.revoke_reissued and incident.pages == {"revocation_failed"}
            assert incident.next_run_at == clock()
            another_page = Transition(incident_id, State.MATCHED, "paged", page="unconfirmed")
            assert await store.apply([another_page]) == [True]
            (incident,) = await store.incidents([incident_id])
            assert incident.pages == {"revocation_failed", "unconfirmed"}

            detail = await store.detail(incident_id)
            assert detail is not None
            assert [(e.kind, e.state) for e in detail.events] == [
                ("received", State.RECEIVED),
                ("matched", State.MATCHED),
                ("paged", None),
            ]
            assert detail.events[1].detail == {"key_id": "key_1"}
            with pytest.raises(ValueError, match="may not set"):
                await store.apply([Transition(incident_id, State.MATCHED, "x", set={"token_hash": "x"})])

    run(body())


def test_reveal_token_until_close_wipes_it(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            token = key()
            (incident_id,) = await due_now(store, [token])
            assert await store.reveal_token(incident_id) == token
            assert await store.reveal_token("inc_missing") is None
            close = Transition(incident_id, State.RECEIVED, "closed", state=State.CLOSED, wipe_token=True)
            assert await store.apply([close]) == [True]
            assert await store.reveal_token(incident_id) is None
            (incident,) = await store.incidents([incident_id])
            assert not incident.has_token and incident.token_hash == token_hash(token)

    run(body())


@pytest.mark.parametrize("statement", ["UPDATE events SET kind = 'forged'", "DELETE FROM events"])
def test_events_are_append_only_in_the_database_itself(backend: Backend, statement: str) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            await due_now(store, [key()])

    run(body())
    with pytest.raises(Exception, match="append-only"):
        backend.execute(statement)


def test_a_replayed_alert_is_one_alert_and_one_sighting_per_place(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            a = key()
            first = await store.intake(ALERT, [sighting(a), sighting(a, url=None)], match_after=5)
            for _ in range(20):
                again = await store.intake(ALERT, [sighting(a), sighting(a, url=None)], match_after=5)
                assert [r.id for r in again] == [r.id for r in first]
            # Another alert (another body) seeing the token at a place already known adds nothing
            # either; at a new place it adds that place.
            other = AlertRecord("github", "9" * 64, 1)
            await store.intake(other, [sighting(a)], match_after=5)
            await store.intake(other, [sighting(a, url="https://x.test/new")], match_after=5)
            detail = await store.detail(first[0].id)
            assert detail is not None
            assert sorted(str(s.url) for s in detail.sightings) == [
                "None",
                "https://github.com/o/r/blob/main/.env",
                "https://x.test/new",
            ]
            assert (await store.stats()).incidents_by_state == {"received": 1}

    run(body())
    assert backend.query("SELECT count(*) FROM alerts") == [(2,)]


def test_purge_of_sightings_that_become_one_place(backend: Backend) -> None:
    """Two URLs of one place (incident, reporter, source) are one sighting once the URLs go."""

    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            a = "not-a-key"  # a false positive: over at once, so purged
            urls = ["https://x.test/1", "https://x.test/2", None]
            (ref,) = await store.intake(ALERT, [sighting(a, url=u) for u in urls], match_after=0)
            clock.advance(100)
            assert await store.purge_reporter_metadata(finished_before=clock() - 50) == 1
            detail = await store.detail(ref.id)
            assert detail is not None
            assert [s.url for s in detail.sightings] == [None]
            assert detail.events[-1].detail == {"sightings": 2}

    run(body())


# -- telling owners ------------------------------------------------------------------------------------


def test_alert_siblings_sightings_and_wake(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            first = await due_now(store, [key(), key()])
            later = await due_now(store, [key()])
            # A later alert repeating a token does not pull it into that alert's group.
            await store.intake(ALERT, [sighting(k) for k in [key()]], match_after=0)
            siblings = await store.alert_siblings([first[0], later[0]])
            assert {i.id for i in siblings[first[0]]} == set(first)
            assert [i.id for i in siblings[later[0]]] == later
            assert await store.alert_siblings([]) == {}

            found = await store.sightings([first[0], "inc_missing"])
            assert len(found[first[0]]) == 1 and found["inc_missing"] == []

            wait = Transition(first[1], State.RECEIVED, "waiting", next_run_at=clock() + 100)
            assert await store.apply([wait]) == [True]
            await store.wake([first[1]])
            (incident,) = await store.incidents([first[1]])
            assert incident.next_run_at == clock()

    run(body())


def test_deliveries_are_held_by_one_sender_and_an_expired_hold_is_uncertain(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            a, b = await due_now(store, [key(), key()])
            to = "owner@example.test"
            first = await store.reserve_deliveries("s1", to, "owner", [a, b], hold=30)
            assert first.taken == [a, b] and first.uncertain == []
            assert (await store.reserve_deliveries("s2", to, "owner", [a, b], hold=30)).taken == []
            # Another purpose or recipient is another row.
            assert (await store.reserve_deliveries("s2", to, "refusal", [a], hold=30)).taken == [a]

            await store.finish_deliveries("s1", to, "owner", [a], DeliveryStatus.SENT, "<m@x>", None)
            await store.finish_deliveries("s2", to, "owner", [b], DeliveryStatus.SENT, "<m@y>", None)
            rows = {(d.incident_id, d.purpose): d for d in await store.deliveries([a, b])}
            assert rows[(a, "owner")].status is DeliveryStatus.SENT
            assert rows[(a, "owner")].message_id == "<m@x>"
            # Only the holder records an outcome: s2 never held b's owner row.
            assert rows[(b, "owner")].status is DeliveryStatus.SENDING

            clock.advance(31)
            again = await store.reserve_deliveries("s3", to, "owner", [a, b], hold=30)
            assert again.taken == [b] and again.uncertain == [b]
            await store.finish_deliveries("s3", to, "owner", [b], DeliveryStatus.PENDING, None, "smtp_down")
            retry = await store.reserve_deliveries("s4", to, "owner", [b], hold=30)
            assert retry.taken == [b] and retry.uncertain == []
            (row,) = [d for d in await store.deliveries([b]) if d.purpose == "owner"]
            assert row.attempts == 3 and row.status is DeliveryStatus.SENDING

    run(body())


def test_two_replicas_reserving_the_same_deliveries_split_them(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened(2) as (one, two):
            ids = await due_now(one, [key() for _ in range(30)])
            results = await asyncio.gather(
                *(
                    store.reserve_deliveries(holder, "owner@example.test", "owner", order, hold=30)
                    for store, holder, order in ((one, "h1", ids), (two, "h2", ids[::-1]), (one, "h3", ids))
                )
            )
            taken = [i for r in results for i in r.taken]
            assert sorted(taken) == sorted(ids)

    run(body())


# -- Idempotency-Key ---------------------------------------------------------------------------------


def test_idempotency_keys(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened(2) as (store, other):
            assert await store.begin_idempotent("ops", "k1", "fp", ttl=3600, stale_after=60) is None
            running = await store.begin_idempotent("ops", "k1", "fp", ttl=3600, stale_after=60)
            assert running is not None and running.state is IdempotencyState.RUNNING
            await store.finish_idempotent("ops", "k1", 200, b'{"ok":true}')
            done = await other.begin_idempotent("ops", "k1", "fp", ttl=3600, stale_after=60)
            assert done is not None and (done.state, done.status, done.response) == (
                IdempotencyState.DONE,
                200,
                b'{"ok":true}',
            )
            # Another operator's key of the same name is another key.
            assert await store.begin_idempotent("sec", "k1", "fp", ttl=3600, stale_after=60) is None

            await store.drop_idempotent("ops", "k1")
            assert await store.begin_idempotent("ops", "k1", "fp2", ttl=3600, stale_after=60) is None
            clock.advance(61)
            # Still running after stale_after: its process died mid-request, so it is taken over.
            assert await store.begin_idempotent("ops", "k1", "fp2", ttl=3600, stale_after=60) is None
            clock.advance(3600)
            assert await store.begin_idempotent("ops", "k1", "fp3", ttl=3600, stale_after=60) is None

            racing = await asyncio.gather(
                *(
                    s.begin_idempotent("ops", "race", "fp", ttl=3600, stale_after=60)
                    for s in (store, other) * 3
                )
            )
            assert sum(r is None for r in racing) == 1

    run(body())


# -- housekeeping, reads and metrics ---------------------------------------------------------------------


def test_purge_forgets_urls_of_incidents_long_over(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            closed, still_open = await due_now(store, [key(), key()])
            false_positive = (await store.intake(ALERT, [sighting("nope")], match_after=0))[0].id
            await store.begin_idempotent("ops", "old", "fp", ttl=10, stale_after=5)
            close = Transition(
                closed, State.RECEIVED, "closed", state=State.CLOSED, set={"closed_at": clock()}
            )
            assert await store.apply([close]) == [True]

            assert await store.purge_reporter_metadata(finished_before=clock() - 1) == 0
            clock.advance(100)
            assert await store.purge_reporter_metadata(finished_before=clock() - 50) == 2
            for incident_id, purged in ((closed, True), (false_positive, True), (still_open, False)):
                detail = await store.detail(incident_id)
                assert detail is not None
                assert all((s.url is None) == purged for s in detail.sightings)
                assert ("reporter_metadata_purged" in [e.kind for e in detail.events]) == purged
            assert await store.purge_reporter_metadata(finished_before=clock()) == 0
            # The expired Idempotency-Key went in the same sweep.
            assert await store.begin_idempotent("ops", "old", "other", ttl=10, stale_after=5) is None

    run(body())


def test_stats_next_due_and_listing(backend: Backend) -> None:
    async def body() -> None:
        clock = backend.clock
        async with backend.opened() as (store,):
            assert await store.next_due() is None
            empty = await store.stats()
            assert (empty.incidents_by_state, empty.pending, empty.oldest_pending_age, empty.due) == (
                {},
                0,
                0.0,
                0,
            )
            ids = await due_now(store, [key(), key()])
            await store.intake(ALERT, [sighting("nope")], match_after=0)
            later = (
                await store.intake(AlertRecord("gitlab", "1" * 64, 1), [sighting(key())], match_after=60)
            )[0]
            clock.advance(10)
            stats = await store.stats()
            assert stats.incidents_by_state == {"received": 3, "false_positive": 1}
            assert stats.pending == 3 and stats.due == 2
            assert stats.oldest_pending_age == pytest.approx(10)
            assert await store.next_due() == pytest.approx(clock() - 10)

            newest_first = await store.list_incidents(IncidentFilter(state=State.RECEIVED))
            assert [i.id for i in newest_first] == sorted([*ids, later.id], reverse=True)
            page = await store.list_incidents(IncidentFilter(state=State.RECEIVED, limit=1))
            rest = await store.list_incidents(IncidentFilter(state=State.RECEIVED, before_id=page[0].id))
            assert [i.id for i in page + rest] == [i.id for i in newest_first]
            assert [i.id for i in await store.list_incidents(IncidentFilter(reporter="gitlab"))] == []
            assert await store.list_incidents(IncidentFilter(since=clock())) == []
            assert await store.incidents([]) == [] and await store.detail("inc_missing") is None
            await store.ping()

    run(body())


def failures(stage: str, reason: str) -> float:
    """This process's `leak_responder_failures_total` for one stage and reason."""
    labels = {"stage": stage, "reason": reason}
    return REGISTRY.get_sample_value("leak_responder_failures_total", labels) or 0.0


def reported(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "reason", None) == reason]


# -- SQLite only: the group commit -------------------------------------------------------------------------


def test_a_failed_commit_refuses_every_write_of_its_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deferred foreign key still violated at the end of a group makes SQLite refuse the COMMIT
    itself, after every write's savepoint went through: the whole group is rolled back, each of its
    writes is refused (the app answers 503, a reporter redelivers), and the next group commits."""
    sqlite = Backend("sqlite", tmp_path, None)
    gate, holding = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        # Keeps the single writer busy until both writes below are queued: they make one group.
        holding.set()
        gate.wait(10)

    def orphan(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA defer_foreign_keys = ON")
        conn.execute(
            "INSERT INTO sightings (incident_id, alert_id, reporter, token_type, seen_at)"
            " VALUES ('inc_missing', 0, 'github', 'supermemory_api_key', 0)"
        )

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            first = asyncio.create_task(store._write(hold))
            await asyncio.to_thread(holding.wait, 10)
            intake = asyncio.create_task(store.intake(ALERT, [sighting(key())], match_after=5))
            broken = asyncio.create_task(store._write(orphan))
            await asyncio.sleep(0)  # each queues its write before its first await
            gate.set()
            await first
            for write in (intake, broken):
                with pytest.raises(StoreError, match="commit failed: FOREIGN KEY constraint failed"):
                    await write
            assert (await store.stats()).incidents_by_state == {}
            await store.intake(ALERT, [sighting(key())], match_after=5)
            assert (await store.stats()).incidents_by_state == {"received": 1}

    before = failures("store", "store_commit_failed")
    run(body())
    (record,) = reported(caplog, "store_commit_failed")
    assert (record.stage, record.levelname) == ("store", "ERROR")
    assert failures("store", "store_commit_failed") == before + 1


def test_a_bulky_intake_commits_alone_after_the_writes_queued_beside_it(tmp_path: Path) -> None:
    """A big alert's part (more than OFFLOAD_ITEMS tokens) waits in the writer for the small writes
    queued behind it, then commits in a transaction of its own: a small alert is not held for it."""
    sqlite = Backend("sqlite", tmp_path, None)
    gate, holding = threading.Event(), threading.Event()
    finished: list[str] = []

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        gate.wait(10)

    async def queued(count: int, store: SqliteStore) -> None:
        await asyncio.to_thread(wait_until, lambda: store._queue.qsize() >= count, 10, 0.005)

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            first = asyncio.create_task(store._write(hold))
            await asyncio.to_thread(holding.wait, 10)
            part = [sighting(key()) for _ in range(OFFLOAD_ITEMS + 1)]
            bulky = asyncio.create_task(store.intake(AlertRecord("github", "b" * 64, len(part)), part, 5))
            await queued(1, store)
            small = asyncio.create_task(store.intake(ALERT, [sighting(key())], match_after=5))
            await queued(2, store)
            for name, task in (("bulky", bulky), ("small", small)):
                task.add_done_callback(lambda _, name=name: finished.append(name))
            gate.set()
            await asyncio.gather(first, bulky, small)

    run(body())
    assert finished == ["small", "bulky"]


# -- PostgreSQL only: migrations and wake-ups across processes ---------------------------------------------


# SQLite has one process: it migrates at open and wakes its worker in-process.


def test_a_big_alerts_part_is_batched_alone_and_small_intakes_up_to_it() -> None:
    """PostgreSQL batches queued intakes into one transaction; a big alert's part (more than
    OFFLOAD_ITEMS tokens) goes alone, so that no small alert waits for its statements."""

    def queued(size: int) -> postgres_store._Intake:
        plan = IntakePlan({f"{size}-{n}": None for n in range(size)})  # type: ignore[misc]
        return postgres_store._Intake(ALERT, [], plan, None, None)  # type: ignore[arg-type]

    small, part = 1, OFFLOAD_ITEMS + 1
    queue = [queued(n) for n in (small, small, part, small, part, part, small)]
    sizes = []
    while queue:
        sizes.append([len(i.plan.candidates) for i in postgres_store._next_batch(queue)])
    assert sizes == [[small, small], [part], [small], [part], [part], [small]]


def test_watch_wakes_other_replicas_when_a_commit_makes_work_due(postgres: Backend) -> None:
    async def body() -> None:
        async with postgres.opened(2) as (one, two):
            woken = {"one": asyncio.Event(), "two": asyncio.Event()}
            await one.watch(woken["one"].set)
            await two.watch(woken["two"].set)
            for event in woken.values():
                await asyncio.wait_for(event.wait(), 10)  # the wake that follows (re)connecting
                event.clear()
            (ref,) = await one.intake(ALERT, [sighting(key())], match_after=60)
            matched = Transition(
                ref.id, State.RECEIVED, "matched", state=State.MATCHED, next_run_at=postgres.clock()
            )
            assert await one.apply([matched]) == [True]
            await asyncio.wait_for(woken["two"].wait(), 10)
            # Its own commit woke `one` in-process already: its notification is not echoed back.
            await asyncio.sleep(0.2)
            assert not woken["one"].is_set()

    run(body())


def test_a_lost_listen_connection_is_store_listen_lost_and_wake_ups_resume(
    postgres: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with postgres.opened(2) as (one, two):
            woken = asyncio.Event()
            await two.watch(woken.set)
            await asyncio.wait_for(woken.wait(), 10)  # listening
            woken.clear()
            async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as admin:
                ended = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query = %s",
                    (f"LISTEN {CHANNEL}",),
                )
                assert await ended.fetchall() == [(True,)]
            await asyncio.wait_for(woken.wait(), 10)  # listening again, and catching up
            woken.clear()
            (ref,) = await one.intake(ALERT, [sighting(key())], match_after=60)
            matched = Transition(
                ref.id, State.RECEIVED, "matched", state=State.MATCHED, next_run_at=postgres.clock()
            )
            assert await one.apply([matched]) == [True]
            await asyncio.wait_for(woken.wait(), 10)  # another replica's commit wakes it again

    before = failures("store", "store_listen_lost")
    run(body())
    (record,) = reported(caplog, "store_listen_lost")
    assert (record.stage, record.levelname) == ("store", "WARNING")
    assert failures("store", "store_listen_lost") == before + 1


def test_postgres_refuses_to_open_with_migrations_pending(pg_url: str) -> None:
    async def body() -> None:
        store = PostgresStore(pg_url, Sealer(b"k" * 32))
        with pytest.raises(StoreError, match=r"0001_initial.*leak-responder migrate"):
            await store.open()
        applied = await asyncio.gather(migrate(pg_url), migrate(pg_url), migrate(pg_url))
        assert sorted(len(a) for a in applied) == [0, 0, len(migrations("postgres"))]
        assert await migrate(pg_url) == []
        store = PostgresStore(pg_url, Sealer(b"k" * 32))
        await store.open()
        assert await store.pending_migrations() == []
        await store.close()

    run(body())


def test_an_alert_recorded_in_parts_counts_the_incidents_of_every_part_once(backend: Backend) -> None:
    """A big alert commits in parts, each an intake of the same record (Worker.accept); a
    redelivery after a crash between two of them creates what the crash left out. The alert stays
    one row, and its count of new incidents adds up the parts, a replay adding nothing."""
    tokens = [key() for _ in range(5)]
    alert = AlertRecord("github", "c" * 64, len(tokens))

    async def body() -> None:
        async with backend.opened() as (store,):
            await store.intake(alert, [sighting(t) for t in tokens[:2]], match_after=5)
            await store.intake(alert, [sighting(t) for t in tokens[2:3]], match_after=5)
            # The crash: the last part never committed. The redelivery runs every part again.
            refs = await store.intake(alert, [sighting(t) for t in tokens[:2]], match_after=5)
            assert not any(r.created for r in refs)
            refs = await store.intake(alert, [sighting(t) for t in tokens[2:]], match_after=5)
            assert [r.created for r in refs] == [False, True, True]

    run(body())
    assert backend.query("SELECT count(*), max(new_incidents) FROM alerts") == [(1, 5)]
    assert backend.query("SELECT count(*) FROM sightings") == [(5,)]
