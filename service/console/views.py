"""The console's routes: pages rendered on the server from the same store reads, the same
`Worker.retry` and the same report intake as the operator API, behind a session sign-in.

Every page is built from hashes, redacted forms and what the store says of an incident; no view
ever receives a raw token, except the report form's paste, which goes straight to the detector and
the intake (as `POST /v1/reports` does) and otherwise travels only sealed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.console import plots
from service.console.session import (
    COOKIE,
    SESSION_SECONDS,
    SIGNIN_SECONDS,
    ConsoleError,
    Session,
    Sessions,
    SigninLimiter,
    check_csrf,
    check_origin,
    clear_cookie,
    read_form,
    set_cookie,
)
from service.inbound.public import requester
from service.inbound.reports import REPORT_LIMIT, ReportError, parse_report
from service.observability import failure
from service.operators import (
    MANUAL,
    OperatorError,
    accept_report,
    idempotent,
    incident_filter,
    next_cursor,
    operator_for,
    resolution_note,
)
from service.pipeline.retry import retry_transition
from service.reasons import Reason
from service.refusal import Refusal
from service.runtime import Runtime, data_key
from service.store import FINAL_STATES, Incident, State, StoreError, Timed

log = logging.getLogger("service.console")

HERE = Path(__file__).resolve().parent
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    # Templates ship with the package: no stat() of each file on every render.
    auto_reload=False,
)
TEMPLATES.filters["duration"] = plots.duration
TEMPLATES.filters["clock"] = plots.clock
TEMPLATES.filters["stamp"] = plots.stamp

# The one page of incidents the list shows, and how often an open list asks for fresh rows.
PAGE_SIZE = 50
REFRESH_SECONDS = 2
OLDEST_SHOWN = 10
HOUR = 3600.0

# Strict on purpose: only the console's own script and stylesheet, no inline script or style (the
# SVG uses presentation attributes), no framing, forms only to ourselves.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Console:
    """What the console keeps per process: the session signer and the sign-in limiter."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self.limiter = SigninLimiter()


@dataclass(frozen=True, slots=True)
class Context:
    request: Request
    rt: Runtime
    console: Console
    session: Session

    @property
    def operator(self) -> str:
        assert self.session.operator is not None
        return self.session.operator


def _console(request: Request) -> Console:
    """Built on first use, once the runtime (and with it the store's data key) is there."""
    console: Console | None = getattr(request.app.state, "console", None)
    if console is None:
        rt: Runtime = request.app.state.runtime
        console = request.app.state.console = Console(Sessions(data_key(rt.settings)))
    return console


def _headers(response: Response) -> Response:
    response.headers.update(_HEADERS)
    return response


def render(
    request: Request, name: str, status: int = 200, *, session: Session | None = None, **values: Any
) -> Response:
    rt: Runtime = request.app.state.runtime
    html = TEMPLATES.get_template(name).render(
        operator=session.operator if session else None,
        csrf=session.csrf if session else "",
        dry_run=rt.settings.dry_run,
        mode=rt.settings.mode,
        path=request.url.path,
        **values,
    )
    return _headers(HTMLResponse(html, status_code=status))


def _refused(request: Request, exc: Refusal, session: Session | None, **extra: Any) -> Response:
    failure(log, "console", exc.reason, exc.message, status=exc.status, path=request.url.path, **extra)
    response = render(
        request, "error.html.j2", exc.status, session=session, reason=str(exc.reason), message=exc.message
    )
    response.headers.update(exc.headers)
    return response


def _to_signin(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/console/login?{urlencode({'next': target})}", status_code=303)
    clear_cookie(response, request)
    return _headers(response)


def _safe_next(target: str | None) -> str:
    """Only a console path of this host: a sign-in must not become a redirect to anywhere."""
    if target and target.startswith("/console/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and "\\" not in target:
            return target
    return "/console/"


Form = dict[str, str]
View = Callable[[Context], Awaitable[Response]]
FormView = Callable[[Context, Form], Awaitable[Response]]


def _signed_in(request: Request) -> tuple[Console, Session | None]:
    """The request's signed-in session, None when it has none (or only a pre-session); a cookie
    that is forged, expired or of a removed operator is refused with session_invalid."""
    console = _console(request)
    rt: Runtime = request.app.state.runtime
    session = console.sessions.decode(request.cookies.get(COOKIE), rt.settings.operator_tokens)
    return console, session if session is not None and session.operator is not None else None


def page(view: View) -> Callable[[Request], Awaitable[Response]]:
    """A page for signed-in operators: anyone else is sent to the sign-in page, and comes back."""

    @functools.wraps(view)
    async def route(request: Request) -> Response:
        try:
            console, session = _signed_in(request)
        except ConsoleError as exc:
            failure(log, "console", exc.reason, exc.message, level=logging.INFO, path=request.url.path)
            return _to_signin(request)
        if session is None:
            return _to_signin(request)
        return await _run(view, Context(request, request.app.state.runtime, console, session))

    return route


def action(view: FormView) -> Callable[[Request], Awaitable[Response]]:
    """A form that changes something: same-site Origin, a signed-in session and its CSRF token."""

    @functools.wraps(view)
    async def route(request: Request) -> Response:
        session = None
        try:
            check_origin(request)
            console, session = _signed_in(request)
            if session is None:
                raise ConsoleError(Reason.SESSION_INVALID, "sign in first")
            # Urlencoding can triple a paste: room for a report at the API's limit, and no more.
            form = await read_form(request, 3 * REPORT_LIMIT + 4096, request.app.state.runtime.bodies)
            check_csrf(session, form.get("csrf"))
        except ConsoleError as exc:
            return _refused(request, exc, session)
        ctx = Context(request, request.app.state.runtime, console, session)
        return await _run(lambda c: view(c, form), ctx)

    return route


async def _run(view: View, ctx: Context) -> Response:
    try:
        return await view(ctx)
    except Refusal as exc:
        return _refused(ctx.request, exc, ctx.session, operator=ctx.operator)
    except StoreError as exc:
        failure(
            log, "console", Reason.STORE_UNAVAILABLE, str(exc), level=logging.ERROR, path=ctx.request.url.path
        )
        return render(
            ctx.request,
            "error.html.j2",
            503,
            session=ctx.session,
            reason=str(Reason.STORE_UNAVAILABLE),
            message="The store is unavailable; reload in a moment.",
        )


# -- signing in and out ---------------------------------------------------------------------------


async def signin_page(request: Request) -> Response:
    try:
        _, session = _signed_in(request)
    except ConsoleError:
        session = None
    target = _safe_next(request.query_params.get("next"))
    if session is not None:
        return _headers(RedirectResponse(target, status_code=303))
    return _signin_form(request, target, 200, None)


def _signin_form(request: Request, target: str, status: int, error: str | None) -> Response:
    """The sign-in page with a fresh pre-session, whose CSRF token the form carries."""
    pre = _console(request).sessions.anonymous()
    response = render(request, "login.html.j2", status, session=pre, next=target, error=error)
    set_cookie(response, request, _console(request).sessions.encode(pre), SIGNIN_SECONDS)
    return response


async def signin(request: Request) -> Response:
    """`POST /console/login`: a same-site form, its CSRF token, the limiter, then the token itself
    (checked exactly as the API checks a bearer token). Every refusal is logged with its reason."""
    rt: Runtime = request.app.state.runtime
    console = _console(request)
    client = requester(request, rt.settings.trusted_proxies)
    target = "/console/"
    try:
        check_origin(request)
        form = await read_form(request, 4096, rt.bodies)
        target = _safe_next(form.get("next"))
        try:
            pre = console.sessions.decode(request.cookies.get(COOKIE), rt.settings.operator_tokens)
        except ConsoleError:
            pre = None
        check_csrf(pre, form.get("csrf"))
        console.limiter.check(client)
        try:
            operator = operator_for(form.get("token", "").strip(), rt.settings.operator_tokens)
        except OperatorError:
            console.limiter.failed(client)
            raise
    except Refusal as exc:
        message = f"sign-in refused: {exc.message}"
        failure(log, "console", exc.reason, message, status=exc.status, client=client)
        response = _signin_form(request, target, exc.status, exc.message)
        response.headers.update(exc.headers)
        return response
    console.limiter.succeeded(client)
    session = console.sessions.signed_in(operator, rt.settings.operator_tokens)
    log.info("console sign-in", extra={"operator": operator, "client": client})
    response = _headers(RedirectResponse(target, status_code=303))
    set_cookie(response, request, console.sessions.encode(session), SESSION_SECONDS)
    return response


@action
async def signout(ctx: Context, form: Form) -> Response:
    log.info("console sign-out", extra={"operator": ctx.operator})
    response = _headers(RedirectResponse("/console/login", status_code=303))
    clear_cookie(response, ctx.request)
    return response


# -- incidents ------------------------------------------------------------------------------------

_FILTERS = ("state", "reporter", "org", "since", "until")


@dataclass(frozen=True, slots=True)
class Row:
    incident: Incident
    reporters: str
    age: float
    open: bool
    stuck: bool


async def _rows(ctx: Context, incidents: list[Incident]) -> list[Row]:
    """Each incident with who reported it (from its sightings) and what an operator can do."""
    seen = await ctx.rt.store.sightings([i.id for i in incidents])
    now = time.time()
    return [
        Row(
            i,
            ", ".join(sorted({s.reporter for s in seen.get(i.id, [])})),
            now - i.created_at,
            i.state not in FINAL_STATES,
            retry_transition(i, ctx.operator, now) is not None,
        )
        for i in incidents
    ]


@page
async def incidents(ctx: Context) -> Response:
    """The list, newest first; `?rows=1` answers only the table's rows, for the page's refresh."""
    query = ctx.request.query_params
    chosen = {k: query[k] for k in (*_FILTERS, "next") if query.get(k)}
    where = incident_filter(QueryParams(chosen))
    found = await ctx.rt.store.list_incidents(replace(where, limit=PAGE_SIZE + 1))
    rows = await _rows(ctx, found[:PAGE_SIZE])
    cursor = next_cursor(found, PAGE_SIZE)
    filters = {k: v for k, v in chosen.items() if k != "next"}
    # Live while something on the page can still change, or new incidents can arrive at its top.
    live = "next" not in chosen or any(r.open for r in rows)
    values: dict[str, Any] = {
        "rows": rows,
        "filters": filters,
        "states": [s.value for s in State],
        "reporters": [MANUAL, *ctx.rt.reporters],
        "next_url": f"/console/incidents?{urlencode({**filters, 'next': cursor})}" if cursor else None,
        "first_url": f"/console/incidents?{urlencode(filters)}" if "next" in chosen else None,
        "live": live,
        "refresh": REFRESH_SECONDS,
        "rows_url": f"/console/incidents?{urlencode({**chosen, 'rows': '1'})}",
    }
    if query.get("rows"):
        response = render(ctx.request, "incident_rows.html.j2", session=ctx.session, **values)
        response.headers["X-Console-Live"] = "1" if live else "0"
        return response
    return render(ctx.request, "incidents.html.j2", session=ctx.session, **values)


async def _incident_page(
    ctx: Context, incident_id: str, status: int = 200, notice: dict[str, str] | None = None
) -> Response:
    detail = await ctx.rt.store.detail(incident_id)
    if detail is None:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    incident = detail.incident
    deliveries = await ctx.rt.store.deliveries([incident.id])
    return render(
        ctx.request,
        "incident.html.j2",
        status,
        session=ctx.session,
        incident=incident,
        detail=detail,
        timeline=plots.timeline(detail.events),
        deliveries=sorted(deliveries, key=lambda d: (d.purpose, d.recipient)),
        stuck=retry_transition(incident, ctx.operator, time.time()) is not None,
        resolvable=incident.state not in FINAL_STATES,
        age=time.time() - incident.created_at,
        notice=notice or {},
        link=_link,
    )


def _link(url: str | None) -> str | None:
    """A sighting's URL as a link only when it is http(s): a reporter's `javascript:` is text."""
    if url and urlsplit(url).scheme.lower() in ("http", "https"):
        return url
    return None


@page
async def incident(ctx: Context) -> Response:
    notices = {
        "retried": "Retry requested: the incident's step runs again now.",
        "resolved": "Resolved by hand: the incident is closed and its sealed token wiped.",
    }
    done = [text for key, text in notices.items() if ctx.request.query_params.get(key)]
    notice = {"ok": done[0]} if done else {}
    return await _incident_page(ctx, ctx.request.path_params["incident_id"], notice=notice)


@action
async def retry(ctx: Context, form: Form) -> Response:
    """The API's retry (`Worker.retry`), refused the same way when there is nothing to retry."""
    incident_id = ctx.request.path_params["incident_id"]
    found = await ctx.rt.store.incidents([incident_id])
    if not found:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    if not await ctx.rt.worker.retry(found[0], ctx.operator):
        reason = Reason.INCIDENT_NOT_RETRYABLE
        message = f"incident is {found[0].state} with {found[0].attempts} failed attempts: nothing to retry"
        failure(log, "console", reason, message, status=409, operator=ctx.operator, incident_id=incident_id)
        return await _incident_page(ctx, incident_id, 409, {"error": message})
    return _headers(RedirectResponse(f"/console/incidents/{incident_id}?retried=1", status_code=303))


@action
async def resolve(ctx: Context, form: Form) -> Response:
    """The API's resolve (`Worker.resolve`): the same note rules, refused the same way."""
    incident_id = ctx.request.path_params["incident_id"]
    note = resolution_note(json.dumps({"note": form.get("note") or ""}).encode())
    found = await ctx.rt.store.incidents([incident_id])
    if not found:
        raise OperatorError(Reason.INCIDENT_NOT_FOUND, "no such incident")
    if not await ctx.rt.worker.resolve(found[0], ctx.operator, note):
        raise OperatorError(
            Reason.INCIDENT_ALREADY_FINAL, f"incident is {found[0].state}: nothing to resolve"
        )
    return _headers(RedirectResponse(f"/console/incidents/{incident_id}?resolved=1", status_code=303))


# -- reports --------------------------------------------------------------------------------------


@page
async def report_page(ctx: Context) -> Response:
    return render(ctx.request, "report.html.j2", session=ctx.session, step="paste", error=None)


def _report_body(form: Form) -> bytes:
    """The form as the API's JSON report shape, so the API's parser and intake take it unchanged."""
    document = {"text": form.get("text", "")}
    for name in ("url", "note"):
        value = form.get(name, "").strip()
        if value:
            document[name] = value
    body = json.dumps(document).encode()
    if len(body) > REPORT_LIMIT:
        raise ReportError(Reason.REPORT_TOO_LARGE, f"report exceeds the limit of {REPORT_LIMIT} bytes")
    return body


@action
async def report_scan(ctx: Context, form: Form) -> Response:
    """Step one: the detector's findings, redacted; nothing is stored. The paste goes back sealed."""
    try:
        body = _report_body(form)
        report = parse_report(body, "application/json")
    except ReportError as exc:
        # The form comes back empty: echoing the paste would put its keys on a page.
        failure(log, "console", exc.reason, exc.message, status=exc.status, operator=ctx.operator)
        return render(
            ctx.request, "report.html.j2", exc.status, session=ctx.session, step="paste", error=exc.message
        )
    return render(
        ctx.request,
        "report.html.j2",
        session=ctx.session,
        step="review",
        error=None,
        report=report,
        sealed=ctx.console.sessions.seal_paste(body, ctx.operator),
    )


@action
async def report_submit(ctx: Context, form: Form) -> Response:
    """Step two: the sealed paste into the API's own intake (`accept_report`), once per scan: the
    seal is the Idempotency-Key, so a double submit replays instead of reporting twice."""
    started = time.monotonic()
    sealed = form.get("sealed", "")
    body = ctx.console.sessions.open_paste(sealed, ctx.operator)
    response = await idempotent(
        ctx.rt.store,
        ctx.operator,
        sealed[:64],
        hashlib.sha256(sealed.encode()).hexdigest(),
        lambda: accept_report(ctx.rt, ctx.operator, body, "application/json", started),
    )
    result = json.loads(bytes(response.body))
    return render(ctx.request, "report.html.j2", session=ctx.session, step="done", error=None, result=result)


# -- overview -------------------------------------------------------------------------------------

# (name, window, bucket width, tick every n buckets, tick label format)
_WINDOWS = (("24 hours", 24 * HOUR, HOUR, 6, "%H:%M"), ("7 days", 7 * 24 * HOUR, 6 * HOUR, 4, "%a %d"))


@page
async def overview(ctx: Context) -> Response:
    store = ctx.rt.store
    now = time.time()
    stats = await store.stats()
    plots_by_measure = []
    for timed, measure in ((Timed.REVOKE, "Time to revoke"), (Timed.CONFIRM, "Time to confirm")):
        row = []
        for name, window, width, tick_every, tick_format in _WINDOWS:
            # Buckets aligned to whole widths, so a reload a minute later shows the same buckets.
            since = (now - window) // width * width + width
            buckets = await store.percentiles(timed, since, now, width)
            whole = await store.percentiles(timed, now - window, now, window)
            row.append(
                plots.percentile_plot(
                    f"{measure}, last {name}",
                    buckets,
                    whole[0] if whole else None,
                    since,
                    width,
                    round(window / width),
                    tick_every,
                    tick_format,
                )
            )
        plots_by_measure.append((measure, row))
    caches = [
        {
            "reporter": name,
            "keys": cache.known,
            "hits": cache.hits,
            "misses": cache.misses,
            "fetches": cache.fetches,
            "fetch_failures": cache.fetch_failures,
        }
        for name, cache in ctx.rt.caches.items()
    ]
    return render(
        ctx.request,
        "overview.html.j2",
        session=ctx.session,
        stats=stats,
        bars=plots.state_bars(stats.incidents_by_state),
        plots=plots_by_measure,
        oldest=await store.oldest_pending(OLDEST_SHOWN),
        caches=caches,
        now=now,
        notifier=ctx.rt.worker.steps.notifier is not None,
    )


def mount() -> Mount:
    """Everything under /console: the pages, the forms and the vendored static files."""
    return Mount(
        "/console",
        routes=[
            Route("/", overview),
            Route("/login", signin_page),
            Route("/login", signin, methods=["POST"]),
            Route("/logout", signout, methods=["POST"]),
            Route("/incidents", incidents),
            Route("/incidents/{incident_id}", incident),
            Route("/incidents/{incident_id}/retry", retry, methods=["POST"]),
            Route("/incidents/{incident_id}/resolve", resolve, methods=["POST"]),
            Route("/report", report_page),
            Route("/report/scan", report_scan, methods=["POST"]),
            Route("/report", report_submit, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="console-static"),
        ],
    )
