"""What holds the service up through restarts, key rotations and keys that will not die: the SQLite
owner lock, leases taken back at once by a restart, the data-key check, `rewrap`, and an
`unconfirmed` key that stays open, is re-probed and is resolved by hand."""

from __future__ import annotations

import base64
import os
import time

import httpx
import pytest

from tests.harness import Service, postgres_env, wait_until
from tests.integration.operator_helpers import auth, operator_env

pytestmark = pytest.mark.integration

# Long enough that a restart which merely waited the lease out would be seen to.
LONG_LEASE = {"LEAK_RESPONDER_LEASE_SECONDS": "60"}
QUICK_REPROBES = {"LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.5"}


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def revoked_soon_after_restart(sandbox, make_service, env, tmp_path) -> float:
    """SIGKILL right after the ack, with the revoke in flight; seconds from the restart to the revoke."""
    key = sandbox.supermemory.keys[0]
    service = make_service({**env, **LONG_LEASE})
    sandbox.supermemory.set_knobs(hang_ms={"revoke": 60_000})
    assert service.post_alert(sandbox.github, [key.token]).status_code == 200
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 1)
    service.kill()
    sandbox.supermemory.set_knobs(hang_ms={})
    restarted_at = time.time()
    restarted = make_service({**env, **LONG_LEASE}, workdir=tmp_path)
    restarted.wait_state(key.token, "revoked", "confirmed", timeout=50)
    return restarted.incident(key.token)["revoked_at"] - restarted_at


def test_sqlite_restart_takes_back_the_dead_process_leases_at_once(sandbox, make_service, tmp_path):
    # Well under the 60 s lease: the restart did not wait it out.
    assert revoked_soon_after_restart(sandbox, make_service, {}, tmp_path) < 15


def test_postgres_replica_restarting_under_its_id_takes_back_its_leases(
    sandbox, make_service, pg_url, tmp_path
):
    env = {**postgres_env(sandbox, pg_url), "LEAK_RESPONDER_REPLICA_ID": "replica-0"}
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    assert revoked_soon_after_restart(sandbox, make_service, env, tmp_path) < 15


def test_postgres_leaves_another_replicas_leases_until_they_expire(sandbox, make_service, pg_url, tmp_path):
    env = {**postgres_env(sandbox, pg_url), "LEAK_RESPONDER_LEASE_SECONDS": "6"}
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    key = sandbox.supermemory.keys[0]
    service = make_service({**env, "LEAK_RESPONDER_REPLICA_ID": "replica-0"})
    sandbox.supermemory.set_knobs(hang_ms={"revoke": 60_000})
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 1)
    leased_until = service.incident(key.token)["lease_until"]
    service.kill()
    sandbox.supermemory.set_knobs(hang_ms={})
    other = make_service({**env, "LEAK_RESPONDER_REPLICA_ID": "replica-1"}, workdir=tmp_path)
    other.wait_state(key.token, "revoked", "confirmed", timeout=30)
    # replica-0 may be alive for all replica-1 knows: its lease ran out before anyone took the step.
    assert other.incident(key.token)["revoked_at"] >= leased_until


def test_a_second_process_on_the_same_sqlite_file_refuses_to_start(service, make_service, tmp_path):
    before = len(service.log_text())  # the second one appends to the first one's log
    second = make_service(ready=False, workdir=tmp_path)
    assert second.proc.wait(timeout=30) == 2
    lines = second.log_text()[before:].strip().splitlines()
    assert len(lines) == 1, lines
    assert f"pid {service.proc.pid}" in lines[0] and "one process owns a SQLite store" in lines[0]
    assert httpx.get(f"{service.url}/readyz").status_code == 200


def test_data_key_check_rotation_and_rewrap(sandbox, make_service, tmp_path):
    old, new = os.urandom(32), os.urandom(32)
    keys = sandbox.supermemory.keys[:3]
    # The keys never die, so their tokens stay sealed (unconfirmed incidents keep them).
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service({"LEAK_RESPONDER_DATA_KEY": b64(old), **QUICK_REPROBES})
    service.post_alert(sandbox.github, [k.token for k in keys])
    for key in keys:
        service.wait_state(key.token, "unconfirmed", timeout=30)
    service.stop()

    # A service started with another key refuses, naming the setting, instead of failing every probe.
    before = len(service.log_text())
    wrong = make_service({"LEAK_RESPONDER_DATA_KEY": b64(new)}, ready=False, workdir=tmp_path)
    assert wrong.proc.wait(timeout=30) == 2
    (line,) = wrong.log_text()[before:].strip().splitlines()
    assert (
        line.startswith("leak-responder: setting LEAK_RESPONDER_DATA_KEY:")
        and "none of the configured" in line
    )

    rotating = {"LEAK_RESPONDER_DATA_KEY": b64(new), "LEAK_RESPONDER_DATA_KEY_FALLBACKS": b64(old)}
    # With the service stopped: a SQLite file has one owner.
    first = Service(tmp_path, {**sandbox.env(), **rotating})
    rewrap = first.cli("rewrap", "--batch", "2")
    assert rewrap.returncode == 0, rewrap.stderr
    assert rewrap.stdout.startswith("resealed 3 value(s)")
    again = first.cli("rewrap")
    assert again.returncode == 0 and again.stdout.startswith("resealed 0 value(s)")

    # The old key can go: everything opens with the new one, and the re-probes still run with it.
    sandbox.supermemory.set_knobs(never_revoke=False)
    done = make_service(
        {"LEAK_RESPONDER_DATA_KEY": b64(new), **QUICK_REPROBES},
        workdir=tmp_path,
    )
    for key in keys:
        done.wait_state(key.token, "confirmed", timeout=30)  # no SMTP here: parked for a notifier


def test_unconfirmed_key_is_reprobed_rerevoked_and_confirmed_on_a_401(sandbox, make_service):
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service({**operator_env(), "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.3"})
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    service.wait_state(key.token, "unconfirmed")
    revokes = sandbox.supermemory.stats()["calls"]["revoke"]
    # Still alive: probed again and the revoke re-issued, on the slow schedule, and still open.
    wait_until(lambda: service.events(key.token).count("reprobed") >= 2)
    assert sandbox.supermemory.stats()["calls"]["revoke"] >= revokes + 2
    listed = service.http.get(
        f"{service.url}/v1/incidents", params={"state": "unconfirmed"}, headers=auth("alice")
    ).json()["incidents"]
    assert [i["redacted"] for i in listed] == [service.incident(key.token)["redacted"]]

    sandbox.supermemory.set_knobs(never_revoke=False)
    # No SMTP here: confirmed, token wiped, and parked for a notifier like any confirmed key.
    service.wait_state(key.token, "confirmed")
    incident = service.incident(key.token)
    assert incident["token_sealed"] is None and incident["confirmed_at"] is not None
    assert service.events(key.token)[-2:] == ["reprobed", "confirmed"]


def test_unconfirmed_past_its_window_pages_again_then_an_operator_resolves_it(sandbox, make_service):
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service(
        {
            **operator_env(),
            "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "0.3",
            "LEAK_RESPONDER_UNCONFIRMED_WINDOW": "1",
        }
    )
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: "unconfirmed_window_over" in service.incident(key.token)["pages"])
    (page,) = service.logged("unconfirmed_window_over")
    assert page["page"] is True and page["level"] == "critical"
    parked = service.incident(key.token)
    assert parked["state"] == "unconfirmed" and parked["next_run_at"] is None
    assert parked["token_sealed"] is not None

    url = f"{service.url}/v1/incidents/{parked['id']}/resolve"
    missing = service.http.post(url, json={}, headers=auth("alice"))
    assert (missing.status_code, missing.json()["error"]) == (400, "resolution_invalid")
    holds_key = service.http.post(url, json={"note": f"it was {key.token}"}, headers=auth("alice"))
    assert (holds_key.status_code, holds_key.json()["error"]) == (400, "report_note_holds_key")
    assert service.state(key.token) == "unconfirmed"

    note = "deleted in the admin console, SEC-1"
    resolved = service.http.post(url, json={"note": note}, headers=auth("alice"))
    assert resolved.status_code == 200, resolved.text
    body = resolved.json()
    assert body["state"] == "closed"
    event = body["events"][-1]
    assert event["kind"] == "resolved"
    assert event["detail"] == {
        "operator": "alice",
        "note": note,
        "from_state": "unconfirmed",
    }
    assert service.incident(key.token)["token_sealed"] is None
    again = service.http.post(url, json={"note": "twice"}, headers=auth("alice"))
    assert (again.status_code, again.json()["error"]) == (409, "incident_already_final")
