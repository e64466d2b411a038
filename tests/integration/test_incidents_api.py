"""The operator's read side and the retry, against the real service: list filters and pagination,
the detail's timeline, retrying an unconfirmed incident, /openapi.json, and the CLI's clients."""

from __future__ import annotations

import time
from typing import Any, cast

import httpx
import pytest
from starlette.routing import Mount

from service.app import create_app
from service.cli import main
from service.console.plots import stamp
from service.operators import iso
from service.tokens import token_hash
from tests.harness import wait_until
from tests.integration.console_helpers import ConsoleClient
from tests.integration.operator_helpers import TOKENS, auth, get, operator_env, refused, report

pytestmark = pytest.mark.integration


@pytest.fixture
def ops(make_service):
    return make_service(operator_env())


def all_pages(service, **params) -> list[dict]:
    found, cursor = [], None
    while True:
        page = get(service, "/v1/incidents", **params, **({"next": cursor} if cursor else {})).json()
        found += page["incidents"]
        cursor = page["next"]
        if cursor is None:
            return found


def test_list_filters_and_pagination(sandbox, ops):
    keys = sandbox.tokens[:3]
    before = time.time()
    assert report(ops, {"tokens": [*keys, "not-a-key-1", "not-a-key-2"]}).status_code == 200
    assert ops.post_alert(sandbox.github, [sandbox.tokens[3]]).status_code == 200
    for key in [*keys, sandbox.tokens[3]]:
        ops.wait_state(key, "confirmed")

    everything = all_pages(ops, limit=2)
    assert len(everything) == 6 == len({i["id"] for i in everything})
    assert [i["id"] for i in everything] == sorted((i["id"] for i in everything), reverse=True)
    assert all(sandbox.tokens[0] not in str(i) for i in everything)

    def ids(**params: Any) -> set[str]:
        return {i["token_hash"] for i in all_pages(ops, **params)}

    assert ids(state="false_positive") == {token_hash("not-a-key-1"), token_hash("not-a-key-2")}
    assert ids(reporter="github") == {token_hash(sandbox.tokens[3])}
    assert len(ids(reporter="manual")) == 5
    org = sandbox.supermemory.keys[0].org_id
    expected = {token_hash(k.token) for k in sandbox.supermemory.keys[:4] if k.org_id == org}
    assert ids(org=org) == expected
    assert len(ids(since=before - 1)) == 6
    assert ids(since=time.time() + 60) == set()
    assert ids(until="2000-01-01T00:00:00Z") == set()
    assert len(ids(until="2999-01-01T00:00:00+00:00")) == 6

    page = get(ops, "/v1/incidents", limit=200).json()
    assert page["next"] is None and len(page["incidents"]) == 6
    for params in ({"limit": 201}, {"limit": "x"}, {"state": "bogus"}, {"next": "garbage"}, {"since": "May"}):
        refused(get(ops, "/v1/incidents", **params), 400, "query_invalid", ops)


def test_detail_has_timeline_and_times(sandbox, ops):
    key = sandbox.tokens[0]
    response = report(ops, {"text": f"token={key}", "url": "https://paste.example/1", "note": "from chat"})
    incident_id = response.json()["findings"][0]["incident_id"]
    ops.wait_state(key, "confirmed")
    detail = get(ops, f"/v1/incidents/{incident_id}").json()
    assert [e["kind"] for e in detail["events"]] == ["received", "matched", "revoked", "confirmed"]
    assert detail["events"][0]["detail"] == {"reporter": "manual"}
    assert detail["state"] == "confirmed" and detail["label"] == "true_positive"
    assert 0 <= detail["time_to_revoke"] <= detail["time_to_confirm"]
    assert detail["key_id"] == sandbox.supermemory.keys[0].id
    [sighting] = detail["sightings"]
    assert sighting | {"seen_at": None} == {
        "seen_at": None,
        "reporter": "manual",
        "operator": "alice",
        "url": "https://paste.example/1",
        "source": "manual_submission",
        "token_type": "supermemory_api_key",
        "note": "from chat",
    }
    assert key not in get(ops, f"/v1/incidents/{incident_id}").text
    refused(get(ops, "/v1/incidents/inc_000000000000deadbeef0000"), 404, "incident_not_found", ops)


def test_retry_unconfirmed_incident(sandbox, ops):
    """Without SMTP an unconfirmed incident stays put; once the cause is fixed, a retry revokes again."""
    sandbox.supermemory.set_knobs(never_revoke=True)
    key = sandbox.tokens[0]
    incident_id = report(ops, {"tokens": [key]}).json()["findings"][0]["incident_id"]
    ops.wait_state(key, "unconfirmed", timeout=30)
    sandbox.supermemory.set_knobs(never_revoke=False)

    retried = httpx.post(f"{ops.url}/v1/incidents/{incident_id}/retry", headers=auth("bob"), timeout=30)
    assert retried.status_code == 202, retried.text
    assert retried.json()["events"][-1]["kind"] == "retry_requested"
    ops.wait_state(key, "confirmed")
    detail = get(ops, f"/v1/incidents/{incident_id}").json()
    retry = next(e for e in detail["events"] if e["kind"] == "retry_requested")
    assert retry["state"] == "matched"
    assert retry["detail"]["operator"] == "bob" and retry["detail"]["from_state"] == "unconfirmed"
    assert [e["kind"] for e in detail["events"]][-2:] == ["revoked", "confirmed"]

    again = httpx.post(f"{ops.url}/v1/incidents/{incident_id}/retry", headers=auth(), timeout=30)
    refused(again, 409, "incident_not_retryable", ops)
    missing = httpx.post(f"{ops.url}/v1/incidents/inc_000000000000deadbeef0000/retry", headers=auth())
    refused(missing, 404, "incident_not_found", ops)


def test_an_unconfirmed_key_shows_since_when_it_answered_and_its_last_probe(
    sandbox, make_service, monkeypatch, capsys
):
    """What a key did after its revoke stays visible once a re-probe confirms it: in the API, in
    `incidents show` and on the console's incident page, from the same two times (re-probes more
    than a second apart, so that the page's stamps, to the second, differ too)."""
    ops = make_service({**operator_env(), "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "1.2"})
    sandbox.supermemory.set_knobs(never_revoke=True)
    key = sandbox.tokens[0]
    incident_id = report(ops, {"tokens": [key]}).json()["findings"][0]["incident_id"]
    wait_until(lambda: "reprobed" in ops.events(key))
    sandbox.supermemory.set_knobs(never_revoke=False)
    ops.wait_state(key, "confirmed")
    row = ops.incident(key)
    assert row["unconfirmed_at"] < row["probed_at"] == row["confirmed_at"]

    shown = get(ops, f"/v1/incidents/{incident_id}").json()
    assert shown["unconfirmed_at"] == iso(row["unconfirmed_at"])
    assert shown["probed_at"] == iso(row["probed_at"])
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    assert main(["incidents", "show", incident_id, "--url", ops.url]) == 0
    line = f"answered after its revoke from {shown['unconfirmed_at']}, last probed {shown['probed_at']}"
    assert line in capsys.readouterr().out.splitlines()
    console = ConsoleClient(ops)
    assert console.sign_in().status_code == 303
    page = console.get(f"/console/incidents/{incident_id}").text
    assert f'<dd id="unconfirmed-at">{stamp(row["unconfirmed_at"])}</dd>' in page
    assert f'<dd id="probed-at">{stamp(row["probed_at"])}</dd>' in page


def test_retry_resets_a_failing_revoke(sandbox, make_service):
    # A backoff of minutes: after its first failure the revoke is not tried again within this test
    # unless the operator's retry brings it forward, so the incident is certainly stuck when retried.
    ops = make_service(
        {**operator_env(), "LEAK_RESPONDER_BACKOFF_BASE": "600", "LEAK_RESPONDER_BACKOFF_MAX": "600"}
    )
    sandbox.supermemory.set_knobs(fail_next={"revoke": 1000}, fail_status={"revoke": 503})
    key = sandbox.tokens[1]
    incident_id = report(ops, {"tokens": [key]}).json()["findings"][0]["incident_id"]
    failing = wait_until(lambda: (row := ops.incident(key)) and row["attempts"] >= 1 and row)
    assert failing["state"] == "matched" and failing["last_reason"] == "server_error"
    assert failing["next_run_at"] - time.time() > 250
    sandbox.supermemory.set_knobs(fail_next={})
    retried = httpx.post(f"{ops.url}/v1/incidents/{incident_id}/retry", headers=auth(), timeout=30)
    assert retried.status_code == 202, retried.text
    assert retried.json()["attempts"] == 0
    ops.wait_state(key, "confirmed")
    assert "retry_requested" in ops.events(key)
    # Confirmed now, it is not stuck any more.
    refused(
        httpx.post(f"{ops.url}/v1/incidents/{incident_id}/retry", headers=auth(), timeout=30),
        409,
        "incident_not_retryable",
        ops,
    )


def test_openapi_describes_every_route(ops):
    document = httpx.get(f"{ops.url}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    app = create_app(cast(Any, None), runtime=cast(Any, object()))
    # The console (one Mount) is HTML for browsers, described in docs/console.md instead.
    paths = {route.path for route in app.routes if not isinstance(route, Mount)}  # type: ignore[attr-defined]
    described = set(document["paths"])
    assert paths <= described, paths - described
    assert document["paths"]["/v1/alerts/{reporter}"]["post"]["parameters"][0]["schema"]["enum"] == ["github"]


def test_cli_report_and_incidents(sandbox, ops, tmp_path, monkeypatch, capsys):
    key = sandbox.tokens[2]
    leak = tmp_path / "leak.env"
    leak.write_text(f"A=1\nSUPERMEMORY_API_KEY={key}\n")
    monkeypatch.delenv("LEAK_RESPONDER_OPERATOR_TOKEN", raising=False)
    assert main(["report", str(leak), "--url", ops.url]) == 2
    assert "no operator token" in capsys.readouterr().err

    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", "wrong")
    assert main(["report", str(leak), "--url", ops.url]) == 1
    assert "403 auth_forbidden" in capsys.readouterr().err

    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    assert main(["report", str(leak), "--url", ops.url]) == 0
    out = capsys.readouterr().out
    assert "text report: 1 finding(s)" in out and "2:21: sm_" in out and key not in out
    # The same content again is a replay (same Idempotency-Key): no second alert.
    assert main(["report", str(leak), "--url", ops.url]) == 0
    assert capsys.readouterr().out == out
    assert ops.count("alerts") == 1
    ops.wait_state(key, "confirmed")

    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["bob"] + "\n")
    monkeypatch.delenv("LEAK_RESPONDER_OPERATOR_TOKEN")
    assert main(["incidents", "list", "--url", ops.url, "--token-file", str(token_file)]) == 0
    listing = capsys.readouterr().out
    incident_id = ops.incident(key)["id"]
    assert listing.splitlines()[0].split() == ["ID", "STATE", "LABEL", "KEY", "ORG", "RECEIVED", "TTR", "TTC"]
    assert incident_id in listing and "confirmed" in listing
    assert main(["incidents", "show", incident_id, "--url", ops.url, "--token-file", str(token_file)]) == 0
    shown = capsys.readouterr().out
    assert "timeline:" in shown and "revoked" in shown and "manual (alice)" in shown and key not in shown
    assert main(["incidents", "show", "inc_nope", "--url", ops.url, "--token-file", str(token_file)]) == 1
    assert "404 incident_not_found" in capsys.readouterr().err
    assert main(["incidents", "list", "--url", "http://127.0.0.1:9", "--token-file", str(token_file)]) == 2
