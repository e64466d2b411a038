"""Every error answer over real HTTP, ours or the framework's, has one shape (RFC 9457 problem details
plus our reason code), carries X-Request-Id, and has its log line and metric; a client that hangs up
is an INFO line, not an ERROR with a traceback."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.harness import metric, stranger_signature, wait_until
from tests.integration.operator_helpers import auth, operator_env, unreadable_incident

pytestmark = pytest.mark.integration


def assert_problem(response: httpx.Response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert len(response.headers["x-request-id"]) == 16
    body = response.json()
    assert body["status"] == status and body["error"] == reason
    assert body["type"] == f"urn:leak-responder:reason:{reason}"
    assert body["title"] and body["detail"]
    return body


def test_unknown_reporter_is_not_echoed_and_is_logged_and_counted(service):
    token = "sm_" + "Q" * 40
    response = httpx.post(f"{service.url}/v1/alerts/{token}", content=b"[]")
    body = assert_problem(response, 404, "reporter_disabled")
    assert token not in response.text and "Q" * 8 not in body["detail"]
    wait_until(lambda: service.logged("reporter_disabled"))
    assert service.failures("inbound", "reporter_disabled") == 1


def test_framework_refusals_have_the_same_shape(service):
    assert_problem(httpx.get(f"{service.url}/nowhere"), 404, "route_not_found")
    wrong = httpx.get(f"{service.url}/v1/alerts/github")
    assert_problem(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert service.failures("http", "route_not_found") == 1
    # Refusals of the routes themselves too: an alert without signature, an operator without token.
    assert_problem(httpx.post(f"{service.url}/v1/alerts/github", content=b"[]"), 401, "signature_missing")
    assert_problem(httpx.get(f"{service.url}/v1/incidents"), 403, "operators_not_configured")


def test_an_unexpected_error_is_a_problem_500_with_its_request_id_in_the_log(sandbox, make_service):
    service = make_service(operator_env())
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    incident = unreadable_incident(service, token)
    response = httpx.get(f"{service.url}/v1/incidents/{incident['id']}", headers=auth())
    body = assert_problem(response, 500, "internal_error")
    rid = response.headers["x-request-id"]
    assert rid in body["detail"]
    [line] = wait_until(lambda: service.logged("internal_error"))
    assert line["level"] == "error" and line["request_id"] == rid and "JSONDecodeError" in line["exception"]
    assert service.failures("http", "internal_error") == 1
    # Nothing else reported it: no uvicorn "Exception in ASGI application".
    assert not [
        r for r in service.log_records() if r["logger"].startswith("uvicorn") and r["level"] == "error"
    ]


def test_a_client_hanging_up_mid_body_is_an_info_line(sandbox, sentry, make_service):
    service = make_service(sentry.env())
    head = (
        "POST /v1/alerts/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Github-Public-Key-Identifier: {sandbox.github.key_identifier}\r\n"
        f"Github-Public-Key-Signature: {stranger_signature()}\r\nContent-Length: 100000\r\n\r\n"
    )
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(head.encode() + b"[" * 1000)
            time.sleep(0.05)
    lines = wait_until(
        lambda: len(service.logged("client_disconnected")) == 5 and service.logged("client_disconnected")
    )
    assert {line["level"] for line in lines} == {"info"}
    assert not [r for r in service.log_records() if r["level"] in ("error", "critical")]
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "leak_responder_failures_total", stage="http", reason="client_disconnected") == 5
    # Not our error, so not a Sentry event either (the SDK would send one at once; give it a second).
    time.sleep(1)
    assert sentry.events() == []
