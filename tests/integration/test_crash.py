"""SIGKILL mid-pipeline loses nothing: leases expire, steps run again, each key is revoked once."""

from __future__ import annotations

import threading

import httpx
import pytest

from service.sandbox import seeded_keys
from tests.harness import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(sandbox):
    extra = seeded_keys(12, seed="crash")
    sandbox.supermemory.add_keys(extra)
    return extra


def test_killed_between_commit_and_revoke(sandbox, make_service, keys, tmp_path):
    service = make_service()
    # Every revoke hangs, so the process dies with all its revokes in flight and none recorded.
    sandbox.supermemory.set_knobs(hang_ms={"revoke": 60_000})
    response = service.post_alert(sandbox.github, [k.token for k in keys])
    assert response.status_code == 200 and len(response.json()) == len(keys)
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 1)
    assert all(service.state(k.token) == "matched" for k in keys)
    service.kill()

    sandbox.supermemory.set_knobs(hang_ms={})
    restarted = make_service(workdir=tmp_path)
    for key in keys:
        restarted.wait_state(key.token, "confirmed", timeout=30)
    effective = sandbox.supermemory.stats()["effective_revokes"]
    assert effective == {k.id: 1 for k in keys}


def test_killed_between_revoke_and_confirm(sandbox, make_service, keys, tmp_path):
    service = make_service()
    # Revokes land, but the probes keep seeing the keys alive, so every incident waits at `revoked`.
    sandbox.supermemory.set_knobs(propagation_delay_s=600)
    service.post_alert(sandbox.github, [k.token for k in keys])
    for key in keys:
        service.wait_state(key.token, "revoked")
    wait_until(lambda: sum(sandbox.supermemory.stats()["probe_calls"].values()) >= len(keys))
    service.kill()

    sandbox.supermemory.set_knobs(propagation_delay_s=0)
    restarted = make_service(workdir=tmp_path)
    for key in keys:
        restarted.wait_state(key.token, "confirmed", timeout=30)
    assert sandbox.supermemory.stats()["effective_revokes"] == {k.id: 1 for k in keys}
    # The audit trail spans both processes and has each step exactly once per state change.
    for key in keys:
        events = restarted.events(key.token)
        assert events.count("revoked") == 1 and events.count("confirmed") == 1


def test_killed_before_the_request_lookup_finished(sandbox, make_service, keys, tmp_path):
    """An acknowledged alert whose lookup never ran in this process is still processed after restart."""
    service = make_service({"LEAK_RESPONDER_REQUEST_BUDGET": "0.3"})
    sandbox.supermemory.set_knobs(hang_ms={"lookup": 60_000})
    response = service.post_alert(sandbox.github, [k.token for k in keys])
    assert response.status_code == 200 and response.json() == []
    service.kill()

    sandbox.supermemory.set_knobs(hang_ms={})
    restarted = make_service(workdir=tmp_path)
    for key in keys:
        restarted.wait_state(key.token, "confirmed", timeout=30)
    assert sandbox.supermemory.stats()["effective_revokes"] == {k.id: 1 for k in keys}


def test_killed_during_the_request_lookup_acknowledged_nothing_and_recorded_nothing(
    sandbox, make_service, keys, tmp_path
):
    """The lookup runs before the alert's one commit: a process killed while it waits has sent no
    2xx and written nothing, so the reporter's redelivery is the alert's only record."""
    service = make_service({"LEAK_RESPONDER_REQUEST_BUDGET": "10"})
    sandbox.supermemory.set_knobs(hang_ms={"lookup": 60_000})
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(service.post_alert(sandbox.github, [k.token for k in keys]))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["lookup"] >= 1)
    service.kill()
    sender.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.HTTPError)
    assert service.count("alerts") == 0 and service.count("incidents") == 0

    sandbox.supermemory.set_knobs(hang_ms={})
    restarted = make_service(workdir=tmp_path)
    response = restarted.post_alert(sandbox.github, [k.token for k in keys])
    assert response.status_code == 200 and len(response.json()) == len(keys)
