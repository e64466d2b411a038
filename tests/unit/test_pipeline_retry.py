"""When an operator may retry or resolve an incident (service/pipeline/retry.py), for every state, and
what the transition does once the real store applies it: unfenced by a lease, fenced by the state."""

from __future__ import annotations

import pytest

from service.pipeline.retry import resolve_transition, retry_transition
from service.reasons import Reason
from service.store import FINAL_STATES, Incident, State
from service.supermemory import CallFailed
from tests.unit.pipeline_doubles import (
    OWNER,
    START,
    Clock,
    FakeSupermemory,
    claim_one,
    drive,
    intake,
    key_fields,
    one,
    record,
    run_with_store,
    steps_for,
)

NOW = START + 100.0
BACKING_OFF = [State.RECEIVED, State.MATCHED, State.REVOKED]


def incident(state: State, attempts: int = 0, has_token: bool = True) -> Incident:
    return Incident(
        id="inc_1",
        token_hash="ab" * 32,
        redacted="sm_abcd…wxyz",
        token_type="supermemory_api_key",
        state=state,
        label=None,
        key_id="key_1",
        org_id="org1",
        key_name="k",
        recipients=[],
        created_at=START,
        matched_at=START,
        revoked_at=START,
        confirmed_at=None,
        notified_at=None,
        closed_at=None,
        next_run_at=START + 50.0,
        attempts=attempts,
        step_started_at=START,
        revoke_reissued=True,
        pages=frozenset({"revocation_unconfirmed"}),
        last_reason="server_error",
        has_token=has_token,
        unconfirmed_at=START + 40.0 if state is State.UNCONFIRMED else None,
    )


# -- retry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", BACKING_OFF)
def test_retry_of_a_backing_off_step_runs_it_now_from_a_clean_slate(state):
    t = retry_transition(incident(state, attempts=4), "alice", NOW)
    assert t is not None
    assert (t.expected_state, t.state, t.event, t.next_run_at, t.lease_owner) == (
        state,
        None,
        "retry_requested",
        NOW,
        None,
    )
    assert t.set == {"attempts": 0, "step_started_at": None, "last_reason": None, "unconfirmed_at": None}
    assert t.detail == {
        "operator": "alice",
        "from_state": str(state),
        "attempts": 4,
        "last_reason": "server_error",
    }
    assert not t.wipe_token


@pytest.mark.parametrize("state", BACKING_OFF)
def test_retry_of_a_step_that_is_not_failing_is_refused(state):
    assert retry_transition(incident(state, attempts=0), "alice", NOW) is None


def test_retry_of_an_unconfirmed_key_revokes_it_again_and_starts_the_probes_over():
    t = retry_transition(incident(State.UNCONFIRMED, attempts=0), "alice", NOW)
    assert t is not None
    assert (t.expected_state, t.state, t.next_run_at) == (State.UNCONFIRMED, State.MATCHED, NOW)
    assert t.set["revoke_reissued"] is False and t.set["unconfirmed_at"] is None and t.set["attempts"] == 0
    assert t.set["probed_at"] is None, "its re-probes start over from the next unconfirmed"


def test_retry_of_an_unconfirmed_key_without_its_token_is_refused():
    assert retry_transition(incident(State.UNCONFIRMED, has_token=False), "alice", NOW) is None


@pytest.mark.parametrize("state", [State.CONFIRMED, State.NOTIFIED, State.FALSE_POSITIVE, State.CLOSED])
def test_retry_of_an_incident_moving_on_its_own_or_final_is_refused(state):
    assert retry_transition(incident(state, attempts=3), "alice", NOW) is None


def test_every_state_has_a_retry_answer():
    """The tests above cover each state; a new state must be added to them."""
    covered = {
        *BACKING_OFF,
        State.UNCONFIRMED,
        State.CONFIRMED,
        State.NOTIFIED,
        State.FALSE_POSITIVE,
        State.CLOSED,
    }
    assert covered == set(State)


# -- resolve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(set(State) - FINAL_STATES))
def test_resolve_closes_any_open_incident_with_the_operators_note(state):
    t = resolve_transition(incident(state, attempts=2), "bob", "deleted in the console", NOW)
    assert t is not None
    assert (t.expected_state, t.state, t.event, t.next_run_at, t.lease_owner) == (
        state,
        State.CLOSED,
        "resolved",
        None,
        None,
    )
    assert t.wipe_token and t.set == {"closed_at": NOW, "last_reason": None}
    assert t.detail == {"operator": "bob", "note": "deleted in the console", "from_state": str(state)}


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_resolve_of_a_final_incident_is_refused(state):
    assert resolve_transition(incident(state), "bob", "n", NOW) is None


# -- as the store applies them ---------------------------------------------------------------------


def test_retry_wins_over_a_step_in_flight(tmp_path):
    """Not fenced on the lease: the worker's late outcome is the one superseded."""
    clock = Clock()
    client = FakeSupermemory()

    async def scenario(store):
        [incident_id] = await intake(store, 1)
        await drive(store, incident_id, State.MATCHED, START, **key_fields(1), attempts=2)
        leased = await claim_one(store, incident_id)
        client.revoke_error = CallFailed(Reason.SERVER_ERROR, 503)
        late = await steps_for(store, clock, client).revoke(leased, OWNER)
        retried = retry_transition(leased, "alice", clock())
        assert retried is not None
        return await record(store, retried), await record(store, late), await store.detail(incident_id)

    applied_retry, applied_late, detail = run_with_store(tmp_path, clock, scenario)
    assert applied_retry == [True] and applied_late == [False]
    assert detail.incident.attempts == 0 and detail.incident.next_run_at == START
    assert detail.events[-1].kind == "retry_requested" and detail.events[-1].detail["operator"] == "alice"


def test_resolve_of_an_unconfirmed_key_wipes_its_token_and_keeps_the_note(tmp_path):
    clock = Clock()

    async def scenario(store):
        [incident_id] = await intake(store, 1)
        await drive(
            store, incident_id, State.UNCONFIRMED, START + 3600, **key_fields(1), unconfirmed_at=START
        )
        found = await one(store, incident_id)
        t = resolve_transition(found, "bob", "org deleted", clock())
        assert t is not None
        applied = await record(store, t)
        # The incident moved on meanwhile: a resolve computed from the old read no longer applies.
        stale = retry_transition(found, "alice", clock())
        assert stale is not None
        return applied, await record(store, stale), await store.detail(incident_id)

    applied, stale, detail = run_with_store(tmp_path, clock, scenario)
    assert applied == [True] and stale == [False]
    assert detail.incident.state is State.CLOSED and not detail.incident.has_token
    assert detail.incident.next_run_at is None and detail.incident.closed_at == START
    assert detail.events[-1].kind == "resolved" and detail.events[-1].detail["note"] == "org deleted"
