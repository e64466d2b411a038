"""Partner signatures: ECDSA P-256 / SHA-256, base64 of DER, over the raw body bytes.

Verification runs on the bytes exactly as received and before any parsing: a parse and
re-serialisation would change whitespace or key order and turn every genuine alert into a 401.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from service.inbound.keys import KeyCache
from service.inbound.reasons import InboundError
from service.inbound.reporters import Reporter
from service.reasons import Reason


def decode_signature(signature_b64: str) -> bytes:
    """The DER signature in a header; checked apart from the verification so a sender with a broken
    encoder hears "malformed", not "invalid", which would send it looking for a key problem."""
    try:
        der = base64.b64decode(signature_b64.strip(), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise InboundError(Reason.SIGNATURE_MALFORMED, "signature is not valid base64") from None
    try:
        decode_dss_signature(der)
    except ValueError:
        raise InboundError(Reason.SIGNATURE_MALFORMED, "signature is not a DER ECDSA signature") from None
    return der


def verify_signature(public_key: ec.EllipticCurvePublicKey, body: bytes, signature_b64: str) -> None:
    Claim(public_key, decode_signature(signature_b64)).verify(body)


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request's headers claim before its body is read: the key that signed it and the
    signature. Getting one is the whole of what can be checked from the headers, so a stranger is
    refused before a byte of its body is held."""

    public_key: ec.EllipticCurvePublicKey
    der: bytes

    def verify(self, body: bytes) -> None:
        """High-S signatures verify (OpenSSL accepts both s and n−s): the signature is never used
        as an identity (a replay is recognised by the body's hash), so its malleability gives a
        sender nothing it could not do by resending the same bytes."""
        try:
            self.public_key.verify(self.der, body, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise InboundError(Reason.SIGNATURE_INVALID, "signature does not match the body") from None


async def signed_by(reporter: Reporter, cache: KeyCache, headers: Mapping[str, str]) -> Claim:
    """The request's claim, from its headers alone.

    `headers` is looked up case-insensitively whatever the Mapping (Starlette's Headers, or a
    plain dict in tests and tools), because partners vary the header names' case."""
    signed = _signed_pair(reporter, headers)
    if signed is None:
        names = " or ".join(f"{p.identifier} and {p.signature}" for p in reporter.header_pairs)
        raise InboundError(Reason.SIGNATURE_MISSING, f"headers {names} are required")
    identifier, signature = signed
    der = decode_signature(signature)
    return Claim(await cache.get(identifier.strip()), der)


def _signed_pair(reporter: Reporter, headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The identifier and signature of the first of the reporter's header pairs that the request
    carries in full; a half pair is no pair, as a signature without its key cannot be checked."""
    for pair in reporter.header_pairs:
        identifier, signature = _header(headers, pair.identifier), _header(headers, pair.signature)
        if identifier and signature:
            return identifier, signature
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)
