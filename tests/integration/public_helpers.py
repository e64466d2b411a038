"""Sending public reports in integration tests, and what a received one must look like."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.harness import Service

RECEIVED = b'{"status":"received"}'
# Headers that may differ between two answers without telling anything about what was sent.
PER_RESPONSE = {"date", "x-request-id"}


def public(
    service: Service,
    body: bytes | str | dict[str, Any],
    *,
    content_type: str | None = None,
    client: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST to /v1/public/reports: a dict as JSON, text as text/plain, unless `content_type` says
    otherwise; `client` is sent as X-Forwarded-For (believed only from a trusted proxy)."""
    if isinstance(body, dict):
        content, media = json.dumps(body).encode(), "application/json"
    else:
        content, media = (body.encode() if isinstance(body, str) else body), "text/plain"
    sent = {"Content-Type": content_type or media, **(headers or {})}
    if content_type == "":
        del sent["Content-Type"]
    if client is not None:
        sent["X-Forwarded-For"] = client
    return service.http.post(f"{service.url}/v1/public/reports", content=content, headers=sent)


def stable_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in response.headers.items() if k not in PER_RESPONSE)


def assert_received(response: httpx.Response) -> None:
    assert response.status_code == 202, response.text
    assert response.content == RECEIVED
    assert stable_headers(response) == [
        ("cache-control", "no-store"),
        ("content-length", str(len(RECEIVED))),
        ("content-type", "application/json"),
        ("server", "uvicorn"),
    ]
