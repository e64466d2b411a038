"""When an operator may push an incident again, and what that does.

The pipeline retries on its own, with backoff, until a step's window runs out and someone is paged.
An operator who has fixed the cause (a rotated admin token, Supermemory back up, an auth cache
flushed) should not have to wait out the backoff or the page's dead end, so two situations are
"stuck" and may be retried:

- a step that is failing and backing off (`received`, `matched` or `revoked` with attempts > 0):
  its attempts are reset and it runs now;
- `unconfirmed` (the key still answered after revoke and probes): it goes back to `matched`, so the
  revoke is issued again and the probes start over, provided the sealed token is still there to
  probe with.

Anything else is either moving on its own or final. The audit event names the operator.

An operator may also **resolve** any incident that is not final: typically an `unconfirmed` key
they have checked by other means (deleted in Supermemory's console, the org gone). It closes, the
sealed token is wiped, and their note stays on the timeline.
"""

from __future__ import annotations

from service.store import FINAL_STATES, Incident, State, Transition

_BACKING_OFF = frozenset({State.RECEIVED, State.MATCHED, State.REVOKED})


def retry_transition(incident: Incident, operator: str, now: float) -> Transition | None:
    """The transition that retries `incident` now, or None when it is not stuck.

    Not fenced on a lease: a worker that is running the step at this moment loses its write (its
    step runs again from here), which is what an operator asking for a retry wants.
    """
    detail = {
        "operator": operator,
        "from_state": str(incident.state),
        "attempts": incident.attempts,
        "last_reason": incident.last_reason,
    }
    reset = {"attempts": 0, "step_started_at": None, "last_reason": None, "unconfirmed_at": None}
    if incident.state is State.UNCONFIRMED and incident.has_token:
        return Transition(
            incident.id,
            State.UNCONFIRMED,
            "retry_requested",
            state=State.MATCHED,
            next_run_at=now,
            set={**reset, "revoke_reissued": False, "probed_at": None},
            detail=detail,
        )
    if incident.state in _BACKING_OFF and incident.attempts > 0:
        return Transition(
            incident.id, incident.state, "retry_requested", next_run_at=now, set=reset, detail=detail
        )
    return None


def resolve_transition(incident: Incident, operator: str, note: str, now: float) -> Transition | None:
    """The transition that closes `incident` by hand, or None when it is already final.

    Not fenced on a lease, like a retry: the operator's word wins over a step in flight.
    """
    if incident.state in FINAL_STATES:
        return None
    return Transition(
        incident.id,
        incident.state,
        "resolved",
        state=State.CLOSED,
        wipe_token=True,
        set={"closed_at": now, "last_reason": None},
        detail={"operator": operator, "note": note, "from_state": str(incident.state)},
    )
