"""POST /v1/reports against the real service: operator auth, every body kind, the 1 MiB limit, the
Idempotency-Key cases, and found keys revoked and confirmed through the sandbox."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from service.tokens import token_hash
from tests.harness import wait_until
from tests.integration.operator_helpers import TOKENS, operator_env, refused, report

pytestmark = pytest.mark.integration


@pytest.fixture
def ops(make_service):
    return make_service(operator_env())


def test_auth_failures(ops):
    url = f"{ops.url}/v1/reports"
    missing = httpx.post(url, content=b"hello")
    refused(missing, 401, "auth_missing", ops)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    refused(httpx.post(url, content=b"x", headers={"Authorization": "Basic YTpi"}), 401, "auth_missing", ops)
    wrong = httpx.post(url, content=b"x", headers={"Authorization": "Bearer not-an-operator"})
    refused(wrong, 403, "auth_forbidden", ops)
    # The operator routes all share the gate.
    assert httpx.get(f"{ops.url}/v1/incidents").status_code == 401
    assert httpx.get(f"{ops.url}/v1/incidents", headers={"Authorization": "Bearer nope"}).status_code == 403


def test_text_report_is_revoked_and_confirmed(sandbox, ops):
    key = sandbox.tokens[0]
    text = f"# deploy notes\nSUPERMEMORY_API_KEY={key}\nnot a key: sm_project_default\n"
    response = report(ops, text, content_type="text/plain")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "text"
    [finding] = body["findings"]
    assert finding["token_hash"] == token_hash(key)
    assert finding["redacted"].startswith("sm_") and key not in response.text
    assert (finding["line"], finding["column"], finding["confidence"]) == (2, 21, "high")
    assert finding["label"] == "true_positive"
    assert finding["incident_id"].startswith("inc_")
    ops.wait_state(key, "confirmed")
    assert sandbox.supermemory.stats()["effective_revokes"] == {sandbox.supermemory.keys[0].id: 1}
    with ops.db() as conn:
        sighting = conn.execute("SELECT * FROM sightings").fetchone()
        alert = conn.execute("SELECT * FROM alerts").fetchone()
    assert (sighting["reporter"], sighting["source"], sighting["operator"]) == (
        "manual",
        "manual_submission",
        "alice",
    )
    assert (alert["reporter"], alert["operator"], alert["item_count"]) == ("manual", "alice", 1)


def test_json_text_and_listed_tokens(sandbox, ops):
    key, other = sandbox.tokens[1], sandbox.tokens[2]
    first = report(
        ops, {"text": f"x-api-key: {key}", "url": "https://paste.example/abc", "note": "from #incidents"}
    )
    assert first.status_code == 200, first.text
    assert first.json()["kind"] == "text"
    assert [f["token_hash"] for f in first.json()["findings"]] == [token_hash(key)]

    listed = report(ops, {"tokens": [other, "ghp_notsupermemory", other]}, operator="bob")
    assert listed.status_code == 200, listed.text
    findings = listed.json()["findings"]
    assert listed.json()["kind"] == "tokens"
    assert [f["token_hash"] for f in findings] == [
        token_hash(t) for t in (other, "ghp_notsupermemory", other)
    ]
    assert findings[0]["label"] == "true_positive" and findings[0]["confidence"] is None
    assert (findings[1]["state"], findings[1]["label"]) == ("false_positive", "false_positive")
    assert findings[0]["incident_id"] == findings[2]["incident_id"]
    with ops.db() as conn:
        row = conn.execute(
            "SELECT s.url, s.note, s.operator FROM sightings s JOIN incidents i ON i.id = s.incident_id"
            " WHERE i.token_hash = ?",
            (token_hash(key),),
        ).fetchone()
    assert tuple(row) == ("https://paste.example/abc", "from #incidents", "alice")


def test_gitleaks_report(sandbox, ops):
    key = sandbox.tokens[3]
    gitleaks = [
        {
            "RuleID": "generic-api-key",
            "File": "config/.env",
            "StartLine": 7,
            "StartColumn": 12,
            "Secret": key,
            "Match": f"SUPERMEMORY_KEY={key}",
            "Commit": "abc123",
        },
        {
            "RuleID": "aws-access-token",
            "File": "infra/main.tf",
            "StartLine": 3,
            "StartColumn": 1,
            "Secret": "AKIAIOSFODNN7EXAMPLE",
            "Match": "AKIAIOSFODNN7EXAMPLE",
        },
    ]
    response = report(ops, json.dumps(gitleaks))  # no content type: recognised by its shape
    assert response.status_code == 200, response.text
    assert response.json()["kind"] == "gitleaks"
    [finding] = response.json()["findings"]
    assert (finding["file"], finding["line"], finding["column"]) == ("config/.env", 7, 12)
    assert finding["token_hash"] == token_hash(key)
    ops.wait_state(key, "confirmed")


def test_trufflehog_report(sandbox, ops):
    key = sandbox.tokens[4]
    lines = [
        {
            "SourceMetadata": {
                "Data": {
                    "Git": {
                        "commit": "0a1b2c",
                        "file": "src/client.ts",
                        "line": 42,
                        "repository": "https://github.com/octocat/demo",
                    }
                }
            },
            "DetectorName": "Supermemory",
            "Raw": key,
            "RawV2": f"{key}",
        },
        {
            "SourceMetadata": {"Data": {"Filesystem": {"file": "notes.txt", "line": 1}}},
            "DetectorName": "Github",
            "Raw": "ghp_notsupermemory",
        },
    ]
    body = "\n".join(json.dumps(line) for line in lines) + "\n"
    response = report(ops, body, content_type="application/x-ndjson")
    assert response.status_code == 200, response.text
    assert response.json()["kind"] == "trufflehog"
    [finding] = response.json()["findings"]
    assert (finding["file"], finding["line"], finding["token_hash"]) == ("src/client.ts", 42, token_hash(key))
    ops.wait_state(key, "confirmed")
    assert ops.count("sightings") == 1


def test_report_without_keys_records_nothing(ops):
    response = report(ops, "nothing to see here\n", content_type="text/plain")
    assert response.status_code == 200
    assert response.json() == {"kind": "text", "findings": []}
    assert ops.count("alerts") == 0


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"a" * (1024 * 1024 + 1), "text/plain", 413, "report_too_large"),
        (b"\xff\xfe not utf-8", "text/plain", 400, "report_not_utf8"),
        (b'{"whatever": 1}', "application/json", 400, "report_unrecognised"),
        (b'{"tokens": "sm_notalist"}', "application/json", 400, "report_bad_field"),
        (b'{"text": 5}', "application/json", 400, "report_bad_field"),
        (
            json.dumps({"text": "hi", "note": "key was sm_" + "A" * 22 + "_" + "b" * 64}).encode(),
            "application/json",
            400,
            "report_note_holds_key",
        ),
    ],
)
def test_refusals(ops, body, content_type, status, reason):
    response = report(ops, body, content_type=content_type)
    refused(response, status, reason, ops)
    assert ops.count("alerts") == 0


def test_idempotent_replay_and_mismatch(sandbox, ops):
    key = sandbox.tokens[0]
    first = report(ops, {"tokens": [key]}, key="report-1")
    assert first.status_code == 200
    again = report(ops, {"tokens": [key]}, key="report-1")
    assert (again.status_code, again.content) == (200, first.content)
    assert ops.count("alerts") == 1
    refused(report(ops, {"tokens": [key, "other"]}, key="report-1"), 422, "idempotency_mismatch", ops)
    # Keys belong to an operator: bob's "report-1" is his own.
    assert report(ops, {"tokens": ["other"]}, key="report-1", operator="bob").status_code == 200
    refused(report(ops, "x", content_type="text/plain", key='"bad key"'), 400, "idempotency_key_invalid", ops)
    # The draft's quoted form names the same key as the bare one.
    assert report(ops, {"tokens": [key]}, key='"report-1"').content == first.content


def test_idempotency_conflict_while_the_first_runs(sandbox, ops):
    """The first request waits in its label budget on a slow lookup; a retry meanwhile gets 409."""
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 1500})
    key = sandbox.tokens[1]
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: results.update(first=report(ops, {"tokens": [key]}, key="slow")))
    first.start()

    def running() -> bool:
        with ops.db() as conn:
            return conn.execute("SELECT count(*) FROM idempotency WHERE state = 'running'").fetchone()[0] == 1

    wait_until(running, timeout=10, interval=0.01)
    refused(report(ops, {"tokens": [key]}, key="slow"), 409, "idempotency_conflict", ops)
    first.join(timeout=30)
    assert results["first"].status_code == 200
    replay = report(ops, {"tokens": [key]}, key="slow")
    assert (replay.status_code, replay.content) == (200, results["first"].content)


def test_operator_tokens_are_only_hashes(ops):
    assert all(token not in ops.log_text() for token in TOKENS.values())
