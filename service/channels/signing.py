"""Standard Webhooks signatures (https://www.standardwebhooks.com/): our own few lines, so that the
service needs no extra dependency for an HMAC; the tests check them against the reference package.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, the key the base64 after `whsec_`,
the signature `v1,` + base64 of HMAC-SHA256. A receiver checks the timestamp against its clock
(replays) and may dedupe on `webhook-id`, which stays the same through our retries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

PREFIX = "whsec_"
TOLERANCE = 5 * 60.0


class SignatureError(Exception):
    """A delivery whose signature, timestamp or headers do not hold."""


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX), validate=True)


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


def verify(secret: str, received: Mapping[str, str], body: bytes, now: float) -> None:
    """What a receiver does (the sandbox's receiver uses it): raises SignatureError unless one of the
    space-separated `v1,` signatures matches and the timestamp is within the tolerance."""
    message_id = received.get("webhook-id")
    stamp = received.get("webhook-timestamp")
    offered = received.get("webhook-signature")
    if not message_id or not stamp or not offered:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs(now - timestamp) > TOLERANCE:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    expected = signature(secret, message_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered.split()):
        raise SignatureError("no signature matches")
