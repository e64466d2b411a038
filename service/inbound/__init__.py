"""Partner alerts in: the signature checked over the raw bytes, then the body parsed strictly."""

from service.inbound.alerts import AlertItem, parse_alert
from service.inbound.body import BodyBudget, read_limited
from service.inbound.keys import KeyCache
from service.inbound.reasons import InboundError
from service.inbound.reporters import Reporter, reporters
from service.inbound.verify import Claim, signed_by, verify_signature

__all__ = [
    "AlertItem",
    "BodyBudget",
    "Claim",
    "InboundError",
    "KeyCache",
    "Reason",
    "Reporter",
    "parse_alert",
    "read_limited",
    "reporters",
    "signed_by",
    "verify_signature",
]
