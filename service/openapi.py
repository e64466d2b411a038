"""`/openapi.json`: every route, written out by hand.

By hand because the routes are plain Starlette handlers whose bodies (signed partner alerts, scanner
reports recognised by shape) no schema generator would infer; a test checks that every route the app
serves is described here, so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from service.store import State

_ERROR = {
    "type": "object",
    "description": "RFC 9457 problem details, with the reason code as `error`",
    "required": ["type", "title", "status", "detail", "error"],
    "properties": {
        "type": {"type": "string", "description": "urn:leak-responder:reason:<code>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "error": {"type": "string", "description": "reason code, the same as in the log and metrics"},
    },
}


def _refusals(*codes: tuple[int, str]) -> dict[str, Any]:
    return {
        str(status): {
            "description": reasons,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, reasons in codes
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_AUTH = ((401, "auth_missing"), (403, "auth_forbidden"), (503, "store_unavailable"))
_TIME = {"type": ["string", "null"], "format": "date-time"}
_INCIDENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in State]},
        "label": {"type": ["string", "null"], "enum": ["true_positive", "false_positive", None]},
        "redacted": {"type": "string", "description": "at most sm_, the first 4 and last 4 characters"},
        "token_hash": {"type": "string", "description": "SHA-256 hex of the token"},
        "token_type": {"type": "string"},
        "key_id": {"type": ["string", "null"]},
        "org_id": {"type": ["string", "null"]},
        "key_name": {"type": ["string", "null"]},
        **{
            f"{t}_at": _TIME
            for t in ("created", "matched", "revoked", "confirmed", "notified", "closed", "next_run")
        },
        "unconfirmed_at": {
            **_TIME,
            "description": "when the key was found still answering after its revoke (a retry clears it)",
        },
        "probed_at": {
            **_TIME,
            "description": "that key's last probe; while unconfirmed, the next comes an interval later",
        },
        "time_to_revoke": {"type": ["number", "null"], "description": "seconds from received to revoked"},
        "time_to_confirm": {"type": ["number", "null"], "description": "seconds from received to confirmed"},
        "attempts": {"type": "integer"},
        "last_reason": {"type": ["string", "null"]},
        "pages": {"type": "array", "items": {"type": "string"}},
    },
}
_DETAIL = {
    "allOf": [
        {"$ref": "#/components/schemas/Incident"},
        {
            "type": "object",
            "properties": {
                "recipients": {
                    "type": "array",
                    "description": "who is emailed: the owner, the notify list and the org's admins",
                    "items": {
                        "type": "object",
                        "properties": {
                            "email": {"type": "string"},
                            "name": {"type": "string"},
                            "role": {"type": "string", "enum": ["owner", "notify", "admin"]},
                        },
                    },
                },
                "key_created_at": _TIME,
                "key_last_used_at": _TIME,
                "used_after_leak": {"type": "boolean"},
                "org_name": {"type": ["string", "null"]},
                "waiting_for": {
                    "type": ["string", "null"],
                    "description": "the next step, when, and why it is not done yet; null once final",
                },
                "emails": {
                    "type": "array",
                    "description": "the email outbox: one row per recipient and purpose",
                    "items": {
                        "type": "object",
                        "properties": {
                            "recipient": {"type": "string"},
                            "purpose": {"type": "string"},
                            "status": {"type": "string", "enum": ["pending", "sending", "sent", "refused"]},
                            "attempts": {"type": "integer"},
                            "message_id": {"type": ["string", "null"]},
                            "detail": {"type": ["string", "null"], "description": "the last failure"},
                            "updated_at": _TIME,
                        },
                    },
                },
                "channels": {
                    "type": "array",
                    "description": "the channel outbox: one event per channel and state (never a URL)",
                    "items": {
                        "type": "object",
                        "properties": {
                            "channel_id": {"type": "string"},
                            "type": {"type": "string", "enum": ["webhook", "slack"]},
                            "event_state": {"type": "string"},
                            "status": {
                                "type": "string",
                                "enum": ["pending", "sending", "sent", "refused", "gone", "gave_up"],
                            },
                            "attempts": {"type": "integer"},
                            "last_status": {"type": ["integer", "null"]},
                            "reason": {"type": ["string", "null"]},
                            "created_at": _TIME,
                            "updated_at": _TIME,
                        },
                    },
                },
                "events": {
                    "type": "array",
                    "description": "the append-only audit trail, oldest first",
                    "items": {
                        "type": "object",
                        "properties": {
                            "at": _TIME,
                            "kind": {"type": "string"},
                            "state": {"type": ["string", "null"]},
                            "detail": {"type": "object"},
                        },
                    },
                },
                "sightings": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "seen_at": _TIME,
                            **{
                                f: {"type": ["string", "null"]}
                                for f in ("reporter", "operator", "url", "source", "token_type", "note")
                            },
                        },
                    },
                },
            },
        },
    ]
}
_FINDING = {
    "type": "object",
    "properties": {
        "token_hash": {"type": "string"},
        "redacted": {"type": "string"},
        "confidence": {"type": ["string", "null"], "enum": ["high", "candidate", None]},
        "encoding": {"type": ["string", "null"], "enum": ["plain", "percent", "base64", None]},
        "file": {"type": ["string", "null"]},
        "line": {"type": ["integer", "null"]},
        "column": {"type": ["integer", "null"]},
        "incident_id": {"type": "string"},
        "state": {"type": "string"},
        "label": {"type": ["string", "null"], "description": "absent when the lookup did not finish in time"},
    },
}
_INCIDENT_ID = {"name": "incident_id", "in": "path", "required": True, "schema": {"type": "string"}}
_OPERATOR: list[dict[str, list[str]]] = [{"operator": []}]


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema or {"type": "string"}}


def openapi_document(reporters: list[str]) -> dict[str, Any]:
    """The document for this deployment: the partner route lists only the reporters enabled here."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "leak-responder",
            "version": "1",
            "description": "Revokes leaked Supermemory API keys and proves the revocation. No response"
            " ever holds a raw token: only its SHA-256 and its redacted form.",
        },
        "components": {
            "securitySchemes": {
                "operator": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an operator's token; the service holds only its SHA-256"
                    " (LEAK_RESPONDER_OPERATOR_TOKENS)",
                }
            },
            "schemas": {
                "Error": _ERROR,
                "Incident": _INCIDENT,
                "IncidentDetail": _DETAIL,
                "Finding": _FINDING,
            },
        },
        "paths": {
            "/v1/alerts/{reporter}": {
                "post": {
                    "summary": "A partner's signed secret-scanning alert; answers with feedback labels",
                    "description": "The body is verified against `<Reporter>-Public-Key-Signature` (ECDSA"
                    " P-256, SHA-256, over the raw bytes; deps.dev signs as `DepsDev-` or `GOSST-`)"
                    " before it is parsed. Never a 2xx before the"
                    " alert is durably committed. Tokens whose lookup did not finish within the request"
                    " budget are left out of the answer and handled in the background.",
                    "parameters": [
                        {"name": "reporter", "in": "path", "required": True, "schema": {"enum": reporters}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["token", "type"],
                                        "properties": {
                                            f: {"type": "string"} for f in ("token", "type", "url", "source")
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "token_hash": {"type": "string"},
                                        "token_type": {"type": "string"},
                                        "label": {"enum": ["true_positive", "false_positive"]},
                                    },
                                },
                            },
                            "one entry per distinct labelled token, in order of first appearance",
                        ),
                        **_refusals(
                            (400, "body_not_json, body_not_list, body_empty, item_*"),
                            (401, "signature_missing, signature_malformed, signature_invalid, key_unknown"),
                            (404, "reporter_disabled"),
                            (413, "body_too_large"),
                            (503, "keys_unavailable, store_unavailable"),
                        ),
                    },
                }
            },
            "/v1/reports": {
                "post": {
                    "summary": "An operator's manual report of suspected leaks",
                    "description": "Recognised by shape: text/plain (scanned for keys), JSON"
                    ' `{"text", "url", "note"}` or `{"tokens": [...], "url", "note"}`, a gitleaks JSON'
                    " report, or trufflehog JSON lines. Found keys enter the same pipeline as partner"
                    " alerts. With `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header), a"
                    " retry of a successful request replays its answer for 24 h.",
                    "security": _OPERATOR,
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/json": {"schema": {"type": ["object", "array"]}},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "kind": {"enum": ["text", "tokens", "gitleaks", "trufflehog"]},
                                    "findings": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Finding"},
                                    },
                                },
                            },
                            "each finding with its incident",
                        ),
                        **_refusals(
                            (
                                400,
                                "report_not_utf8, report_unrecognised, report_bad_field,"
                                " report_note_holds_key, idempotency_key_invalid",
                            ),
                            (409, "idempotency_conflict: the first request with this key is still running"),
                            (413, "report_too_large (1 MiB)"),
                            (422, "idempotency_mismatch: the key was used with another body"),
                            *_AUTH,
                        ),
                    },
                }
            },
            "/v1/incidents": {
                "get": {
                    "summary": "Incidents, newest first",
                    "security": _OPERATOR,
                    "parameters": [
                        _query("state", "one state", {"enum": [s.value for s in State]}),
                        _query("reporter", "incidents with a sighting from this reporter (github, manual…)"),
                        _query("org", "the key's organisation id"),
                        _query("since", "received at or after: ISO-8601 or epoch seconds"),
                        _query("until", "received before: ISO-8601 or epoch seconds"),
                        _query("limit", "page size, 1 to 200 (default 50)", {"type": "integer"}),
                        _query("next", "the opaque cursor from the previous page"),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "incidents": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Incident"},
                                    },
                                    "next": {"type": ["string", "null"]},
                                },
                            },
                            "a page of incidents; `next` is null on the last page",
                        ),
                        **_refusals((400, "query_invalid"), *_AUTH),
                    },
                }
            },
            "/v1/incidents/{incident_id}": {
                "get": {
                    "summary": "One incident with its whole timeline and sightings",
                    "security": _OPERATOR,
                    "parameters": [_INCIDENT_ID],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/IncidentDetail"}, "the incident"),
                        **_refusals((404, "incident_not_found"), *_AUTH),
                    },
                }
            },
            "/v1/incidents/{incident_id}/retry": {
                "post": {
                    "summary": "Run a stuck incident's step now",
                    "description": "Stuck: `unconfirmed` (revoke again, probe again), or `received`,"
                    " `matched` or `revoked` with failed attempts (reset them, run now). Recorded in the"
                    " timeline with the operator's name.",
                    "security": _OPERATOR,
                    "parameters": [_INCIDENT_ID],
                    "responses": {
                        "202": _json({"$ref": "#/components/schemas/IncidentDetail"}, "scheduled"),
                        **_refusals((404, "incident_not_found"), (409, "incident_not_retryable"), *_AUTH),
                    },
                }
            },
            "/v1/incidents/{incident_id}/resolve": {
                "post": {
                    "summary": "Close an open incident by hand, with a note",
                    "description": "For an `unconfirmed` key checked by other means, or any incident that is"
                    " not final: it closes, the sealed token is wiped, and the note and the operator's name"
                    " stay on the timeline. The note must not hold a key.",
                    "security": _OPERATOR,
                    "parameters": [_INCIDENT_ID],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["note"],
                                    "properties": {"note": {"type": "string", "maxLength": 2000}},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/IncidentDetail"}, "resolved"),
                        **_refusals(
                            (400, "resolution_invalid, report_note_holds_key"),
                            (404, "incident_not_found"),
                            (409, "incident_already_final"),
                            *_AUTH,
                        ),
                    },
                }
            },
            "/v1/public/reports": {
                "post": {
                    "summary": "Anyone's report of a leaked key: no authentication, always the same answer",
                    "description": "The detector (every encoding it knows) runs over the text, found keys"
                    " are committed to the same pipeline with reporter `public`, and the answer comes"
                    " before their lookup: it is the same 202, body and headers, whatever the text held,"
                    " so it cannot be used to test keys. JSON that is not `{text, url}` is scanned as"
                    " text. Per-client and global rates (`Retry-After` on 429) are checked first.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "text/plain": {"schema": {"type": "string", "maxLength": 65536}},
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "text": {"type": "string"},
                                        "url": {"type": "string", "description": "where it was found"},
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": _json(
                            {"type": "object", "properties": {"status": {"const": "received"}}},
                            "received (recorded), whatever it held",
                        ),
                        **_refusals(
                            (413, "public_report_too_large (64 KiB), public_report_too_many_keys"),
                            (415, "public_report_unsupported_type"),
                            (429, "public_rate_limited, public_global_rate_limited (see Retry-After)"),
                            (503, "store_unavailable"),
                        ),
                    },
                }
            },
            "/report": {
                "get": {
                    "summary": "A form for anyone to report a leaked key (posts to /v1/public/reports)",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/.well-known/security.txt": {
                "get": {
                    "summary": "RFC 9116 security.txt: the security contact, and the report form",
                    "responses": {"200": {"description": "text", "content": {"text/plain": {}}}},
                }
            },
            "/livez": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: the store answers and the worker runs",
                    "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition", "content": {"text/plain": {}}}},
                }
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}
            },
        },
    }
