"""The operator's side of the API: who is asking, replaying a request, and incidents as JSON.

Kept apart from the routes (service.app) so that the routes stay a thin sequence of calls, and so
that what an operator sees of an incident is decided in one place, built from hashes and redacted
forms only: nothing here ever receives a raw token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse, Response

from service.inbound.reports import ReportItem, check_note, parse_report
from service.observability import ALERTS
from service.reasons import Reason
from service.refusal import Refusal
from service.runtime import Runtime
from service.store import (
    AlertRecord,
    IdempotencyState,
    Incident,
    IncidentDetail,
    IncidentFilter,
    IncidentRef,
    Label,
    State,
    Store,
    StoreError,
    TokenSighting,
)
from service.tokens import safe_text

log = logging.getLogger("service.operators")

R = Reason
STATUS: dict[Reason, int] = {
    R.AUTH_MISSING: 401,
    R.AUTH_FORBIDDEN: 403,
    R.OPERATORS_NOT_CONFIGURED: 403,
    R.IDEMPOTENCY_KEY_INVALID: 400,
    # The draft's answers: 409 while the first request runs, 422 for a key reused on another body.
    R.IDEMPOTENCY_CONFLICT: 409,
    R.IDEMPOTENCY_MISMATCH: 422,
    R.QUERY_INVALID: 400,
    R.INCIDENT_NOT_FOUND: 404,
    R.INCIDENT_NOT_RETRYABLE: 409,
    R.INCIDENT_ALREADY_FINAL: 409,
    R.RESOLUTION_INVALID: 400,
}


class OperatorError(Refusal):
    STATUS = STATUS


# -- who is asking --------------------------------------------------------------------------------

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="leak-responder"'}


def authenticate(authorization: str | None, operators: Mapping[str, str]) -> str:
    """The operator's name for a bearer token, compared by SHA-256 in constant time.

    Every configured hash is compared, even after a match, so the time taken says nothing about
    which operator (or how many) a token came close to.
    """
    if not operators:
        # Said apart from a wrong token: the fix is on the server (the setting), not the caller.
        raise OperatorError(
            R.OPERATORS_NOT_CONFIGURED,
            "no operators are configured here: set LEAK_RESPONDER_OPERATOR_TOKENS"
            " (`leak-responder operator-token NAME` prints a token and its entry)",
        )
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise OperatorError(R.AUTH_MISSING, "an operator bearer token is required", _CHALLENGE)
    return operator_for(token, operators)


def operator_for(token: str, operators: Mapping[str, str]) -> str:
    """The operator's name for a token however it was presented (a bearer header, the console's
    sign-in form), compared as `authenticate` says."""
    if not token:
        raise OperatorError(R.AUTH_MISSING, "an operator token is required")
    presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
    found = None
    for name, digest in operators.items():
        if hmac.compare_digest(presented, digest):
            found = name
    if found is None:
        raise OperatorError(
            R.AUTH_FORBIDDEN, "this token is not an operator's (its SHA-256 is not configured)"
        )
    return found


# -- Idempotency-Key ------------------------------------------------------------------------------

IDEMPOTENCY_TTL = 24 * 3600.0
# Longer than any request can run (reading a report and the request budget): a claim still running
# after this was left by a process that died, and is taken over instead of answering 409 for a day.
IDEMPOTENCY_STALE = 120.0
_KEY = re.compile(r'"?([\x21\x23-\x7e]{1,255})"?')


def idempotency_key(headers: Headers) -> str | None:
    """The Idempotency-Key header; the draft makes it a structured-field string (quoted), but
    clients commonly send it bare, so both are taken."""
    raw = headers.get("idempotency-key")
    if raw is None:
        return None
    match = _KEY.fullmatch(raw.strip())
    if match is None:
        raise OperatorError(R.IDEMPOTENCY_KEY_INVALID, "Idempotency-Key must be 1-255 printable characters")
    return match.group(1)


def fingerprint(content_type: str | None, body: bytes) -> str:
    """The media type counts: the same bytes as text/plain and as JSON are different reports."""
    media = (content_type or "").split(";")[0].strip().lower()
    return hashlib.sha256(media.encode() + b"\0" + body).hexdigest()


async def idempotent(
    store: Store,
    operator: str,
    key: str | None,
    print_: str,
    run: Callable[[], Awaitable[Response]],
) -> Response:
    """Run `run` once per (operator, key): replay its stored 2xx, refuse a reuse or a concurrent run.

    Only a success is kept. A refusal or a failure drops the claim, so the retry runs afresh and
    gets the same refusal (or, for our own failures, a second chance).
    """
    if key is None:
        return await run()
    earlier = await store.begin_idempotent(operator, key, print_, IDEMPOTENCY_TTL, IDEMPOTENCY_STALE)
    if earlier is not None:
        if earlier.fingerprint != print_:
            raise OperatorError(R.IDEMPOTENCY_MISMATCH, "this Idempotency-Key was used for another request")
        if earlier.state is IdempotencyState.RUNNING:
            raise OperatorError(
                R.IDEMPOTENCY_CONFLICT, "a request with this Idempotency-Key is still running"
            )
        assert earlier.status is not None and earlier.response is not None
        return Response(earlier.response, earlier.status, media_type="application/json")
    try:
        response = await run()
    except BaseException:
        # If this fails too, the claim goes stale and is taken over; the first error is what matters.
        with contextlib.suppress(StoreError):
            await store.drop_idempotent(operator, key)
        raise
    if 200 <= response.status_code < 300:
        await store.finish_idempotent(operator, key, response.status_code, bytes(response.body))
    else:
        await store.drop_idempotent(operator, key)
    return response


# -- manual reports -------------------------------------------------------------------------------

MANUAL = "manual"
MANUAL_SOURCE = "manual_submission"


async def accept_report(
    rt: Runtime, operator: str, body: bytes, content_type: str | None, started: float
) -> Response:
    """A manual report, from the API or the console: found keys go through the partner alerts'
    intake and labelling, so a paste is handled exactly like an alert (same dedupe, same revoke,
    same audit trail). `started` is when the request came in: the labelling budget counts from it."""
    report = parse_report(body, content_type)
    sightings = [
        TokenSighting(i.token, i.token_type, i.url or i.file, MANUAL_SOURCE, MANUAL, operator, report.note)
        for i in report.items
    ]
    refs: list[IncidentRef] = []
    labels: dict[str, Label] = {}
    if sightings:
        record = AlertRecord(MANUAL, hashlib.sha256(body).hexdigest(), len(sightings), operator)
        refs, labels = await rt.worker.accept(
            record, sightings, rt.settings.request_budget - (time.monotonic() - started)
        )
    by_hash = {r.token_hash: (r.id, r.state) for r in refs}
    # The labelling may have moved incidents on; a failed re-read only shows intake's states.
    with contextlib.suppress(StoreError):
        by_hash |= {i.token_hash: (i.id, i.state) for i in await rt.store.incidents([r.id for r in refs])}
    ALERTS.labels(reporter=MANUAL, outcome="accepted").inc()
    log.info(
        "report accepted",
        extra={"operator": operator, "kind": report.kind, "items": len(sightings), "tokens": len(refs)},
    )
    findings = [finding_json(i, *by_hash[i.token_hash], labels.get(i.token_hash)) for i in report.items]
    return JSONResponse({"kind": report.kind, "findings": findings})


# -- listing incidents ----------------------------------------------------------------------------

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
_INCIDENT_ID = re.compile(r"inc_[0-9a-f]{12,40}")


def resolution_note(body: bytes) -> str:
    """The note of `POST /v1/incidents/{id}/resolve`: JSON `{"note": "…"}`, required, because a
    closed-by-hand incident must say why on its timeline; refused when it holds a key."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    note = document.get("note") if isinstance(document, dict) else None
    if not isinstance(note, str) or not note.strip():
        raise OperatorError(R.RESOLUTION_INVALID, 'expected a JSON body {"note": "why it is resolved"}')
    checked = check_note(note.strip())
    assert checked is not None
    return checked


def incident_filter(params: QueryParams) -> IncidentFilter:
    """The list's query: state, reporter, org, since/until (ISO-8601 or epoch seconds), limit, next."""
    unknown = set(params) - {"state", "reporter", "org", "since", "until", "limit", "next"}
    if unknown:
        raise OperatorError(R.QUERY_INVALID, f"unknown query parameters: {', '.join(sorted(unknown))}")
    state = params.get("state")
    if state is not None and state not in {s.value for s in State}:
        raise OperatorError(R.QUERY_INVALID, f"state must be one of {', '.join(State)}")
    try:
        limit = int(params.get("limit", DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise OperatorError(R.QUERY_INVALID, f"limit must be an integer from 1 to {MAX_LIMIT}")
    cursor = params.get("next")
    return IncidentFilter(
        state=State(state) if state is not None else None,
        reporter=params.get("reporter") or None,
        org_id=params.get("org") or None,
        since=_instant(params, "since"),
        until=_instant(params, "until"),
        limit=limit,
        before_id=_decode_cursor(cursor) if cursor else None,
    )


def _instant(params: QueryParams, name: str) -> float | None:
    value = params.get(name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise OperatorError(R.QUERY_INVALID, f"{name} must be ISO-8601 or epoch seconds") from None
    # A time without a zone is read as UTC: the service and its timestamps have no other zone.
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _encode_cursor(incident_id: str) -> str:
    """Opaque on purpose: clients pass it back as is, so what it holds may change."""
    return base64.urlsafe_b64encode(incident_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if not _INCIDENT_ID.fullmatch(decoded):
        raise OperatorError(R.QUERY_INVALID, "next is not a cursor this service handed out")
    return decoded


def incident_page(found: list[Incident], limit: int) -> dict[str, Any]:
    """`found` was fetched with one row more than `limit`: that row's presence is the next page's."""
    return {"incidents": [incident_json(i) for i in found[:limit]], "next": next_cursor(found, limit)}


def next_cursor(found: list[Incident], limit: int) -> str | None:
    """The cursor of the page after `found[:limit]`, if `found` (one row more than `limit`) says
    there is one."""
    return _encode_cursor(found[limit - 1].id) if len(found) > limit else None


# -- what an operator sees ------------------------------------------------------------------------


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def incident_json(incident: Incident) -> dict[str, Any]:
    return {
        "id": incident.id,
        "state": str(incident.state),
        "label": str(incident.label) if incident.label else None,
        "redacted": incident.redacted,
        "token_hash": incident.token_hash,
        "token_type": incident.token_type,
        "key_id": incident.key_id,
        "org_id": incident.org_id,
        "key_name": incident.key_name,
        "created_at": iso(incident.created_at),
        "matched_at": iso(incident.matched_at),
        "revoked_at": iso(incident.revoked_at),
        "confirmed_at": iso(incident.confirmed_at),
        "unconfirmed_at": iso(incident.unconfirmed_at),
        "probed_at": iso(incident.probed_at),
        "notified_at": iso(incident.notified_at),
        "closed_at": iso(incident.closed_at),
        "time_to_revoke": _seconds(incident.time_to_revoke),
        "time_to_confirm": _seconds(incident.time_to_confirm),
        "attempts": incident.attempts,
        "last_reason": incident.last_reason,
        "next_run_at": iso(incident.next_run_at),
        "pages": sorted(incident.pages),
    }


# The step each open state waits for, as an operator would name it.
_NEXT_STEP = {
    State.RECEIVED: "lookup",
    State.MATCHED: "revoke",
    State.REVOKED: "probe",
    State.CONFIRMED: "notify",
    State.UNCONFIRMED: "re-probe",
    State.NOTIFIED: "close",
}


def waiting_for(incident: Incident) -> str | None:
    """What an open incident is waiting for, in one line: its next step and when, and why it is
    not done yet (the last failure's reason code and how many attempts failed). None once final."""
    step = _NEXT_STEP.get(incident.state)
    if step is None:
        return None
    why = (
        f" after {incident.attempts} failed attempt(s), last {incident.last_reason}"
        if incident.attempts
        else ""
    )
    if incident.next_run_at is None:
        reason = incident.last_reason or "not scheduled"
        return f"{step}: not scheduled ({reason}); it runs again once that is fixed, or on retry"
    return f"{step} at {iso(incident.next_run_at)}{why}"


def detail_json(detail: IncidentDetail) -> dict[str, Any]:
    """The incident with what it waits for, its timeline, its sightings and, per recipient, where
    its email stands (with the Message-ID, the one thing a mail log can be searched by)."""
    return {
        **incident_json(detail.incident),
        "waiting_for": waiting_for(detail.incident),
        "recipients": detail.incident.recipients,
        "key_created_at": iso(detail.incident.key_created_at),
        "key_last_used_at": iso(detail.incident.key_last_used_at),
        "used_after_leak": detail.incident.used_after_leak,
        "org_name": detail.incident.org_name,
        "emails": [
            {
                "recipient": d.recipient,
                "purpose": d.purpose,
                "status": str(d.status),
                "attempts": d.attempts,
                "message_id": d.message_id,
                "detail": d.detail,
                "updated_at": iso(d.updated_at),
            }
            for d in detail.deliveries
        ],
        "channels": [
            {
                "channel_id": c.channel_id,
                "type": c.type,
                "event_state": c.state,
                "status": str(c.status),
                "attempts": c.attempts,
                "last_status": c.last_status,
                "reason": c.reason,
                "created_at": iso(c.created_at),
                "updated_at": iso(c.updated_at),
            }
            for c in detail.channels
        ],
        "events": [
            {"at": iso(e.at), "kind": e.kind, "state": str(e.state) if e.state else None, "detail": e.detail}
            for e in detail.events
        ],
        "sightings": [
            {
                "seen_at": iso(s.seen_at),
                "reporter": s.reporter,
                "operator": s.operator,
                "url": s.url,
                "source": s.source,
                "token_type": s.token_type,
                "note": s.note,
            }
            for s in detail.sightings
        ],
    }


def finding_json(item: ReportItem, incident_id: str, state: State, label: str | None) -> dict[str, Any]:
    return {
        "token_hash": item.token_hash,
        "redacted": item.redacted,
        "confidence": item.confidence,
        "encoding": item.encoding,
        "file": safe_text(item.file) if item.file is not None else None,
        "line": item.line,
        "column": item.column,
        "incident_id": incident_id,
        "state": str(state),
        "label": label,
    }
