"""SQLite's group of intakes (see service/store/sqlite.py's `_Batch`): the intakes queued in one turn
of the event loop reach the writer in one hand-over, and their rows go in together, a few statements
for the group; intakes that share a token see each other as if each had committed alone."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from service.store import AlertRecord, IncidentRef, Label, State, Transition, common
from service.store import sqlite as sqlite_store
from service.store.common import Dialect
from service.store.sqlite import SqliteStore
from service.tokens import token_hash
from tests.store.conftest import Backend
from tests.store.test_contract import key, matched_at_intake, not_a_key, run, sighting


class Traced:
    """Every statement the store's connections run, as SQLite hands them to its trace hook."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.statements: list[str] = []
        connect = SqliteStore._connect

        def traced(store: SqliteStore) -> sqlite3.Connection:
            conn = connect(store)
            conn.set_trace_callback(self.statements.append)
            return conn

        monkeypatch.setattr(SqliteStore, "_connect", traced)

    def count(self, prefix: str) -> int:
        return sum(s.startswith(prefix) for s in self.statements)


class HandOvers:
    """The writer's queue, counting the writes of each hand-over put on it."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.sizes: list[int] = []

    def put(self, jobs: list[Any] | None) -> None:
        self.sizes.append(len(jobs or []))
        self.queue.put(jobs)

    def get(self, block: bool = True) -> Any:
        return self.queue.get(block=block)


def alert(name: str, items: int = 1) -> AlertRecord:
    return AlertRecord("github", hashlib.sha256(name.encode()).hexdigest(), items)


def test_the_intakes_of_one_turn_are_one_group_of_a_few_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = Backend("sqlite", tmp_path, None)
    traced = Traced(monkeypatch)
    tokens = [key() for _ in range(12)]

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            # The last token is known already, left received by an earlier alert.
            (earlier,) = await store.intake(alert("earlier"), [sighting(tokens[-1])], 0, None)
            handed = HandOvers(store._queue)
            monkeypatch.setattr(store, "_queue", handed)
            serialized: list[Any] = []

            def dumps(value: Any) -> str:
                serialized.append(value)
                return common.dumps(value)

            monkeypatch.setattr(sqlite_store, "SQLITE", Dialect(mark="?", json=dumps))
            traced.statements.clear()
            answers = await asyncio.gather(
                *(store.intake(alert(t), [sighting(t)], 0, not_a_key) for t in tokens)
            )
            # One hand-over to the writer for the twelve, so one group, one commit.
            assert handed.sizes == [12]
            assert traced.count("BEGIN") == 1 and traced.count("COMMIT") == 1
            assert traced.count("SAVEPOINT") == 0
            # Their incidents, events and sightings one statement each (the alerts' rows one each,
            # for their ids), where running them one by one took twelve of each; the incidents
            # they find read at once, the known one among them.
            assert traced.count("INSERT INTO incidents") == 1
            assert traced.count("INSERT INTO events") == 1
            assert traced.count("INSERT INTO sightings") == 1
            assert traced.count("SELECT id, token_hash, state, label, redacted FROM incidents") == 1
            assert [[(r.token_hash, r.state, r.created) for r in refs] for refs in answers] == [
                [(token_hash(t), State.FALSE_POSITIVE, t != tokens[-1])] for t in tokens
            ]
            assert answers[-1][0].id == earlier.id
            # The events' details the group shares, serialized once for the group.
            assert serialized.count({"reason": "not_a_key"}) == 1
            assert serialized.count({"reporter": "github"}) == 1
            for (ref,) in answers:
                detail = await store.detail(ref.id)
                assert detail is not None
                assert [e.kind for e in detail.events] == ["received", "false_positive"]
                assert len(detail.sightings) == 1
        assert sqlite.query("SELECT count(*) FROM alerts") == [(13,)]

    run(body())


def test_intakes_of_one_group_sharing_a_token_see_each_other_as_if_committed_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first leaves the token received (its lookup missed the budget), the second decides it,
    the third finds it decided: one incident, decided once, a sighting and an alert each; and the
    group commits as it is, without falling back to a savepoint per write (which a stale read of
    the token, or a second insert of it, would have cost)."""
    sqlite = Backend("sqlite", tmp_path, None)
    traced = Traced(monkeypatch)
    shared, other = key(), key()
    asked: list[tuple[str, State]] = []

    def deciding(ref: IncidentRef) -> Transition:
        asked.append((ref.token_hash, ref.state))
        return not_a_key(ref)

    async def body() -> None:
        async with sqlite.opened() as (store,):
            traced.statements.clear()
            first, second, third = await asyncio.gather(
                store.intake(alert("one"), [sighting(shared, url="https://a.test/1")], 0, None),
                store.intake(
                    alert("two", 2),
                    [sighting(other), sighting(shared, url="https://a.test/2")],
                    0,
                    deciding,
                ),
                store.intake(alert("three"), [sighting(shared, url="https://a.test/3")], 0, deciding),
            )
            assert traced.count("BEGIN") == 1 and traced.count("SAVEPOINT") == 0
            (made,) = first
            assert (made.state, made.created) == (State.RECEIVED, True)
            by_hash = {r.token_hash: r for r in second}
            assert (by_hash[token_hash(shared)].id, by_hash[token_hash(shared)].created) == (made.id, False)
            assert by_hash[token_hash(shared)].state is State.FALSE_POSITIVE
            assert by_hash[token_hash(shared)].applied is not None
            assert by_hash[token_hash(other)].created
            (seen,) = third
            assert (seen.id, seen.state, seen.label, seen.applied) == (
                made.id,
                State.FALSE_POSITIVE,
                Label.FALSE_POSITIVE,
                None,
            )
            # Decided once, by the second intake, when it was still received.
            assert sorted(asked) == sorted(
                [(token_hash(other), State.RECEIVED), (token_hash(shared), State.RECEIVED)]
            )
            detail = await store.detail(made.id)
            assert detail is not None
            assert [e.kind for e in detail.events] == ["received", "false_positive"]
            assert sorted(s.url or "" for s in detail.sightings) == [
                "https://a.test/1",
                "https://a.test/2",
                "https://a.test/3",
            ]
        assert sqlite.query("SELECT count(*) FROM incidents") == [(2,)]
        assert sqlite.query("SELECT count(*) FROM alerts") == [(3,)]

    run(body())


def test_a_matched_key_in_a_group_has_its_channels_and_outbox_after_its_incident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new incident whose decision owes channel rows is inserted before them (they refer to it),
    its neighbours' rows still going in together."""
    sqlite = Backend("sqlite", tmp_path, None)
    tokens = [key() for _ in range(3)]

    async def body() -> None:
        async with sqlite.opened() as (store,):
            answers: list[list[IncidentRef]] = await asyncio.gather(
                store.intake(alert("a"), [sighting(tokens[0])], 0, not_a_key),
                store.intake(alert("b"), [sighting(tokens[1])], 0, matched_at_intake),
                store.intake(alert("c"), [sighting(tokens[2])], 0, not_a_key),
            )
            states: list[Any] = [refs[0].state for refs in answers]
            assert states == [State.FALSE_POSITIVE, State.MATCHED, State.FALSE_POSITIVE]
            detail = await store.detail(answers[1][0].id)
            assert detail is not None and [c.channel_id for c in detail.channels] == ["wh"]

    run(body())


def test_a_write_queued_in_the_turn_the_store_closes_is_still_answered(tmp_path: Path) -> None:
    """Its hand-over to the writer was still to come when `close` told the writer to stop: the
    writer must get it first, or the request would wait forever for its answer."""
    sqlite = Backend("sqlite", tmp_path, None)
    token = key()

    async def body() -> None:
        store = sqlite.make()
        await store.open()
        write = asyncio.ensure_future(store.intake(alert(token), [sighting(token)], 0, None))
        await asyncio.sleep(0)  # the intake has queued its write; the hand-over is the next turn's
        await store.close()
        (ref,) = await asyncio.wait_for(write, 5)
        assert ref.created

    run(body())
    assert sqlite.query("SELECT count(*) FROM incidents") == [(1,)]
