"""A stand-in for an org's own endpoints: a webhook receiver that checks Standard Webhooks
signatures, and a Slack incoming webhook, both recording and showing what arrives.

`make run` wires the seeded orgs' channels here, so a demo shows the whole story (the email and
the org's own systems told); tests point channels here and make it misbehave (slow, 5xx, 429, a
redirect, 410) per path with `Behaviour`. Webhooks live at `/hooks/{name}`, Slack at
`/slack/{name}`; a webhook whose signature does not verify is answered 401, as a real receiver
would, and recorded as such.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.channels.signing import SignatureError, verify
from service.sandbox._http import bad_request, json_body, sleep_unless_disconnected

logger = logging.getLogger(__name__)


@dataclass
class Behaviour:
    """How one path answers: `fail_next` answers `fail_status` that many times first; `delay` is
    slept before answering; `redirect` answers 307 to it; `retry_after` goes with a 429."""

    status: int = 200
    delay: float = 0.0
    fail_next: int = 0
    fail_status: int = 503
    redirect: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class Received:
    path: str
    kind: str
    headers: dict[str, str]
    body: bytes = field(repr=False)
    verified: bool | None
    status: int
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class ChannelReceiver:
    def __init__(self, secrets: Mapping[str, str] | None = None, *, show: bool = False) -> None:
        """`secrets` maps a webhook's path (`/hooks/{name}`) to its `whsec_` secret; `show` prints a
        line per arrival (for a person watching `make run`, not for tests)."""
        self._show = show
        self._lock = threading.Lock()
        self._secrets = dict(secrets or {})
        self._behaviour: dict[str, Behaviour] = {}
        self._received: list[Received] = []

    @classmethod
    def for_channels(cls, channels: list[dict[str, str]], *, show: bool = False) -> ChannelReceiver:
        return cls(
            {urlsplit(c["url"]).path: c["secret"] for c in channels if c.get("type") == "webhook"}, show=show
        )

    def add_secret(self, path: str, secret: str) -> None:
        with self._lock:
            self._secrets[path] = secret

    def behave(self, path: str, **changes: Any) -> None:
        with self._lock:
            self._behaviour[path] = dataclasses.replace(self._behaviour.get(path, Behaviour()), **changes)

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/hooks/{name}", self._webhook, methods=["POST"]),
                Route("/slack/{name}", self._slack, methods=["POST"]),
                Route("/_sandbox/received", self._list, methods=["GET"]),
            ]
        )

    async def _answer(self, request: Request, kind: str, verified: bool | None) -> Response:
        path = request.url.path
        body = await request.body()
        with self._lock:
            behaviour = copy.copy(self._behaviour.get(path, Behaviour()))
            status = behaviour.status
            if behaviour.fail_next > 0:
                self._behaviour[path].fail_next -= 1
                status = behaviour.fail_status
            if verified is False:
                status = 401
            self._received.append(
                Received(path, kind, dict(request.headers), body, verified, status, time.time())
            )
        await sleep_unless_disconnected(request, behaviour.delay)
        if self._show:
            _show(kind, path, body, verified, status)
        if behaviour.redirect:
            return Response(status_code=307, headers={"Location": behaviour.redirect})
        headers = {}
        if status == 429 and behaviour.retry_after is not None:
            headers["Retry-After"] = str(behaviour.retry_after)
        return Response(status_code=status, headers=headers)

    async def _webhook(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            secret = self._secrets.get(request.url.path)
        verified: bool | None = None
        if secret is not None:
            try:
                verify(secret, request.headers, body, time.time())
                verified = True
            except SignatureError as exc:
                logger.warning("receiver: %s: signature refused: %s", request.url.path, exc)
                verified = False
        return await self._answer(request, "webhook", verified)

    async def _slack(self, request: Request) -> Response:
        try:
            await json_body(request)
        except ValueError as exc:
            return bad_request(str(exc))
        return await self._answer(request, "slack", None)

    async def _list(self, _request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "path": r.path,
                    "kind": r.kind,
                    "verified": r.verified,
                    "status": r.status,
                    "at": r.at,
                    "body": r.json,
                }
                for r in self.received()
            ]
        )


def _show(kind: str, path: str, body: bytes, verified: bool | None, status: int) -> None:
    """One line per arrival, for a person watching `make run`."""
    try:
        document = json.loads(body)
    except ValueError:
        document = {}
    if kind == "webhook":
        data = document.get("data") or {}
        what = f"{document.get('type')} {data.get('redacted')} ({data.get('incidentId')})"
        check = {True: "signature verified", False: "SIGNATURE REFUSED", None: "no secret known"}[verified]
    else:
        what = str(document.get("text", ""))[:160]
        check = "slack message"
    print(f"receiver: {kind} {path}: {what} [{check}] -> {status}", flush=True)
