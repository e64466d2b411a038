"""How an intake's event rows are built (service.store.common), apart from any database: a detail
is serialized once per distinct text-only detail, and never one detail's JSON for another's; a new
incident's token stays out of its repr."""

from __future__ import annotations

from typing import Any

from service.reasons import Reason
from service.store import State, TokenSighting
from service.store.common import IntakePlan, dumps, events_args
from service.store.sealing import Sealer
from service.store.sqlite import SQLITE


def test_each_detail_is_serialized_as_itself_and_text_details_once() -> None:
    details: list[dict[str, Any]] = [
        {"reason": Reason.NOT_A_KEY},
        {"reason": "not_a_key"},
        {"reporter": "github"},
        {"reporter": "gitlab"},
        # Equal as keys of a dict (1 == True == 1.0), different as JSON.
        {"n": 1},
        {"n": True},
        {"n": 1.0},
        {"ids": ["a", "b"]},
    ]
    rows = list(
        events_args(SQLITE, ((f"inc_{i}", 1.5, "kind", State.RECEIVED, d) for i, d in enumerate(details)))
    )
    assert [row[4] for row in rows] == [dumps(d) for d in details]
    assert [row[:4] for row in rows] == [(f"inc_{i}", 1.5, "kind", "received") for i in range(len(details))]
    # A reason and its text are one detail, serialized once for both events.
    assert rows[0][4] is rows[1][4]


def test_an_event_without_state_has_none() -> None:
    ((*_, state, detail),) = events_args(SQLITE, [("inc_1", 1.0, "note", None, {})])
    assert (state, detail) == (None, "{}")


def test_a_new_incident_never_shows_its_token() -> None:
    token = "sm_" + "Ab3dEf6hJk9mNp2q" * 2
    sighting = TokenSighting(token, "supermemory_api_key", None, None, "github")
    (new,) = IntakePlan.prepare([sighting], Sealer(bytes(32)), 1.0, 0.0).candidates.values()
    assert new.token == token
    # Its repr ends up in tracebacks and logs; a list of them too.
    for rendered in (repr(new), str(new), f"{new}", repr([new])):
        assert token not in rendered
        assert new.redacted in rendered
