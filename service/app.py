"""The HTTP shell (SPEC §3): routes that hand each request to the stage that owns it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.alerting import PageCode
from service.inbound import InboundError, InboundReason, parse_alert, read_limited, verify_request
from service.observability import ALERTS, failure, request_id
from service.runtime import Runtime
from service.settings import Settings
from service.store import AlertRecord, StoreError, TokenSighting

log = logging.getLogger("service.app")


def error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": str(reason), "message": message}, status_code=status)


async def receive_alert(request: Request) -> Response:
    """Verify, commit, then label: never a 2xx before the alert is durably committed."""
    rt: Runtime = request.app.state.runtime
    started = time.monotonic()
    name = request.path_params["reporter"]
    reporter, cache = rt.reporters.get(name), rt.caches.get(name)
    if reporter is None or cache is None:
        return error(404, "reporter_disabled", f"reporter {name!r} is not enabled here")
    try:
        body = await read_limited(request.stream(), rt.settings.body_limit)
        await verify_request(reporter, cache, request.headers, body)
        items = parse_alert(body)
    except InboundError as exc:
        ALERTS.labels(reporter=name, outcome=exc.reason).inc()
        failure(log, "inbound", exc.reason, exc.message, reporter=name, status=exc.status)
        if exc.reason is InboundReason.KEYS_UNAVAILABLE:
            rt.pager.page(PageCode.REPORTER_KEYS_UNAVAILABLE, "no verification keys", {"reporter": name}, {})
        return error(exc.status, exc.reason, exc.message)
    sightings = [TokenSighting(i.token, i.type, i.url, i.source, name) for i in items]
    record = AlertRecord(name, hashlib.sha256(body).hexdigest(), len(items))
    budget = rt.settings.request_budget
    try:
        refs = await rt.store.intake(record, sightings, match_after=budget)
    except StoreError as exc:
        ALERTS.labels(reporter=name, outcome="store_unavailable").inc()
        failure(log, "intake", "store_unavailable", str(exc), level=logging.ERROR, reporter=name)
        return error(503, "store_unavailable", "the alert could not be recorded; retry later")
    rt.worker.wake()
    labels = await rt.worker.labels(refs, budget - (time.monotonic() - started))
    ALERTS.labels(reporter=name, outcome="accepted").inc()
    log.info(
        "alert accepted",
        extra={"reporter": name, "items": len(items), "tokens": len(refs), "labelled": len(labels)},
    )
    return JSONResponse(
        [
            {"token_hash": r.token_hash, "token_type": r.token_type, "label": str(labels[r.token_hash])}
            for r in refs
            if r.token_hash in labels
        ]
    )


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    checks = {"worker": rt.worker.alive}
    try:
        await rt.store.ping()
        checks["store"] = True
    except StoreError:
        checks["store"] = False
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class RequestIdMiddleware:
    """Tags every log line of a request with one id, echoed to the caller as X-Request-Id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = secrets.token_hex(8)
        token = request_id.set(rid)

        async def send_with_id(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def create_app(settings: Settings, runtime: Runtime | None = None) -> Starlette:
    rt = runtime or Runtime.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start()
        app.state.runtime = rt
        log.info("leak-responder ready", extra={"mode": settings.mode, "reporters": ",".join(rt.reporters)})
        try:
            yield
        finally:
            await rt.stop()

    routes = [
        Route("/v1/alerts/{reporter}", receive_alert, methods=["POST"]),
        Route("/livez", livez),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    return app
