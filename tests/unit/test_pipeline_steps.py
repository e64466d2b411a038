"""Each step's outcome table (service/pipeline/steps.py) and `backoff`, against the real SQLite store
with a clock and an RNG the test drives; Supermemory, the pager and the notifier are doubles.

A step's transition is recorded through the store's fence (claimed under the worker's lease), so the
tests see what the step decided as the store keeps it, including which pages are already on record.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from typing import Any

import pytest

from service.notify.result import NotifyResult
from service.pipeline import backoff
from service.reasons import Reason
from service.store import Label, State, Transition
from service.supermemory import LOOKUP_BATCH, CallFailed, RevokeResult
from service.tokens import token_hash
from tests.unit.pipeline_doubles import (
    OWNER,
    START,
    Clock,
    FakeNotifier,
    FakeSupermemory,
    RecordingPager,
    alive,
    claim_one,
    dead,
    drive,
    inconclusive,
    intake,
    key_fields,
    key_info,
    one,
    record,
    run_with_store,
    steps_for,
    token,
)

# The tests' probe schedule (see pipeline_doubles.policy): probes at 0, 10, 20 and 40 s after the
# revoke; the revoke is re-issued from the middle point (20 s) on.
SCHEDULE = (0.0, 10.0, 20.0, 40.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def at(store, clock: Clock, state: State, n: int = 1, **fields: Any):
    """A claimed incident for `token(n)` in `state`, with what the earlier steps would have set."""
    [incident_id] = await intake(store, n)
    if state is not State.RECEIVED:
        base = {**key_fields(n, f"owner{n}@example.test"), "matched_at": clock()}
        await drive(store, incident_id, state, clock(), **{**base, **fields})
    return await claim_one(store, incident_id)


async def again(store, clock: Clock, incident_id: str):
    """The same incident at its next turn: the clock moves to when it is due, the worker claims it."""
    incident = await one(store, incident_id)
    assert incident.next_run_at is not None, "the step left it parked"
    clock.now = max(clock.now, incident.next_run_at)
    return await claim_one(store, incident_id)


def reasons_logged(caplog) -> list[str]:
    return [r.reason for r in caplog.records if r.name == "service.pipeline" and hasattr(r, "reason")]


def within_backoff(delay: float, attempt: int, base: float = 1.0, cap: float = 300.0) -> bool:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return ceiling / 2 <= delay <= ceiling


# -- backoff ---------------------------------------------------------------------------------------


def test_backoff_stays_within_half_to_full_ceiling_for_each_attempt():
    rng = random.Random(3)
    for attempt in range(1, 12):
        for _ in range(50):
            assert within_backoff(backoff(attempt, 1.0, 300.0, None, rng), attempt)


def test_backoff_is_capped():
    rng = random.Random(3)
    delays = [backoff(attempt, 1.0, 300.0, None, rng) for attempt in (10, 20, 60) for _ in range(50)]
    assert all(150.0 <= d <= 300.0 for d in delays)
    # A first attempt (or a zero one) waits half to one base, never less, never nothing.
    assert all(0.5 <= backoff(a, 1.0, 300.0, None, rng) <= 1.0 for a in (0, 1) for _ in range(50))


def test_backoff_after_days_of_failures_stays_at_the_cap():
    """At the cap a failure is retried every few minutes, so a relay down over a long weekend
    brings a pending email past a thousand attempts: 2**1024 no longer fits a float."""
    rng = random.Random(3)
    assert all(150.0 <= backoff(attempt, 1.0, 300.0, None, rng) <= 300.0 for attempt in (1025, 5000, 10**6))


def test_a_step_failing_for_days_still_backs_off(tmp_path, clock):
    client = FakeSupermemory()
    client.revoke_error = CallFailed(Reason.SERVER_ERROR, 503)

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED, attempts=1100, step_started_at=START - 3 * 86400)
        return await steps_for(store, clock, client).revoke(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert t.set["attempts"] == 1101 and START + 150.0 <= t.next_run_at <= START + 300.0


def test_backoff_takes_retry_after_as_a_floor_not_a_ceiling():
    rng = random.Random(3)
    assert backoff(1, 1.0, 300.0, 42.0, rng) == 42.0
    # A Retry-After shorter than the backoff does not shorten it.
    assert all(64.0 <= backoff(8, 1.0, 300.0, 1.0, rng) <= 128.0 for _ in range(50))
    assert backoff(1, 1.0, 300.0, 0.0, rng) >= 0.5


def test_backoff_jitter_spreads_over_the_whole_upper_half():
    delays = [backoff(5, 1.0, 300.0, None, random.Random(seed)) for seed in range(400)]
    assert min(delays) < 8.4 and max(delays) > 15.6, "jitter covers [8, 16]"
    assert len({round(d, 9) for d in delays}) > 390, "retries do not collapse onto the same instant"
    # Deterministic for a given RNG: the tests (and a replay) see the same delays.
    assert backoff(5, 1.0, 300.0, None, random.Random(11)) == backoff(5, 1.0, 300.0, None, random.Random(11))


# -- match -----------------------------------------------------------------------------------------


def test_match_found_records_the_key_and_schedules_the_revoke_now(tmp_path, clock):
    client = FakeSupermemory()
    client.know(key_info(1, "Ann@Example.test"))

    async def scenario(store):
        incident = await at(store, clock, State.RECEIVED)
        [t] = await steps_for(store, clock, client).match([incident], OWNER)
        assert (t.event, t.expected_state, t.state, t.next_run_at) == (
            "matched",
            State.RECEIVED,
            State.MATCHED,
            START,
        )
        assert await record(store, t) == [True]
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert incident.state is State.MATCHED and incident.label is Label.TRUE_POSITIVE
    assert (incident.key_id, incident.org_id, incident.key_name) == ("key_1", "org0001", "key 1")
    assert incident.recipients == [{"email": "Ann@Example.test", "name": "Ann"}]
    assert (incident.matched_at, incident.attempts, incident.last_reason, incident.has_token) == (
        START,
        0,
        None,
        True,
    )


def test_match_not_a_key_is_a_false_positive_and_wipes_the_token(tmp_path, clock):
    async def scenario(store):
        incident = await at(store, clock, State.RECEIVED)
        [t] = await steps_for(store, clock).match([incident], OWNER)
        assert t.state is State.FALSE_POSITIVE and t.next_run_at is None and t.wipe_token
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert incident.state is State.FALSE_POSITIVE and incident.label is Label.FALSE_POSITIVE
    assert incident.last_reason == Reason.NOT_A_KEY and not incident.has_token


@pytest.mark.parametrize(
    "reason", [Reason.SERVER_ERROR, Reason.TIMEOUT, Reason.CONNECTION_ERROR, Reason.BAD_RESPONSE]
)
def test_match_lookup_failure_backs_off_without_paging(tmp_path, clock, reason):
    client, pager = FakeSupermemory(), RecordingPager()
    client.lookup_error = CallFailed(reason, 503)

    async def scenario(store):
        incident = await at(store, clock, State.RECEIVED)
        [t] = await steps_for(store, clock, client, pager).match([incident], OWNER)
        assert t.state is None and t.event == "lookup_failed" and t.page is None
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert incident.state is State.RECEIVED and incident.attempts == 1 and incident.last_reason == reason
    assert within_backoff(incident.next_run_at - START, 1)
    assert incident.step_started_at == START and pager.pages == []


def test_match_rate_limited_waits_at_least_retry_after(tmp_path, clock):
    client = FakeSupermemory()
    client.lookup_error = CallFailed(Reason.RATE_LIMITED, 429, retry_after=120.0)

    async def scenario(store):
        incident = await at(store, clock, State.RECEIVED)
        [t] = await steps_for(store, clock, client).match([incident], OWNER)
        return t

    t = run_with_store(tmp_path, clock, scenario)
    assert t.next_run_at == START + 120.0 and t.set["last_reason"] == Reason.RATE_LIMITED


def test_match_admin_unauthorized_pages_once_per_incident(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.lookup_error = CallFailed(Reason.ADMIN_UNAUTHORIZED, 401)

    async def scenario(store):
        incident = await at(store, clock, State.RECEIVED)
        steps = steps_for(store, clock, client, pager)
        [first] = await steps.match([incident], OWNER)
        await record(store, first)
        [second] = await steps.match([await again(store, clock, incident.id)], OWNER)
        await record(store, second)
        return first, second, await one(store, incident.id)

    first, second, incident = run_with_store(tmp_path, clock, scenario)
    assert first.page == Reason.LOOKUP_UNAUTHORIZED and second.page is None
    assert pager.codes() == [Reason.LOOKUP_UNAUTHORIZED]
    assert incident.pages == {Reason.LOOKUP_UNAUTHORIZED} and incident.attempts == 2


def test_the_request_paths_lookup_leaves_out_what_failed_and_records_nothing(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.lookup_error = CallFailed(Reason.ADMIN_UNAUTHORIZED, 401)

    async def scenario(store):
        [incident_id] = await intake(store, 1)
        steps = steps_for(store, clock, client, pager)
        found = await steps.lookup([token_hash(token(1))], budget=5.0).answers()
        return found, await one(store, incident_id)

    found, incident = run_with_store(tmp_path, clock, scenario)
    # Nothing to commit with the alert, no page (the worker's own lookup pages), no retry recorded.
    assert found == {} and pager.pages == []
    assert incident.state is State.RECEIVED and incident.attempts == 0 and incident.next_run_at == START


def test_the_request_paths_lookup_answers_per_hash_and_its_decisions_need_no_lease(tmp_path, clock):
    client = FakeSupermemory()
    client.know(key_info(1, "ann@example.test"))

    async def scenario(store):
        ids = await intake(store, 1, 2)
        hashes = [token_hash(token(n)) for n in (1, 2)]
        found = await steps_for(store, clock, client).lookup(hashes, budget=5.0).answers()
        steps = steps_for(store, clock, client)
        transitions = [steps.matched(i, found[h], None) for i, h in zip(ids, hashes, strict=True)]
        return found, transitions, await record(store, *transitions)

    found, transitions, applied = run_with_store(tmp_path, clock, scenario)
    assert found == {token_hash(token(1)): key_info(1, "ann@example.test"), token_hash(token(2)): None}
    assert [t.state for t in transitions] == [State.MATCHED, State.FALSE_POSITIVE]
    assert all(t.lease_owner is None for t in transitions) and applied == [True, True]


def test_the_request_paths_lookup_leaves_out_what_the_budget_did_not_cover(tmp_path, clock):
    client = FakeSupermemory()
    client.lookup_gate = asyncio.Event()  # never opens

    async def scenario(store):
        return await steps_for(store, clock, client).lookup([token_hash(token(1))], budget=0.001).answers()

    assert run_with_store(tmp_path, clock, scenario) == {}


def test_match_looks_up_in_batches(tmp_path, clock):
    client = FakeSupermemory()
    count = LOOKUP_BATCH + 1

    async def scenario(store):
        await intake(store, *range(count))
        claimed = await store.claim(OWNER, 1000, 30.0)
        return await steps_for(store, clock, client).match(claimed, OWNER)

    transitions = run_with_store(tmp_path, clock, scenario)
    assert sorted(len(batch) for batch in client.lookups) == [1, LOOKUP_BATCH]
    assert len(transitions) == count


# -- revoke ----------------------------------------------------------------------------------------


def test_revoke_in_dry_run_parks_the_incident_at_matched(tmp_path, clock):
    client = FakeSupermemory()

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED)
        t = await steps_for(store, clock, client, dry_run=True).revoke(incident, OWNER)
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert client.revokes == []
    assert incident.state is State.MATCHED and incident.next_run_at is None
    assert incident.last_reason == Reason.DRY_RUN


@pytest.mark.parametrize("result", list(RevokeResult))
def test_revoke_done_or_already_gone_goes_on_to_the_first_probe(tmp_path, clock, result):
    client = FakeSupermemory()
    client.revoke_result = result

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED, attempts=3, step_started_at=START - 5)
        clock.advance(2.0)
        t = await steps_for(store, clock, client, probe_schedule=(1.5, 10.0)).revoke(incident, OWNER)
        assert t.detail == {"result": result}
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert client.revokes == ["key_1"]
    assert incident.state is State.REVOKED and incident.revoked_at == START + 2.0
    assert incident.next_run_at == START + 2.0 + 1.5
    assert (incident.attempts, incident.step_started_at, incident.last_reason) == (0, None, None)


def test_revoke_failure_retries_with_growing_backoff(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.revoke_error = CallFailed(Reason.SERVER_ERROR, 503)

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED)
        steps = steps_for(store, clock, client, pager)
        delays = []
        for attempt in range(1, 6):
            t = await steps.revoke(incident, OWNER)
            assert t.event == "revoke_failed" and t.state is None
            delays.append((attempt, t.next_run_at - clock()))
            await record(store, t)
            incident = await again(store, clock, incident.id)
        return delays, incident

    delays, incident = run_with_store(tmp_path, clock, scenario)
    assert all(within_backoff(delay, attempt) for attempt, delay in delays), delays
    assert incident.state is State.MATCHED and incident.attempts == 5
    assert incident.step_started_at == START, "the retry window counts from the first failure"
    assert pager.pages == [], "within the retry window nobody is paged"


def test_revoke_rate_limited_waits_at_least_retry_after(tmp_path, clock):
    client = FakeSupermemory()
    client.revoke_error = CallFailed(Reason.RATE_LIMITED, 429, retry_after=60.0)

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED)
        return await steps_for(store, clock, client).revoke(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert t.next_run_at == START + 60.0 and t.set["last_reason"] == Reason.RATE_LIMITED


def test_revoke_failing_past_its_window_pages_revocation_failed_once(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.revoke_error = CallFailed(Reason.SERVER_ERROR, 503)

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED)
        steps = steps_for(store, clock, client, pager, revoke_retry_window=100.0)
        pages = []
        for _ in range(3):
            t = await steps.revoke(incident, OWNER)
            pages.append(t.page)
            await record(store, t)
            clock.advance(60.0)
            incident = await again(store, clock, incident.id)
        return pages, incident

    pages, incident = run_with_store(tmp_path, clock, scenario)
    # At 0 s and 60 s the revoke is within its 100 s window; at 120 s it is past it; the page is once.
    assert pages == [None, None, Reason.REVOCATION_FAILED]
    assert pager.codes() == [Reason.REVOCATION_FAILED]
    assert pager.pages[0][1]["incident_id"] == incident.id
    assert incident.pages == {Reason.REVOCATION_FAILED} and incident.state is State.MATCHED

    # ...and the next failures do not page again.
    async def later(store):
        incident_now = await claim_one(store, incident.id)
        steps = steps_for(store, clock, client, pager, revoke_retry_window=100.0)
        return await steps.revoke(incident_now, OWNER)

    clock.advance(600.0)
    assert run_with_store(tmp_path, clock, later).page is None
    assert pager.codes() == [Reason.REVOCATION_FAILED]


def test_revoke_refused_admin_token_pages_lookup_unauthorized_not_revocation_failed(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.revoke_error = CallFailed(Reason.ADMIN_UNAUTHORIZED, 401)

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED, step_started_at=START - 10_000)
        return await steps_for(store, clock, client, pager, revoke_retry_window=100.0).revoke(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert t.page == Reason.LOOKUP_UNAUTHORIZED and pager.codes() == [Reason.LOOKUP_UNAUTHORIZED]
    assert t.set["last_reason"] == Reason.ADMIN_UNAUTHORIZED


# -- probe -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_notifier", [True, False])
def test_probe_dead_confirms(tmp_path, clock, with_notifier):
    client = FakeSupermemory()
    notifier = FakeNotifier() if with_notifier else None

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START, attempts=2)
        clock.advance(3.0)
        t = await steps_for(store, clock, client, notifier=notifier).probe(incident, OWNER)
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert client.probes == [token(1)], "the probe uses the unsealed token"
    assert incident.state is State.CONFIRMED and incident.confirmed_at == START + 3.0
    assert incident.attempts == 0 and incident.has_token
    # Confirmed keys go on to notify at once, or wait, parked and visible, for a notifier.
    assert incident.next_run_at == (START + 3.0 if with_notifier else None)


def test_probe_alive_early_waits_for_the_next_point_of_the_schedule(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [alive()]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        clock.advance(1.0)
        t = await steps_for(store, clock, client).probe(incident, OWNER)
        await record(store, t)
        return t, await one(store, incident.id)

    t, incident = run_with_store(tmp_path, clock, scenario)
    assert t.event == "probe_alive" and t.detail["reissued_revoke"] is False
    assert incident.state is State.REVOKED and incident.next_run_at == START + SCHEDULE[1]
    assert not incident.revoke_reissued and client.revokes == []
    assert incident.last_reason == Reason.PROBE_KEY_ALIVE


def test_probe_alive_reissues_the_revoke_once_from_halfway(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [alive()]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        steps = steps_for(store, clock, client)
        seen = []
        # Probes at 0, 10 (before halfway: no re-issue), 20 (halfway: re-issue), 30 (not again).
        for when in (0.0, 10.0, 20.0, 30.0):
            clock.now = START + when
            t = await steps.probe(incident, OWNER)
            seen.append((when, t.detail["reissued_revoke"], t.next_run_at - START, len(client.revokes)))
            await record(store, t)
            incident = await again(store, clock, incident.id)
        return seen, incident

    seen, incident = run_with_store(tmp_path, clock, scenario)
    assert seen == [
        (0.0, False, 10.0, 0),
        (10.0, False, 20.0, 0),
        (20.0, True, 40.0, 1),
        (30.0, False, 40.0, 1),
    ]
    assert incident.revoke_reissued and client.revokes == ["key_1"]


def test_probe_alive_when_the_schedule_runs_out_is_unconfirmed_and_paged(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [alive()]
    notifier = FakeNotifier()

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START, revoke_reissued=True)
        clock.now = START + SCHEDULE[-1]
        t = await steps_for(store, clock, client, pager, notifier).probe(incident, OWNER)
        await record(store, t)
        return t, await one(store, incident.id)

    t, incident = run_with_store(tmp_path, clock, scenario)
    assert t.event == "unconfirmed" and t.page == Reason.REVOCATION_UNCONFIRMED
    assert pager.codes() == [Reason.REVOCATION_UNCONFIRMED]
    assert incident.state is State.UNCONFIRMED and incident.has_token, "kept to probe again later"
    assert incident.unconfirmed_at == START + 40.0 and incident.last_reason == Reason.PROBE_KEY_ALIVE
    # With a notifier the owner is told at once; its re-probes count from this last probe.
    assert incident.next_run_at == START + 40.0 and incident.probed_at == START + 40.0


def test_unconfirmed_without_a_notifier_waits_one_reprobe_interval(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [alive()]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START, revoke_reissued=True)
        clock.now = START + 50.0
        return await steps_for(store, clock, client, reprobe_interval=600.0).probe(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert t.state is State.UNCONFIRMED and t.next_run_at == START + 50.0 + 600.0


def test_probe_inconclusive_retries_within_its_window(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [inconclusive()]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        # Past the schedule (40 s) but within schedule + window (140 s): still a retry.
        clock.now = START + 140.0
        t = await steps_for(store, clock, client, pager).probe(incident, OWNER)
        await record(store, t)
        return t, await one(store, incident.id)

    t, incident = run_with_store(tmp_path, clock, scenario)
    assert t.event == "probe_inconclusive" and pager.pages == []
    assert incident.state is State.REVOKED and incident.attempts == 1
    assert incident.last_reason == Reason.PROBE_SERVER_ERROR
    assert within_backoff(incident.next_run_at - (START + 140.0), 1)
    assert client.revokes == [], "an inconclusive probe never re-issues the revoke"


def test_probe_inconclusive_honours_retry_after(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [inconclusive(retry_after=30.0)]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        return await steps_for(store, clock, client).probe(incident, OWNER)

    assert run_with_store(tmp_path, clock, scenario).next_run_at == START + 30.0


def test_probe_inconclusive_past_schedule_and_window_is_unconfirmed(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [inconclusive()]

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        clock.now = START + 140.5
        return await steps_for(store, clock, client, pager).probe(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert t.state is State.UNCONFIRMED and t.set["last_reason"] == Reason.PROBE_SERVER_ERROR
    assert pager.codes() == [Reason.REVOCATION_UNCONFIRMED]


def test_probe_without_a_token_is_unconfirmed_token_unavailable(tmp_path, clock, caplog):
    client, pager = FakeSupermemory(), RecordingPager()

    async def scenario(store):
        [incident_id] = await intake(store, 1)
        fields = {**key_fields(1, "ann@example.test"), "revoked_at": START}
        await drive(store, incident_id, State.REVOKED, START, **fields)
        # An incident whose sealed token is gone (wiped by a concurrent close, say).
        await record(
            store, Transition(incident_id, State.REVOKED, "test_wipe", next_run_at=START, wipe_token=True)
        )
        incident = await claim_one(store, incident_id)
        return await steps_for(store, clock, client, pager).probe(incident, OWNER)

    with caplog.at_level(logging.ERROR, logger="service.pipeline"):
        t = run_with_store(tmp_path, clock, scenario)
    assert client.probes == []
    assert t.state is State.UNCONFIRMED and t.set["last_reason"] == Reason.TOKEN_UNAVAILABLE
    assert pager.codes() == [Reason.REVOCATION_UNCONFIRMED]
    assert reasons_logged(caplog) == ["token_unavailable"]


def unseal_breaks(path) -> None:
    """Mark every sealed token as sealed under a data key the service no longer has (a key dropped
    from the fallbacks before `rewrap` resealed what it held), behind the running store's back."""
    with sqlite3.connect(path / "store.db") as conn:
        conn.execute("UPDATE incidents SET sealed_key = 'ffffffffffffffff' WHERE token_sealed IS NOT NULL")


def test_probe_of_a_token_no_key_opens_is_unconfirmed_token_unsealable_paged_once(tmp_path, clock, caplog):
    client, pager = FakeSupermemory(), RecordingPager()

    async def scenario(store):
        incident = await at(store, clock, State.REVOKED, revoked_at=START)
        unseal_breaks(tmp_path)
        steps = steps_for(store, clock, client, pager)
        t = await steps.probe(incident, OWNER)
        await record(store, t)
        # On its slow schedule it still cannot be probed: no crash, no second page.
        later = await again(store, clock, incident.id)
        clock.advance(3600.0)
        again_t = await steps.reprobe(later, OWNER)
        await record(store, again_t)
        return t, again_t, await one(store, incident.id)

    with caplog.at_level(logging.ERROR, logger="service.pipeline"):
        t, reprobed, incident = run_with_store(tmp_path, clock, scenario)
    assert client.probes == [], "nothing is sent without a token"
    assert t.state is State.UNCONFIRMED and t.set["last_reason"] == Reason.TOKEN_UNSEALABLE
    assert t.page == Reason.REVOCATION_UNCONFIRMED and reprobed.page is None
    assert pager.codes() == [Reason.REVOCATION_UNCONFIRMED]
    assert reasons_logged(caplog) == ["token_unsealable", "token_unsealable"]
    assert incident.state is State.UNCONFIRMED and incident.last_reason == Reason.TOKEN_UNSEALABLE
    assert incident.next_run_at is not None, "still on its re-probe schedule"
    assert client.revokes == [], "a token that cannot be probed is not taken for alive"


# -- reprobe ---------------------------------------------------------------------------------------


async def unconfirmed(store, clock: Clock, since: float, **fields: Any):
    """Unconfirmed since `since` (last probed then) and, unless `fields` say otherwise, told."""
    told = {"revoked_at": since - 40.0, "unconfirmed_at": since, "probed_at": since, "notified_at": since}
    return await at(store, clock, State.UNCONFIRMED, **{**told, **fields})


@pytest.mark.parametrize("with_notifier", [True, False])
def test_reprobe_401_confirms_wipes_the_token_and_goes_on_to_the_follow_up(tmp_path, clock, with_notifier):
    client = FakeSupermemory()
    client.probe_answers = [dead()]
    notifier = FakeNotifier() if with_notifier else None

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START, attempts=3)
        clock.advance(7200.0)
        t = await steps_for(store, clock, client, notifier=notifier).reprobe(incident, OWNER)
        await record(store, t)
        return t, await one(store, incident.id)

    t, incident = run_with_store(tmp_path, clock, scenario)
    assert t.event == "confirmed" and t.detail["after_unconfirmed"] == 7200.0
    # Confirmed like any key: due at once for its owner's follow-up email, then closed by `close`.
    assert incident.state is State.CONFIRMED and not incident.has_token
    assert incident.confirmed_at == START + 7200.0 and incident.attempts == 0
    assert incident.next_run_at == (START + 7200.0 if with_notifier else None)
    assert incident.closed_at is None and incident.last_reason is None
    assert client.revokes == []


def test_reprobe_alive_reissues_the_revoke_and_comes_back_an_interval_later(tmp_path, clock):
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [alive()]

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START)
        clock.advance(3600.0)
        steps = steps_for(store, clock, client, pager)
        t = await steps.reprobe(incident, OWNER)
        await record(store, t)
        second = await steps.reprobe(await again(store, clock, incident.id), OWNER)
        await record(store, second)
        return t, second, await one(store, incident.id)

    t, second, incident = run_with_store(tmp_path, clock, scenario)
    assert t.detail["reissued_revoke"] and second.detail["reissued_revoke"]
    assert client.revokes == ["key_1", "key_1"], "re-issued at every re-probe that finds it alive"
    assert incident.state is State.UNCONFIRMED and incident.next_run_at == START + 3 * 3600.0
    assert incident.last_reason == Reason.PROBE_KEY_ALIVE and pager.pages == []


def test_reprobe_alive_whose_revoke_fails_still_comes_back(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [alive()]
    client.revoke_error = CallFailed(Reason.SERVER_ERROR, 503)

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START)
        return await steps_for(store, clock, client).reprobe(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert client.revokes == ["key_1"] and t.next_run_at == START + 3600.0 and t.state is None


def test_reprobe_inconclusive_comes_back_without_revoking(tmp_path, clock):
    client = FakeSupermemory()
    client.probe_answers = [inconclusive()]

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START)
        return await steps_for(store, clock, client).reprobe(incident, OWNER)

    t = run_with_store(tmp_path, clock, scenario)
    assert client.revokes == [] and t.detail["reissued_revoke"] is False
    assert t.state is None and t.next_run_at == START + 3600.0
    assert t.set == {"last_reason": Reason.PROBE_SERVER_ERROR, "probed_at": START}


@pytest.mark.parametrize("answer", [alive, inconclusive])
def test_reprobe_window_over_pages_once_and_parks_for_an_operator(tmp_path, clock, answer):
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [answer()]

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START)
        steps = steps_for(store, clock, client, pager, unconfirmed_window=86400.0)
        # The last re-probe within the window comes back exactly when the window runs out.
        clock.now = START + 86400.0 - 3600.0
        before = await steps.reprobe(incident, OWNER)
        await record(store, before)
        over = await steps.reprobe(await again(store, clock, incident.id), OWNER)
        assert clock.now == START + 86400.0
        await record(store, over)
        # Resumed (a restart does so), it is probed once more and parked again, without a new page.
        await store.resume(State.UNCONFIRMED)
        clock.advance(1.0)
        resumed = await steps.reprobe(await again(store, clock, incident.id), OWNER)
        await record(store, resumed)
        return before, over, resumed, await one(store, incident.id)

    before, over, resumed, incident = run_with_store(tmp_path, clock, scenario)
    assert before.page is None and before.next_run_at == START + 86400.0
    assert over.page == Reason.UNCONFIRMED_WINDOW_OVER and over.next_run_at is None
    assert resumed.page is None and resumed.next_run_at is None
    assert pager.codes() == [Reason.UNCONFIRMED_WINDOW_OVER]
    assert incident.state is State.UNCONFIRMED and incident.next_run_at is None and incident.has_token
    assert incident.pages == {Reason.UNCONFIRMED_WINDOW_OVER}


@pytest.mark.parametrize("answer", [alive, inconclusive])
def test_reprobe_while_the_urgent_email_is_owed_goes_on_to_the_email_and_pages_the_window(
    tmp_path, clock, answer
):
    """SMTP down: the owner of an unconfirmed key is not told yet. Its re-probes, their re-issued
    revokes and the window's page do not wait for that email, which is tried again at once."""
    client, pager = FakeSupermemory(), RecordingPager()
    client.probe_answers = [answer(), answer()]

    async def scenario(store):
        incident = await unconfirmed(store, clock, since=START, notified_at=None)
        steps = steps_for(store, clock, client, pager, FakeNotifier(), unconfirmed_window=7200.0)
        clock.advance(3600.0)
        within = await steps.reprobe(incident, OWNER)
        await record(store, within)
        after_within = await one(store, incident.id)
        clock.advance(3600.0)
        over = await steps.reprobe(await claim_one(store, incident.id), OWNER)
        await record(store, over)
        return within, after_within, over, await one(store, incident.id), steps

    within, after_within, over, incident, steps = run_with_store(tmp_path, clock, scenario)
    assert within.next_run_at == START + 3600.0, "the email is tried again right after the re-probe"
    assert after_within.probed_at == START + 3600.0
    assert steps.next_reprobe(after_within) == START + 7200.0
    assert over.page == Reason.UNCONFIRMED_WINDOW_OVER and pager.codes() == [Reason.UNCONFIRMED_WINDOW_OVER]
    # Over: no more re-probes, but the email is still owed, so it is still scheduled.
    assert over.next_run_at == START + 7200.0 and steps.next_reprobe(incident) is None
    assert incident.state is State.UNCONFIRMED and incident.notified_at is None and incident.has_token
    assert client.revokes == (["key_1", "key_1"] if answer is alive else [])


def test_notify_pending_of_an_unconfirmed_key_comes_back_no_later_than_its_reprobe(tmp_path, clock):
    """An email failing for long backs off past the re-probe interval: an unconfirmed key's retry
    comes back at its re-probe instead; a confirmed key's keeps its backoff."""
    result = NotifyResult()
    notifier = FakeNotifier(result)

    async def scenario(store):
        urgent = await unconfirmed(store, clock, since=START, notified_at=None, attempts=20)
        plain = await at(store, clock, State.CONFIRMED, 2, revoked_at=START, confirmed_at=START, attempts=20)
        result.pending |= {urgent.id: Reason.SMTP_UNAVAILABLE, plain.id: Reason.SMTP_UNAVAILABLE}
        clock.advance(60.0)
        steps = steps_for(store, clock, notifier=notifier, backoff_max=86400.0)
        return await steps.notify([urgent, plain], OWNER)

    urgent, plain = run_with_store(tmp_path, clock, scenario)
    assert urgent.event == plain.event == "notify_pending"
    assert urgent.next_run_at == START + 3600.0
    assert plain.next_run_at is not None and plain.next_run_at - (START + 60.0) >= 43200.0


# -- notify and close ------------------------------------------------------------------------------


def test_notify_without_a_notifier_parks_visibly(tmp_path, clock):
    async def scenario(store):
        incident = await at(store, clock, State.CONFIRMED, revoked_at=START, confirmed_at=START)
        [t] = await steps_for(store, clock).notify([incident], OWNER)
        await record(store, t)
        return t, await one(store, incident.id)

    t, incident = run_with_store(tmp_path, clock, scenario)
    assert t.event == "awaiting_notifier"
    assert incident.state is State.CONFIRMED and incident.next_run_at is None


def test_notify_outcomes(tmp_path, clock):
    """One batch, every answer a notifier can give: done (confirmed, unconfirmed), waiting, pending
    with a reason, and neither (pending without a reason)."""
    result = NotifyResult()
    notifier, pager = FakeNotifier(result), RecordingPager()

    async def scenario(store):
        confirmed = await at(store, clock, State.CONFIRMED, 1, revoked_at=START, confirmed_at=START)
        urgent = await at(
            store, clock, State.UNCONFIRMED, 2, revoked_at=START, unconfirmed_at=START, probed_at=START
        )
        grouped = await at(store, clock, State.CONFIRMED, 3, revoked_at=START, confirmed_at=START)
        failing = await at(store, clock, State.CONFIRMED, 4, revoked_at=START, confirmed_at=START, attempts=2)
        silent = await at(store, clock, State.CONFIRMED, 5, revoked_at=START, confirmed_at=START)
        result.done |= {confirmed.id, urgent.id}
        result.waiting[grouped.id] = START + 15.0
        result.pending[failing.id] = Reason.SMTP_UNAVAILABLE
        batch = [confirmed, urgent, grouped, failing, silent]
        clock.advance(5.0)
        transitions = await steps_for(store, clock, pager=pager, notifier=notifier).notify(batch, OWNER)
        assert await record(store, *transitions) == [True] * 5
        return transitions, await store.incidents([i.id for i in batch])

    transitions, (confirmed, urgent, grouped, failing, silent) = run_with_store(tmp_path, clock, scenario)
    now = START + 5.0
    assert notifier.calls == [[confirmed.id, urgent.id, grouped.id, failing.id, silent.id]]
    assert [t.event for t in transitions] == [
        "notified",
        "notified",
        "notify_grouping",
        "notify_pending",
        "notify_pending",
    ]
    # Confirmed and told: on to close at once.
    assert confirmed.state is State.NOTIFIED and confirmed.next_run_at == now and confirmed.notified_at == now
    # Unconfirmed and told: stays open, on its slow re-probe schedule (an interval after its last
    # probe, not after the email), the token kept.
    assert urgent.state is State.UNCONFIRMED and urgent.notified_at == now and urgent.has_token
    assert urgent.next_run_at == START + 3600.0
    # Waiting for its alert's siblings: not a failure, no attempt counted.
    assert grouped.state is State.CONFIRMED and grouped.next_run_at == START + 15.0 and grouped.attempts == 0
    # Pending: a retry with backoff and the notifier's reason.
    assert failing.state is State.CONFIRMED and failing.attempts == 3
    assert failing.last_reason == Reason.SMTP_UNAVAILABLE and within_backoff(failing.next_run_at - now, 3)
    assert silent.last_reason == Reason.NOTIFY_PENDING and silent.attempts == 1
    assert pager.pages == []


def test_notify_unreachable_owner_pages_once(tmp_path, clock):
    result = NotifyResult(done=set(), unreachable={})
    notifier, pager = FakeNotifier(result), RecordingPager()

    async def scenario(store):
        incident = await at(store, clock, State.CONFIRMED, revoked_at=START, confirmed_at=START)
        result.unreachable[incident.id] = ["owner1@example.test"]
        result.pending[incident.id] = Reason.SMTP_UNAVAILABLE
        steps = steps_for(store, clock, pager=pager, notifier=notifier)
        [first] = await steps.notify([incident], OWNER)
        await record(store, first)
        result.pending.clear()
        result.done.add(incident.id)
        [second] = await steps.notify([await again(store, clock, incident.id)], OWNER)
        await record(store, second)
        return first, second, await one(store, incident.id)

    first, second, incident = run_with_store(tmp_path, clock, scenario)
    assert first.page == Reason.OWNER_UNREACHABLE and second.page is None
    assert pager.codes() == [Reason.OWNER_UNREACHABLE]
    assert incident.state is State.NOTIFIED and incident.pages == {Reason.OWNER_UNREACHABLE}


def test_close_wipes_the_token_and_keeps_the_record(tmp_path, clock):
    async def scenario(store):
        incident = await at(store, clock, State.NOTIFIED, revoked_at=START, confirmed_at=START)
        clock.advance(2.0)
        t = steps_for(store, clock).close(incident, OWNER)
        await record(store, t)
        return await one(store, incident.id)

    incident = run_with_store(tmp_path, clock, scenario)
    assert incident.state is State.CLOSED and incident.closed_at == START + 2.0
    assert not incident.has_token and incident.next_run_at is None
    assert incident.token_hash == token_hash(token(1)) and incident.key_id == "key_1"


def test_a_step_that_lost_its_lease_changes_nothing(tmp_path, clock):
    """The fence every step relies on: its outcome applies only while it holds the lease."""
    client = FakeSupermemory()

    async def scenario(store):
        incident = await at(store, clock, State.MATCHED)
        t = await steps_for(store, clock, client).revoke(incident, OWNER)
        # The lease ran out meanwhile and another worker took the incident over.
        clock.advance(31.0)
        await store.claim("other-replica/2", 10, 30.0)
        return await record(store, t), await one(store, incident.id)

    applied, incident = run_with_store(tmp_path, clock, scenario)
    assert applied == [False] and incident.state is State.MATCHED
