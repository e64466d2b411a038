"""Operators for integration tests: their tokens, the environment that configures them, and calls."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx

from tests.harness import Service

TOKENS = {"alice": "alice-operator-token-1", "bob": "bob-operator-token-2"}


def operator_env() -> dict[str, str]:
    pairs = (f"{name}:{hashlib.sha256(token.encode()).hexdigest()}" for name, token in TOKENS.items())
    return {"LEAK_RESPONDER_OPERATOR_TOKENS": ",".join(pairs)}


def auth(name: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def report(
    service: Service,
    body: bytes | str | dict[str, Any] | list[Any],
    *,
    content_type: str | None = None,
    key: str | None = None,
    operator: str = "alice",
) -> httpx.Response:
    if isinstance(body, dict | list):
        body, content_type = json.dumps(body), content_type or "application/json"
    headers = auth(operator)
    if content_type:
        headers["Content-Type"] = content_type
    if key:
        headers["Idempotency-Key"] = key
    raw = body.encode() if isinstance(body, str) else body
    return httpx.post(f"{service.url}/v1/reports", content=raw, headers=headers, timeout=30)


def get(service: Service, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{service.url}{path}", params=params, headers=auth(), timeout=30)


def refused(response: httpx.Response, status: int, reason: str, service: Service) -> None:
    """The reason code is in the body, in a log line and in the failures metric."""
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason
    assert any(r.get("reason") == reason and r.get("stage") == "operators" for r in service.log_records())
    metrics = httpx.get(f"{service.url}/metrics").text
    assert f'leak_responder_failures_total{{reason="{reason}",stage="operators"}}' in metrics


def unreadable_incident(service: Service, token: str) -> dict[str, Any]:
    """An incident of `token`, confirmed, with an event the code does not expect written behind its
    back (a detail that is not JSON): every read of it is a bug on the route, a 500."""
    incident = service.wait_state(token, "confirmed") and service.incident(token)
    assert incident is not None
    with service.db(writable=True) as conn:
        conn.execute(
            "INSERT INTO events (incident_id, at, kind, state, detail) VALUES (?, ?, 'x', NULL, '{')",
            (incident["id"], time.time()),
        )
    return incident
