"""Why an inbound alert was refused, as one closed vocabulary.

The same value names the HTTP answer, the log line's `reason` and the metric label, so a refusal can
be followed from the sender's 4xx to our dashboards without translating between vocabularies.
"""

from __future__ import annotations

from service.reasons import Reason
from service.refusal import Refusal

R = Reason

# The one place that decides what the sender sees. 401 and 4xx tell a partner its request is wrong
# and must not be retried as is; 503 tells it the fault is ours and a retry will do. The cache
# events are never raised by this package, but if one ever is, it is our side failing: 503.
STATUS: dict[Reason, int] = {
    R.SIGNATURE_MISSING: 401,
    R.SIGNATURE_MALFORMED: 401,
    R.SIGNATURE_INVALID: 401,
    R.KEY_UNKNOWN: 401,
    R.KEY_NOT_YET_FETCHED: 503,
    R.KEYS_UNAVAILABLE: 503,
    R.BODY_TOO_LARGE: 413,
    R.BODY_BUDGET_FULL: 503,
    R.BODY_NOT_JSON: 400,
    R.BODY_NOT_LIST: 400,
    R.BODY_EMPTY: 400,
    R.ITEM_NOT_OBJECT: 400,
    R.ITEM_MISSING_TOKEN: 400,
    R.ITEM_MISSING_TYPE: 400,
    R.ITEM_BAD_FIELD: 400,
    R.KEYS_FETCH_FAILED: 503,
    R.KEYS_BAD_RESPONSE: 503,
    R.SIGNING_KEY_CHANGED: 503,
}


class InboundError(Refusal):
    STATUS = STATUS
