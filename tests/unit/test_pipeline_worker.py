"""The worker's decisions (service/pipeline/worker.py): which step each claimed incident goes to, the
request path's labels, what `start` takes back and resumes, and the operator's retry and resolve.

The real store and the real steps; Supermemory and the notifier are doubles. No loop runs on its
own: claimed incidents are handed to the worker's routing and its tasks awaited, and `start` is
followed by `stop` before the loop's first turn, so what the store shows is what `start` did.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from service.pipeline import Worker
from service.pipeline import worker as worker_module
from service.reasons import Reason
from service.store import Label, SqliteStore, State, StoreError
from service.supermemory import CallFailed
from service.tokens import token_hash
from tests.unit.pipeline_doubles import (
    START,
    Clock,
    FakeNotifier,
    FakeSupermemory,
    alert_of,
    dead,
    drive,
    intake,
    intake_refs,
    key_fields,
    key_info,
    one,
    open_store,
    run_with_store,
    steps_for,
    token,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def worker_for(store, clock: Clock, client: FakeSupermemory, notifier: Any = None, **policy: Any) -> Worker:
    steps = steps_for(store, clock, client, notifier=notifier, **policy)
    return Worker(steps, replica="test-replica", concurrency=2, lease_seconds=30.0, clock=clock)


async def routed(worker: Worker, store) -> None:
    """Claim what is due as the loop would, route it, and wait for every step it started."""
    claimed = await store.claim(worker.owner, 100, 30.0)
    worker._spawn(claimed)
    if worker._inflight:
        await asyncio.wait(list(worker._inflight))


async def put(store, clock: Clock, n: int, state: State, **fields: Any) -> str:
    [incident_id] = await intake(store, n)
    if state is not State.RECEIVED:
        base = {**key_fields(n, f"owner{n}@example.test"), "revoked_at": START}
        await drive(store, incident_id, state, clock(), **{**base, **fields})
    return incident_id


# -- routing ---------------------------------------------------------------------------------------


def test_each_claimed_state_goes_to_its_step(tmp_path, clock):
    client = FakeSupermemory()
    client.know(key_info(1, "a@example.test"), key_info(2, "b@example.test"))
    client.probe_answers = [dead()]
    notifier = FakeNotifier()

    async def scenario(store):
        ids = {
            "received_1": await put(store, clock, 1, State.RECEIVED),
            "received_2": await put(store, clock, 2, State.RECEIVED),
            "matched": await put(store, clock, 3, State.MATCHED),
            "revoked": await put(store, clock, 4, State.REVOKED),
            "confirmed_5": await put(store, clock, 5, State.CONFIRMED, confirmed_at=START),
            "confirmed_6": await put(store, clock, 6, State.CONFIRMED, confirmed_at=START),
            "notified": await put(store, clock, 7, State.NOTIFIED, confirmed_at=START),
            "untold": await put(store, clock, 8, State.UNCONFIRMED, unconfirmed_at=START, probed_at=START),
            "told": await put(store, clock, 9, State.UNCONFIRMED, unconfirmed_at=START, notified_at=START),
            "closed": await put(store, clock, 10, State.CLOSED),
        }
        notifier.result.done |= {ids["confirmed_5"], ids["confirmed_6"], ids["untold"]}
        await routed(worker_for(store, clock, client, notifier), store)
        found = {name: await one(store, i) for name, i in ids.items()}
        return ids, found, await store.detail(ids["closed"])

    ids, found, closed = run_with_store(tmp_path, clock, scenario)
    # Lookups and notifications go in batches; confirmed keys and unconfirmed ones not yet told in
    # batches of their own.
    assert sorted(map(sorted, client.lookups)) == [sorted([token_hash(token(1)), token_hash(token(2))])]
    assert sorted(map(sorted, notifier.calls)) == [
        sorted([ids["confirmed_5"], ids["confirmed_6"]]),
        [ids["untold"]],
    ]
    assert client.revokes == ["key_3"]
    # Probed: the revoked key, and the unconfirmed one already told (its re-probe).
    assert sorted(client.probes) == sorted([token(4), token(9)])
    assert {name: i.state for name, i in found.items()} == {
        "received_1": State.MATCHED,
        "received_2": State.MATCHED,
        "matched": State.REVOKED,
        "revoked": State.CONFIRMED,
        "confirmed_5": State.NOTIFIED,
        "confirmed_6": State.NOTIFIED,
        "notified": State.CLOSED,
        "untold": State.UNCONFIRMED,
        "told": State.CONFIRMED,  # dead on its re-probe: confirmed, due for the follow-up email
        "closed": State.CLOSED,
    }
    assert found["untold"].notified_at == START and found["untold"].has_token
    # A final state found due is cleared, not run.
    assert closed.events[-1].kind == "unscheduled" and closed.incident.next_run_at is None


def test_without_a_notifier_an_unconfirmed_key_is_reprobed(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [dead()]

    async def scenario(store):
        incident_id = await put(store, clock, 8, State.UNCONFIRMED, unconfirmed_at=START)
        await routed(worker_for(store, clock, client), store)
        return await one(store, incident_id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert client.probes == [token(8)]
    # Dead: confirmed, and parked for a notifier like any confirmed key (nobody was told yet).
    assert incident.state is State.CONFIRMED and incident.notified_at is None and incident.next_run_at is None


def test_an_untold_unconfirmed_key_is_reprobed_when_due_and_told_otherwise(tmp_path, clock):
    """The owner's urgent email is still owed (SMTP down): the key whose re-probe is due goes to
    its re-probe, not to another attempt at the email; the one last probed moments ago is told."""
    client = FakeSupermemory()
    client.probe_answers = [dead()]
    notifier = FakeNotifier()

    async def scenario(store):
        due = await put(
            store, clock, 1, State.UNCONFIRMED, unconfirmed_at=START - 3600, probed_at=START - 3600
        )
        fresh = await put(store, clock, 2, State.UNCONFIRMED, unconfirmed_at=START - 5, probed_at=START - 5)
        await routed(worker_for(store, clock, client, notifier), store)
        return fresh, await one(store, due)

    fresh, reprobed = run_with_store(tmp_path, clock, scenario)
    assert client.probes == [token(1)] and notifier.calls == [[fresh]]
    assert reprobed.state is State.CONFIRMED and reprobed.notified_at is None


def test_a_step_that_raises_is_logged_and_frees_its_room(tmp_path, clock, caplog):
    client = FakeSupermemory()
    client.probe_answers = [RuntimeError("a bug in the client")]

    async def scenario(store):
        incident_id = await put(store, clock, 4, State.REVOKED)
        worker = worker_for(store, clock, client)
        await routed(worker, store)
        return worker, await one(store, incident_id)

    with caplog.at_level(logging.ERROR, logger="service.pipeline"):
        worker, incident = run_with_store(tmp_path, clock, scenario)
    assert [r.reason for r in caplog.records if getattr(r, "reason", None)] == [Reason.STEP_CRASHED]
    assert worker._busy == 0 and worker._inflight == {}
    # Nothing recorded: the lease runs out and the step runs again.
    assert incident.state is State.REVOKED


# -- the request path ------------------------------------------------------------------------------


def test_accept_looks_up_then_commits_the_labels_with_the_alert_and_wakes_the_worker(tmp_path, clock, caplog):
    client = FakeSupermemory()
    client.know(key_info(1, "a@example.test"))
    looked_up_before_any_commit: list[int] = []

    async def scenario(store):
        async def count_alerts():
            looked_up_before_any_commit.append((await store.stats()).pending)

        client.on_lookup = count_alerts
        worker = worker_for(store, clock, client)
        with caplog.at_level(logging.INFO, logger="service.pipeline"):
            refs, labels = await worker.accept(*alert_of(token(1), token(2), "not-a-key"), budget=5.0)
        return refs, labels, worker._wake.is_set(), await store.incidents([r.id for r in refs])

    refs, labels, woken, incidents = run_with_store(tmp_path, clock, scenario)
    assert looked_up_before_any_commit == [0], "nothing is committed before the lookup"
    assert labels == {
        refs[0].token_hash: Label.TRUE_POSITIVE,
        refs[1].token_hash: Label.FALSE_POSITIVE,
        refs[2].token_hash: Label.FALSE_POSITIVE,
    }
    assert client.lookups == [[refs[0].token_hash, refs[1].token_hash]], "the shape gate's token is not sent"
    assert [i.state for i in incidents] == [State.MATCHED, State.FALSE_POSITIVE, State.FALSE_POSITIVE]
    # Recorded (counted, logged) here: the refs handed back, kept until a big alert's last part,
    # do not hold every transition too.
    assert all(r.applied is None for r in refs)
    assert woken, "a matched key is revoked in the same breath"
    # The shape gate's decision is logged here, since it never reaches a step; the lookup's once each.
    reasons = [
        getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "incident false_positive"
    ]
    assert reasons == [Reason.SHAPE_GATE, Reason.NOT_A_KEY]


def watched_worker(store, clock):
    """A worker whose lookups know token(1) as a key, and the list its channel wake-ups go to."""
    client = FakeSupermemory()
    client.know(key_info(1, "a@example.test"))
    worker = worker_for(store, clock, client)
    woken: list[str] = []
    worker.after_commit = lambda: woken.append("woken")
    return worker, woken


def test_accept_wakes_the_channel_sender_only_for_a_transition_the_channels_hear_of(tmp_path, clock):
    async def scenario(store):
        worker, woken = watched_worker(store, clock)
        await worker.accept(*alert_of(token(2), "not-a-key"), budget=5.0)  # false positives only
        after_false_positives = len(woken)
        await worker.accept(*alert_of(token(1)), budget=5.0)  # a key: matched
        return after_false_positives, len(woken)

    assert run_with_store(tmp_path, clock, scenario) == (0, 1)


def test_a_match_step_wakes_the_channel_sender_only_for_a_transition_the_channels_hear_of(tmp_path, clock):
    async def scenario(store):
        worker, woken = watched_worker(store, clock)
        await put(store, clock, 2, State.RECEIVED)  # not a key
        await routed(worker, store)
        after_false_positive = len(woken)
        await put(store, clock, 1, State.RECEIVED)
        await routed(worker, store)
        return after_false_positive, len(woken)

    assert run_with_store(tmp_path, clock, scenario) == (0, 1)


def test_accept_of_a_big_alert_commits_it_in_parts_that_cut_no_token_in_two(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(worker_module, "INTAKE_PART", 2)
    client = FakeSupermemory()
    client.know(key_info(5))
    # token(1) again after token(2): it stays in the first part, whatever its position.
    record, items = alert_of(token(1), token(2), token(1), token(3), token(4), token(5))
    commits: list[int] = []

    async def scenario(store):
        intake = store.intake

        async def counted(*args: Any, **kwargs: Any) -> Any:
            refs = await intake(*args, **kwargs)
            commits.append(len(refs))
            return refs

        store.intake = counted
        refs, labels = await worker_for(store, clock, client).accept(record, items, budget=5.0)
        return refs, labels, await store.sightings([r.id for r in refs])

    refs, labels, sightings = run_with_store(tmp_path, clock, scenario)
    hashes = [token_hash(token(n)) for n in range(1, 6)]
    assert commits == [2, 2, 1], "one transaction per part of at most two distinct tokens"
    assert client.lookups == [hashes[:2], hashes[2:4], hashes[4:]]
    assert [r.token_hash for r in refs] == hashes
    assert labels == {h: Label.FALSE_POSITIVE for h in hashes[:4]} | {hashes[4]: Label.TRUE_POSITIVE}
    assert sum(len(s) for s in sightings.values()) == 6


def test_accept_with_no_budget_left_looks_nothing_up_and_a_known_token_keeps_its_label(tmp_path, clock):
    client = FakeSupermemory()

    async def scenario(store):
        first = await intake_refs(store, token(1))
        await drive(store, first[0].id, State.MATCHED, None, **key_fields(1))
        # A redelivery: the token is known, labelled; a new one waits, the budget spent.
        worker = worker_for(store, clock, client)
        refs, labels = await worker.accept(*alert_of(token(1), token(2)), budget=0.0)
        return refs, labels, await one(store, refs[1].id), worker._wake.is_set()

    refs, labels, waiting, woken = run_with_store(tmp_path, clock, scenario)
    assert client.lookups == []
    assert labels == {refs[0].token_hash: Label.TRUE_POSITIVE}
    assert waiting.state is State.RECEIVED and waiting.next_run_at == START
    assert woken, "the token left in received is the worker's at once"


def test_accept_after_a_failed_lookup_commits_the_alert_unlabelled(tmp_path, clock):
    client = FakeSupermemory()
    client.lookup_error = CallFailed(Reason.SERVER_ERROR, 503)

    async def scenario(store):
        refs, labels = await worker_for(store, clock, client).accept(*alert_of(token(1)), budget=5.0)
        return labels, await one(store, refs[0].id)

    labels, incident = run_with_store(tmp_path, clock, scenario)
    assert labels == {}
    assert (incident.state, incident.attempts, incident.next_run_at) == (State.RECEIVED, 0, START)


def test_accept_of_a_lookup_slower_than_the_budget_commits_the_alert_unlabelled(tmp_path, clock):
    client = FakeSupermemory()
    client.lookup_gate = asyncio.Event()  # never opens: the lookup outlives any budget

    async def scenario(store):
        refs, labels = await worker_for(store, clock, client).accept(*alert_of(token(1)), budget=0.001)
        return labels, await one(store, refs[0].id)

    labels, incident = run_with_store(tmp_path, clock, scenario)
    assert labels == {} and len(client.lookups) == 1
    assert incident.state is State.RECEIVED and incident.next_run_at == START


def test_accept_keeps_what_another_path_decided_during_its_lookup(tmp_path, clock):
    client = FakeSupermemory()
    client.know(key_info(1, "a@example.test"))

    async def scenario(store):
        earlier = await intake_refs(store, token(1))  # its lookup had missed the budget

        async def a_worker_gets_there_first():
            await drive(store, earlier[0].id, State.FALSE_POSITIVE, None, label="false_positive")

        client.on_lookup = a_worker_gets_there_first
        refs, labels = await worker_for(store, clock, client).accept(*alert_of(token(1)), budget=5.0)
        return refs, labels, await one(store, refs[0].id)

    refs, labels, incident = run_with_store(tmp_path, clock, scenario)
    assert labels == {refs[0].token_hash: Label.FALSE_POSITIVE}
    assert refs[0].applied is None and incident.state is State.FALSE_POSITIVE


# -- start -----------------------------------------------------------------------------------------


class RecordingReclaim(SqliteStore):
    """The real store, noting which replica asked for its predecessor's leases."""

    reclaimed: list[str]

    async def reclaim(self, replica: str) -> int:
        self.reclaimed = [*getattr(self, "reclaimed", []), replica]
        return await super().reclaim(replica)


def test_start_takes_back_a_dead_predecessors_leases_at_once(tmp_path, clock):
    async def main():
        before = open_store(tmp_path, clock)
        await before.open()
        incident_id = await put(before, clock, 3, State.MATCHED)
        assert [i.id for i in await before.claim("test-replica/dead-1", 10, 30.0)] == [incident_id]
        await before.close()  # killed: its lease is never handed back

        store = RecordingReclaim(tmp_path / "store.db", before._sealer, clock=clock)
        await store.open()
        try:
            worker = worker_for(store, clock, FakeSupermemory())
            await worker.start()
            await worker.stop()
            # Same instant as the crash: nothing has expired, yet the incident can be claimed.
            return store.reclaimed, [i.id for i in await store.claim("next", 10, 30.0)], incident_id
        finally:
            await store.close()

    reclaimed, claimed, incident_id = asyncio.run(main())
    assert reclaimed == ["test-replica"] and claimed == [incident_id]


@pytest.mark.parametrize(
    ("dry_run", "with_notifier", "resumed"),
    [
        (False, True, {"matched", "confirmed", "unconfirmed"}),
        (False, False, {"matched", "unconfirmed"}),
        (True, True, {"confirmed", "unconfirmed"}),
        (True, False, {"unconfirmed"}),
    ],
)
def test_start_resumes_parked_work_this_configuration_can_do(
    tmp_path, clock, dry_run, with_notifier, resumed
):
    async def scenario(store):
        ids = {
            "matched": await put(store, clock, 1, State.MATCHED),
            "confirmed": await put(store, clock, 2, State.CONFIRMED, confirmed_at=START),
            "unconfirmed": await put(store, clock, 3, State.UNCONFIRMED, unconfirmed_at=START),
            "waiting": await put(store, clock, 4, State.REVOKED),
        }
        for name in ("matched", "confirmed", "unconfirmed"):
            await drive(store, ids[name], State(name), None)
        await drive(store, ids["waiting"], State.REVOKED, START + 50.0)
        clock.advance(5.0)
        notifier = FakeNotifier() if with_notifier else None
        worker = worker_for(store, clock, FakeSupermemory(), notifier, dry_run=dry_run)
        await worker.start()
        await worker.stop()
        return {name: (await one(store, i)).next_run_at for name, i in ids.items()}

    due = run_with_store(tmp_path, clock, scenario)
    assert {name for name, at in due.items() if at == START + 5.0} == resumed
    assert {name for name, at in due.items() if at is None} == {
        "matched",
        "confirmed",
        "unconfirmed",
    } - resumed
    assert due["waiting"] == START + 50.0, "scheduled work keeps its time"


# -- operator actions ------------------------------------------------------------------------------


def test_worker_retry_applies_and_wakes_only_when_stuck(tmp_path, clock):
    async def scenario(store):
        stuck = await put(store, clock, 1, State.MATCHED, attempts=3)
        fine = await put(store, clock, 2, State.MATCHED)
        worker = worker_for(store, clock, FakeSupermemory())
        refused = await worker.retry(await one(store, fine), "alice")
        woken_by_refusal = worker._wake.is_set()
        done = await worker.retry(await one(store, stuck), "alice")
        return refused, woken_by_refusal, done, worker._wake.is_set(), await store.detail(stuck)

    refused, woken_by_refusal, done, woken, detail = run_with_store(tmp_path, clock, scenario)
    assert (refused, woken_by_refusal, done, woken) == (False, False, True, True)
    assert detail.incident.attempts == 0 and detail.events[-1].kind == "retry_requested"


def test_worker_resolve_refuses_a_final_or_stale_incident(tmp_path, clock):
    async def scenario(store):
        open_id = await put(store, clock, 1, State.UNCONFIRMED, unconfirmed_at=START)
        closed_id = await put(store, clock, 2, State.CLOSED)
        worker = worker_for(store, clock, FakeSupermemory())
        stale = await one(store, open_id)
        first = await worker.resolve(stale, "bob", "checked by hand")
        woken = worker._wake.is_set()
        worker._wake.clear()
        second = await worker.resolve(stale, "bob", "again, from the same old read")
        final = await worker.resolve(await one(store, closed_id), "bob", "n")
        return first, woken, second, final, worker._wake.is_set(), await store.detail(open_id)

    first, woken, second, final, woken_again, detail = run_with_store(tmp_path, clock, scenario)
    assert (first, second, final) == (True, False, False)
    assert woken and not woken_again, "only a transition that applied wakes the worker"
    assert [e.kind for e in detail.events].count("resolved") == 1
    assert detail.incident.state is State.CLOSED and not detail.incident.has_token


def test_accept_of_a_big_alert_hands_the_next_part_to_the_store_while_one_is_written(
    tmp_path, clock, monkeypatch
):
    """Two parts in the store at once: the writer goes from one part's commit to the next part's
    statements, and no more than two parts are held in memory. The first part goes alone, as it
    creates the alert's record."""
    monkeypatch.setattr(worker_module, "INTAKE_PART", 2)
    client = FakeSupermemory()
    record, items = alert_of(*(token(n) for n in range(1, 10)))  # five parts
    in_store: list[int] = [0]
    most: list[int] = [0]
    first_alone: list[bool] = []

    async def scenario(store):
        intake = store.intake

        async def counted(*args: Any, **kwargs: Any) -> Any:
            in_store[0] += 1
            most[0] = max(most[0], in_store[0])
            try:
                return await intake(*args, **kwargs)
            finally:
                if not first_alone:
                    first_alone.append(in_store[0] == 1)
                in_store[0] -= 1

        store.intake = counted
        refs, _ = await worker_for(store, clock, client).accept(record, items, budget=5.0)
        return refs

    refs = run_with_store(tmp_path, clock, scenario)
    assert first_alone == [True], "the second part was in the store with the first"
    assert most[0] == 2
    assert [r.token_hash for r in refs] == [token_hash(token(n)) for n in range(1, 10)]


def test_accept_of_a_big_alert_whose_part_fails_raises_and_leaves_no_part_behind(
    tmp_path, clock, monkeypatch
):
    """A part's failed commit fails the alert (a 503: the sender redelivers); the part handed to the
    store beside it is not left running past the answer."""
    monkeypatch.setattr(worker_module, "INTAKE_PART", 2)
    record, items = alert_of(*(token(n) for n in range(1, 10)))

    async def scenario(store):
        intake = store.intake
        calls: list[int] = []

        async def failing(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise StoreError("commit failed: disk full")
            return await intake(*args, **kwargs)

        store.intake = failing
        with pytest.raises(StoreError, match="disk full"):
            await worker_for(store, clock, FakeSupermemory()).accept(record, items, budget=5.0)
        return len(calls), [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    calls, left = run_with_store(tmp_path, clock, scenario)
    assert calls == 3, "the part after the failed one was handed to the store beside it"
    assert left == []
