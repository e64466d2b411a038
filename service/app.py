"""The HTTP shell (contract.md §3): routes that hand each request to the stage that owns it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import console
from service.inbound import InboundError, parse_alert, signed_by
from service.inbound.public import (
    PUBLIC,
    PublicError,
    is_trusted,
    media_type,
    parse_public,
    read_public,
    requester,
)
from service.inbound.reports import DETECTED, read_report
from service.observability import (
    ALERTS,
    PUBLIC_KEYS,
    PUBLIC_REPORTS,
    counter,
    exposition,
    failure,
    request_id,
)
from service.openapi import openapi_document
from service.operators import (
    OperatorError,
    accept_report,
    authenticate,
    detail_json,
    fingerprint,
    idempotency_key,
    idempotent,
    incident_filter,
    incident_page,
    resolution_note,
)
from service.public_pages import PAGE_HEADERS, REPORT_PAGE, security_txt
from service.reasons import Reason
from service.refusal import Refusal
from service.runtime import Runtime
from service.settings import Settings
from service.store import AlertRecord, IncidentRef, Label, StoreError, TokenSighting

log = logging.getLogger("service.app")

# Bodies larger than this are parsed off the event loop (see receive_alert).
OFFLOAD_BYTES = 64 * 1024
# Net allocations of container objects between two young collections (Python's default: 700).
GC_YOUNG = 20_000
# Seconds /readyz waits for the store's heartbeat commit (Kubernetes' probe gives up after 1-5 s).
READY_TIMEOUT = 2.0


PROBLEM = "application/problem+json"


def error(
    status: int,
    reason: Reason,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """Every error answer, whatever the route or the fault: RFC 9457 problem details, the ecosystem's
    shape, so a caller's generic client reads them all, plus our reason code as `error`, the word an
    operator greps for in the log and the metrics. The type is a URN, not a link: the reason codes
    are documented with the deployment (docs/reasons.md), not served."""
    body = {
        "type": f"urn:leak-responder:reason:{reason}",
        "title": reason.replace("_", " ").capitalize(),
        "status": status,
        "detail": message,
        "error": str(reason),
    }
    # RFC 9457's extension members, e.g. readiness's checks; they never replace the standard ones.
    body = {**(extra or {}), **body}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM)


async def receive_alert(request: Request) -> Response:
    """Verify, commit, then label: never a 2xx before the alert is durably committed."""
    rt: Runtime = request.app.state.runtime
    started = time.monotonic()
    name = request.path_params["reporter"]
    reporter, cache = rt.reporters.get(name), rt.caches.get(name)
    if reporter is None or cache is None:
        # The path is the caller's text: it is neither echoed nor a metric label (any word would do).
        failure(log, "inbound", Reason.REPORTER_DISABLED, "alert for a reporter not enabled here", status=404)
        return error(404, Reason.REPORTER_DISABLED, "no such reporter is enabled here")
    try:
        # The sender is known from its headers before its body is read: a stranger costs no body.
        claim = await signed_by(reporter, cache, request.headers)
        body = await rt.bodies.read(request.stream(), request.headers, rt.settings.body_limit)
        claim.verify(body)
        # A big body is CPU work (a 100,000-token alert is half a second of parsing and making
        # sightings): done beside the event loop, so other alerts are not held behind it; a small
        # one is not worth the thread hop.
        big = len(body) > OFFLOAD_BYTES
        sightings = await asyncio.to_thread(_sightings, body, name) if big else _sightings(body, name)
    except InboundError as exc:
        ALERTS.labels(reporter=name, outcome=exc.reason).inc()
        failure(log, "inbound", exc.reason, exc.message, reporter=name, status=exc.status)
        if exc.reason is Reason.KEYS_UNAVAILABLE:
            rt.pager.page(Reason.REPORTER_KEYS_UNAVAILABLE, "no verification keys", {"reporter": name}, {})
        return error(exc.status, exc.reason, exc.message, exc.headers)
    record = AlertRecord(name, hashlib.sha256(body).hexdigest(), len(sightings))
    try:
        # Lookup first, then one commit of the alert with its labels (see Worker.accept).
        refs, labels = await rt.worker.accept(
            record, sightings, rt.settings.request_budget - (time.monotonic() - started)
        )
    except StoreError as exc:
        ALERTS.labels(reporter=name, outcome="store_unavailable").inc()
        failure(log, "intake", Reason.STORE_UNAVAILABLE, str(exc), level=logging.ERROR, reporter=name)
        return error(503, Reason.STORE_UNAVAILABLE, "the alert could not be recorded; retry later")
    counter(ALERTS, name, "accepted").inc()
    log.info(
        "alert accepted",
        extra={"reporter": name, "items": len(sightings), "tokens": len(refs), "labelled": len(labels)},
    )
    answer = functools.partial(_labels_answer, refs, labels)
    # 100,000 labels are a tenth of a second of JSON: beside the loop too.
    return await asyncio.to_thread(answer) if big else answer()


def _sightings(body: bytes, reporter: str) -> list[TokenSighting]:
    """The alert's items as sightings, their texts made safe to store (see TokenSighting)."""
    return [TokenSighting(i.token, i.type, i.url, i.source, reporter) for i in parse_alert(body)]


def _labels_answer(refs: Sequence[IncidentRef], labels: Mapping[str, Label]) -> Response:
    """The answer to a partner: each labelled token's hash, type and label, in the alert's order.

    Written as text, the same bytes as `JSONResponse` of the objects in a third of the time (a
    10,000-token alert's answer was a twentieth of its ack): the hash is hex and the label one of
    ours, so only the type, the sender's text, needs JSON's escaping, once per distinct type."""
    types: dict[str, str] = {}
    objects = []
    for r in refs:
        label = labels.get(r.token_hash)
        if label is None:
            continue
        token_type = types.get(r.token_type)
        if token_type is None:
            token_type = types[r.token_type] = json.dumps(r.token_type, ensure_ascii=False)
        objects.append(f'{{"token_hash":"{r.token_hash}","token_type":{token_type},"label":"{label.value}"}}')
    return Response(f"[{','.join(objects)}]", media_type="application/json")


# The one answer to every public report that was received: same status, body and headers whatever it
# held, so that the endpoint cannot be used to test whether a string is a live key.
RECEIVED = b'{"status":"received"}'
RECEIVED_HEADERS = {"Cache-Control": "no-store"}
# The answer leaves no sooner than this after the limits let a report in. An intake holding keys
# writes more rows than one holding none (about half a millisecond here), which many requests could
# measure; a floor well above the intake's own time makes every answer take it, whatever was sent.
PUBLIC_ANSWER_FLOOR = 0.025
FLOODED = "public reports refused: everyone's rate is exhausted"


async def receive_public_report(request: Request) -> Response:
    """Limits first (no work for a request over them), then the detector and a durable intake, then
    the answer; the lookup, the revoke and all that can tell keys apart run after it.

    Every report received commits one intake, keys or none, so the answer costs the same whatever the
    text held, and `received` means recorded: a process that dies after answering loses nothing.
    """
    rt: Runtime = request.app.state.runtime
    settings = rt.settings
    try:
        client = requester(request, settings.trusted_proxies)
        await rt.public_limits.take(client)
        started = time.monotonic()
        media = media_type(request.headers.get("content-type"))
        report = parse_public(
            await read_public(request.stream(), request.headers, rt.bodies), media, settings.public_max_keys
        )
        sightings = [TokenSighting(f.token, DETECTED, report.url, None, PUBLIC) for f in report.findings]
        # Hash-only as every alert record, and not of the text, which is kept in no form at all.
        digest = hashlib.sha256("\n".join(sorted(f.token_hash for f in report.findings)).encode())
        refs = await rt.store.intake(AlertRecord(PUBLIC, digest.hexdigest(), len(sightings)), sightings, 0)
    except PublicError as exc:
        PUBLIC_REPORTS.labels(outcome=str(exc.reason)).inc()
        # Info, not warning: anyone on the internet can cause these, as often as the limits allow.
        failure(log, "public", exc.reason, exc.message, level=logging.INFO, status=exc.status)
        if exc.reason is Reason.PUBLIC_GLOBAL_RATE_LIMITED:
            rt.pager.page(Reason.PUBLIC_REPORTS_FLOODED, FLOODED, {}, {})
        return error(exc.status, exc.reason, exc.message, exc.headers)
    except StoreError as exc:
        PUBLIC_REPORTS.labels(outcome=str(Reason.STORE_UNAVAILABLE)).inc()
        failure(log, "public", Reason.STORE_UNAVAILABLE, str(exc), level=logging.ERROR)
        return error(503, Reason.STORE_UNAVAILABLE, "the report could not be recorded; retry later")
    PUBLIC_REPORTS.labels(outcome="received").inc()
    PUBLIC_KEYS.inc(len(refs))
    log.info("public report received", extra={"reporter": PUBLIC, "tokens": len(refs)})
    await asyncio.sleep(max(0.0, started + PUBLIC_ANSWER_FLOOR - time.monotonic()))
    return Response(
        RECEIVED,
        status_code=202,
        media_type="application/json",
        headers=RECEIVED_HEADERS,
        # After the answer is sent: the worker's lookup is where a live key and a dead one differ.
        background=BackgroundTask(rt.worker.wake),
    )


async def report_page(request: Request) -> Response:
    return HTMLResponse(REPORT_PAGE, headers=PAGE_HEADERS)


async def security_txt_page(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return PlainTextResponse(
        security_txt(_public_origin(request, rt.settings), rt.settings.security_contact),
        headers={"Cache-Control": "max-age=86400"},
    )


def _public_origin(request: Request, settings: Settings) -> str:
    """The origin the public reached us at: our own scheme, or a trusted proxy's X-Forwarded-Proto
    (a proxy in front usually ends TLS), and the Host the client asked for."""
    scheme = request.url.scheme
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    peer = request.client.host if request.client else None
    if forwarded in ("http", "https") and is_trusted(peer, settings.trusted_proxies):
        scheme = forwarded
    return f"{scheme}://{request.url.netloc}"


OperatorView = Callable[[Request, str], Awaitable[Response]]


def operator_route(view: OperatorView) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the operator, then give every refusal its reason code in body, log and metric."""

    @functools.wraps(view)
    async def route(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        extra = {"path": request.url.path}
        try:
            operator = authenticate(request.headers.get("authorization"), rt.settings.operator_tokens)
            extra["operator"] = operator
            return await view(request, operator)
        except Refusal as exc:
            failure(log, "operators", exc.reason, exc.message, status=exc.status, context=extra)
            return error(exc.status, exc.reason, exc.message, exc.headers)
        except StoreError as exc:
            failure(log, "operators", Reason.STORE_UNAVAILABLE, str(exc), level=logging.ERROR, context=extra)
            return error(503, Reason.STORE_UNAVAILABLE, "the store is unavailable; retry later")

    return route


@operator_route
async def receive_report(request: Request, operator: str) -> Response:
    """A manual report, handled exactly like an alert (see `service.operators.accept_report`)."""
    rt: Runtime = request.app.state.runtime
    started = time.monotonic()
    key = idempotency_key(request.headers)
    body = await read_report(request.stream(), request.headers, rt.bodies)
    content_type = request.headers.get("content-type")

    return await idempotent(
        rt.store,
        operator,
        key,
        fingerprint(content_type, body),
        lambda: accept_report(rt, operator, body, content_type, started),
    )


@operator_route
async def list_incidents(request: Request, operator: str) -> Response:
    rt: Runtime = request.app.state.runtime
    where = incident_filter(request.query_params)
    found = await rt.store.list_incidents(dataclasses.replace(where, limit=where.limit + 1))
    return JSONResponse(incident_page(found, where.limit))


@operator_route
async def show_incident(request: Request, operator: str) -> Response:
    rt: Runtime = request.app.state.runtime
    view = await incident_view(rt, request.path_params["incident_id"])
    if view is None:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    return JSONResponse(view)


async def incident_view(rt: Runtime, incident_id: str) -> dict[str, Any] | None:
    """What every incident route answers: the detail with its deliveries."""
    detail = await rt.store.detail(incident_id)
    if detail is None:
        return None
    return detail_json(detail)


@operator_route
async def retry_incident(request: Request, operator: str) -> Response:
    """202 with the incident as it now stands; 409 when it is not stuck (see service.pipeline.retry)."""
    rt: Runtime = request.app.state.runtime
    incident_id = request.path_params["incident_id"]
    found = await rt.store.incidents([incident_id])
    if not found:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    if not await rt.worker.retry(found[0], operator):
        raise OperatorError(
            Reason.INCIDENT_NOT_RETRYABLE,
            f"incident is {found[0].state} with {found[0].attempts} failed attempts: nothing to retry",
        )
    view = await incident_view(rt, incident_id)
    assert view is not None
    return JSONResponse(view, status_code=202)


@operator_route
async def resolve_incident(request: Request, operator: str) -> Response:
    """200 with the incident, closed by hand with the operator's note; 409 when already final."""
    rt: Runtime = request.app.state.runtime
    incident_id = request.path_params["incident_id"]
    note = resolution_note(await request.body())
    found = await rt.store.incidents([incident_id])
    if not found:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    if not await rt.worker.resolve(found[0], operator, note):
        raise OperatorError(
            Reason.INCIDENT_ALREADY_FINAL, f"incident is {found[0].state}: nothing to resolve"
        )
    view = await incident_view(rt, incident_id)
    assert view is not None
    return JSONResponse(view)


async def openapi(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return JSONResponse(openapi_document(list(rt.reporters)))


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when an alert would be committed now: the heartbeat is a real commit, within a probe's
    patience (a store whose commits hang is as unready as one that fails)."""
    rt: Runtime = request.app.state.runtime
    checks = {"worker": rt.worker.alive, "store": False, "migrations": False}
    try:
        checks["migrations"] = not await asyncio.wait_for(rt.store.pending_migrations(), READY_TIMEOUT)
        if checks["migrations"]:  # the heartbeat's table comes with them
            await asyncio.wait_for(rt.store.ping(), READY_TIMEOUT)
        checks["store"] = True
    except (StoreError, TimeoutError):
        pass
    if all(checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    failing = ", ".join(name for name, ok in checks.items() if not ok)
    failure(log, "http", Reason.NOT_READY, f"not ready: {failing}", checks=failing)
    return error(503, Reason.NOT_READY, f"not ready: {failing}", extra={"checks": checks})


async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    try:
        stats = await rt.store.stats()
    except StoreError as exc:
        failure(log, "metrics", Reason.STORE_UNAVAILABLE, str(exc), level=logging.ERROR)
        return error(503, Reason.STORE_UNAVAILABLE, "the store could not be read")
    caches = {
        name: {"hits": c.hits, "misses": c.misses, "fetches": c.fetches, "fetch_failures": c.fetch_failures}
        for name, c in rt.caches.items()
    }
    body = exposition(stats, caches)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def http_refusal(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the one error shape."""
    assert isinstance(exc, HTTPException)
    reason = Reason.METHOD_NOT_ALLOWED if exc.status_code == 405 else Reason.ROUTE_NOT_FOUND
    failure(log, "http", reason, exc.detail, level=logging.INFO, status=exc.status_code)
    return error(exc.status_code, reason, exc.detail, exc.headers)


class RequestIdMiddleware:
    """Tags every log line of a request with one id, echoed to the caller as X-Request-Id, and
    answers what escapes the routes: a client that hung up is an INFO line (not our fault, not an
    error, nothing to send), any other exception a 500 in the one error shape, carrying the id, so
    the caller can quote it and the ERROR line with the traceback can be found by it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A label to find a request's log lines by, not a secret: no system call for randomness.
        rid = f"{random.getrandbits(64):016x}"
        token = request_id.set(rid)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            failure(
                log,
                "http",
                Reason.CLIENT_DISCONNECTED,
                "the client went away mid-request",
                level=logging.INFO,
            )
        except Exception as exc:
            failure(log, "http", Reason.INTERNAL_ERROR, "unexpected error", level=logging.ERROR, exc_info=exc)
            if not started:
                answer = error(500, Reason.INTERNAL_ERROR, f"unexpected error; quote request id {rid}")
                await answer(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def create_app(settings: Settings, runtime: Runtime | None = None) -> Starlette:
    rt = runtime or Runtime.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await rt.start()
        app.state.runtime = rt
        # What start-up made (modules, settings, templates, the runtime) lives as long as the
        # process: out of the collector's sight, a full collection under load takes a few ms
        # instead of 30-150, a pause every request in flight would wait out (BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        # A young collection every GC_YOUNG net allocations instead of 700: under load the young
        # objects are the requests in flight, alive at every collection and promoted, collected
        # again in the older generations, until freed by their reference counts anyway. At 700 that
        # was about a tenth of a collection per alert and 3 % of the process's CPU time (BENCHMARKS.md).
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        log.info("leak-responder ready", extra={"mode": settings.mode, "reporters": ",".join(rt.reporters)})
        try:
            yield
        finally:
            await rt.stop()

    routes: list[BaseRoute] = [
        Route("/v1/alerts/{reporter}", receive_alert, methods=["POST"]),
        Route("/v1/reports", receive_report, methods=["POST"]),
        Route("/v1/incidents", list_incidents),
        Route("/v1/incidents/{incident_id}", show_incident),
        Route("/v1/incidents/{incident_id}/retry", retry_incident, methods=["POST"]),
        Route("/v1/incidents/{incident_id}/resolve", resolve_incident, methods=["POST"]),
        Route("/v1/public/reports", receive_public_report, methods=["POST"]),
        Route("/report", report_page),
        Route("/.well-known/security.txt", security_txt_page),
        Route("/openapi.json", openapi),
        Route("/livez", livez),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        console.mount(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_refusal})
    app.add_middleware(RequestIdMiddleware)
    return app
