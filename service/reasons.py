"""Every reason code the service can report, as one closed vocabulary.

An operator follows a failure from a caller's 4xx, a log line's `reason`, a metric label or a page to
`docs/reasons.md` and to the test that makes it happen. That only works if there is one list: a code
is a member of this enum or it does not exist. `failure()` takes nothing else, each refusal's status
table is keyed by it, and `tests/unit/test_reasons.py` checks the docs page against it, both ways.

This module imports nothing of the service, so every layer (the store included) may use it.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    # -- partner alerts, refused (stage `inbound`) ------------------------------------------------
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_MALFORMED = "signature_malformed"
    SIGNATURE_INVALID = "signature_invalid"
    KEY_UNKNOWN = "key_unknown"
    KEY_NOT_YET_FETCHED = "key_not_yet_fetched"
    KEYS_UNAVAILABLE = "keys_unavailable"
    BODY_TOO_LARGE = "body_too_large"
    BODY_BUDGET_FULL = "body_budget_full"
    BODY_NOT_JSON = "body_not_json"
    BODY_NOT_LIST = "body_not_list"
    BODY_EMPTY = "body_empty"
    ITEM_NOT_OBJECT = "item_not_object"
    ITEM_MISSING_TOKEN = "item_missing_token"  # noqa: S105 (a reason name, not a secret)
    ITEM_MISSING_TYPE = "item_missing_type"
    ITEM_BAD_FIELD = "item_bad_field"
    REPORTER_DISABLED = "reporter_disabled"
    # -- any route (stage `http`) -------------------------------------------------------------------
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CLIENT_DISCONNECTED = "client_disconnected"
    INTERNAL_ERROR = "internal_error"
    NOT_READY = "not_ready"
    # -- the verification-key cache (events, not refusals) -----------------------------------------
    KEYS_FETCH_FAILED = "keys_fetch_failed"
    KEYS_BAD_RESPONSE = "keys_bad_response"
    SIGNING_KEY_CHANGED = "signing_key_changed"
    # -- manual reports and the operator API (stage `operators`) ----------------------------------
    AUTH_MISSING = "auth_missing"
    AUTH_FORBIDDEN = "auth_forbidden"
    OPERATORS_NOT_CONFIGURED = "operators_not_configured"
    REPORT_TOO_LARGE = "report_too_large"
    REPORT_NOT_UTF8 = "report_not_utf8"
    REPORT_UNRECOGNISED = "report_unrecognised"
    REPORT_BAD_FIELD = "report_bad_field"
    REPORT_NOTE_HOLDS_KEY = "report_note_holds_key"
    IDEMPOTENCY_KEY_INVALID = "idempotency_key_invalid"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    QUERY_INVALID = "query_invalid"
    INCIDENT_NOT_FOUND = "incident_not_found"
    INCIDENT_NOT_RETRYABLE = "incident_not_retryable"
    INCIDENT_ALREADY_FINAL = "incident_already_final"
    RESOLUTION_INVALID = "resolution_invalid"
    # -- the operator console (stage `console`) ---------------------------------------------------
    SIGNIN_RATE_LIMITED = "signin_rate_limited"
    CSRF_INVALID = "csrf_invalid"
    ORIGIN_REFUSED = "origin_refused"
    SESSION_INVALID = "session_invalid"
    PASTE_INVALID = "paste_invalid"
    FORM_INVALID = "form_invalid"
    # -- public reports, refused (stage `public`) -------------------------------------------------
    PUBLIC_RATE_LIMITED = "public_rate_limited"
    PUBLIC_GLOBAL_RATE_LIMITED = "public_global_rate_limited"
    PUBLIC_REPORT_TOO_LARGE = "public_report_too_large"
    PUBLIC_REPORT_TOO_MANY_KEYS = "public_report_too_many_keys"
    PUBLIC_REPORT_UNSUPPORTED_TYPE = "public_report_unsupported_type"
    # -- Supermemory's admin API: lookup and revoke (stages `match`, `revoke`) --------------------
    ADMIN_UNAUTHORIZED = "admin_unauthorized"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    BAD_RESPONSE = "bad_response"
    # -- the probe with the leaked key (stage `confirm`) ------------------------------------------
    PROBE_UNAUTHORIZED = "probe_unauthorized"
    PROBE_KEY_ALIVE = "probe_key_alive"
    PROBE_RATE_LIMITED = "probe_rate_limited"
    PROBE_SERVER_ERROR = "probe_server_error"
    PROBE_UNEXPECTED_STATUS = "probe_unexpected_status"
    PROBE_TIMEOUT = "probe_timeout"
    PROBE_CONNECTION_ERROR = "probe_connection_error"
    PROBE_BAD_RESPONSE = "probe_bad_response"
    TOKEN_UNAVAILABLE = "token_unavailable"  # noqa: S105 (a reason name, not a secret)
    TOKEN_UNSEALABLE = "token_unsealable"  # noqa: S105 (a reason name, not a secret)
    UNCONFIRMED_WINDOW_OVER = "unconfirmed_window_over"
    # -- the pipeline ----------------------------------------------------------------------------
    SHAPE_GATE = "shape_gate"
    NOT_A_KEY = "not_a_key"
    LOOKUP_FIELD_MALFORMED = "lookup_field_malformed"
    CHANNEL_MALFORMED = "channel_malformed"
    DRY_RUN = "dry_run"
    STEP_CRASHED = "step_crashed"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_COMMIT_FAILED = "store_commit_failed"
    STORE_INDEX_LOST = "store_index_lost"
    STORE_LISTEN_LOST = "store_listen_lost"
    # -- telling owners (stage `notify`) ---------------------------------------------------------
    RECIPIENT_REFUSED = "recipient_refused"
    SECURITY_CONTACT_REFUSED = "security_contact_refused"
    SMTP_UNAVAILABLE = "smtp_unavailable"
    SMTP_TEMPORARY_FAILURE = "smtp_temporary_failure"
    SMTP_AUTH_FAILED = "smtp_auth_failed"
    SMTP_TLS_REQUIRED = "smtp_tls_required"
    SMTP_SENDER_REFUSED = "smtp_sender_refused"
    BAD_RECIPIENT_ADDRESS = "bad_recipient_address"
    NO_RECIPIENT = "no_recipient"
    RESEND_UNKNOWN_OUTCOME = "resend_unknown_outcome"
    NOTIFY_PENDING = "notify_pending"
    DELIVERY_HELD_ELSEWHERE = "delivery_held_elsewhere"
    # -- the org's own endpoints: webhooks and Slack (stage `channels`) -------------------------
    CHANNEL_ADDRESS_REFUSED = "channel_address_refused"
    CHANNEL_REDIRECTED = "channel_redirected"
    CHANNEL_REJECTED = "channel_rejected"
    CHANNEL_GONE = "channel_gone"
    CHANNEL_GAVE_UP = "channel_gave_up"
    # -- pages (stage `alerting`; each also a Sentry event) --------------------------------------
    REVOCATION_UNCONFIRMED = "revocation_unconfirmed"
    REVOCATION_FAILED = "revocation_failed"
    LOOKUP_UNAUTHORIZED = "lookup_unauthorized"
    REPORTER_KEYS_UNAVAILABLE = "reporter_keys_unavailable"
    OWNER_UNREACHABLE = "owner_unreachable"
    PIPELINE_STALLED = "pipeline_stalled"
    PUBLIC_REPORTS_FLOODED = "public_reports_flooded"
    # -- delivering pages to Sentry (stage `alerting`; a log line, since Sentry did not take it) --
    PAGE_DELAYED = "page_delayed"
    PAGE_DROPPED = "page_dropped"
    # -- start-up notices ------------------------------------------------------------------------
    NOTIFY_DISABLED = "notify_disabled"
    PAGER_LOG_ONLY = "pager_log_only"
