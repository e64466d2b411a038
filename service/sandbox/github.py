"""A stand-in for GitHub's side of the secret-scanning partner program (contract.md §4): it serves the
verification keys and signs and sends alerts exactly as GitHub does.

Verification is where a partner endpoint is easiest to get subtly wrong (re-serialised bodies, rotated
keys, a key fetch that fails or returns garbage, a known identifier whose key material changes), and
none of that can be provoked against the real GitHub. Here every one is a method or a knob, and the
alert body is signed as raw bytes and sent as those same bytes, so a receiver that re-serialises before
verifying fails against the sandbox just as it would against GitHub.

`POST /_sandbox/send-alert` makes the sandbox POST to any URL it is given; it is meant for loopback only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.sandbox._http import bad_request, json_body, sleep_unless_disconnected

logger = logging.getLogger(__name__)

KEYS_PATH = "/meta/public_keys/secret_scanning"
KEYS_FAILURES = frozenset({"500", "429", "nonjson", "wrongshape", "empty", "hang"})
# Long enough to outlast any sane client timeout; the sleep ends early when the client hangs up.
_HANG_S = 600.0
_SEND_TIMEOUT_S = 30.0


def build_alert(
    tokens: list[str], *, url: str | None, type_: str = "supermemory_api_key", source: str = "content"
) -> bytes:
    """The body GitHub sends: a compact JSON array of {"token", "type", "url", "source"}.

    `url=None` leaves the field out, as some reporters do; pass "" for an empty one.
    """
    entries: list[dict[str, str]] = []
    for token in tokens:
        entry = {"token": token, "type": type_}
        if url is not None:
            entry["url"] = url
        entry["source"] = source
        entries.append(entry)
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _identifier_for(private_key: EllipticCurvePrivateKey) -> str:
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _new_private_key() -> EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class _SigningKey:
    identifier: str
    private_key: EllipticCurvePrivateKey
    is_current: bool

    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )


def _etag_matches(if_none_match: str, etag: str) -> bool:
    # If-None-Match uses the weak comparison (RFC 9110 §13.1.2), so a W/ prefix still matches.
    return any(
        candidate == "*" or candidate.removeprefix("W/") == etag
        for candidate in (part.strip() for part in if_none_match.split(","))
    )


class GitHubSandbox:
    """Signing keys, the keys-endpoint knob and counters behind one Starlette app; safe to drive from a
    test thread while uvicorn serves the app from another."""

    def __init__(
        self, key_identifier: str | None = None, private_key: EllipticCurvePrivateKey | None = None
    ) -> None:
        private_key = private_key if private_key is not None else _new_private_key()
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("GitHub signs with ECDSA P-256; the private key must be on SECP256R1")
        self._lock = threading.Lock()
        self._keys = [_SigningKey(key_identifier or _identifier_for(private_key), private_key, True)]
        self._keys_failure: str | None = None
        self.key_fetches = 0
        self.conditional_hits = 0
        self.alerts_sent = 0

    @property
    def keys_failure(self) -> str | None:
        return self._keys_failure

    @keys_failure.setter
    def keys_failure(self, mode: str | None) -> None:
        if mode is not None and mode not in KEYS_FAILURES:
            raise ValueError(f"keys_failure must be null or one of {sorted(KEYS_FAILURES)}")
        self._keys_failure = mode

    @property
    def key_identifier(self) -> str:
        """The identifier of the current key, the one alerts are signed with."""
        with self._lock:
            return self._current().identifier

    def _current(self) -> _SigningKey:
        return next(key for key in self._keys if key.is_current)

    def public_keys_document(self) -> dict[str, Any]:
        """What the keys endpoint serves when healthy."""
        with self._lock:
            return {
                "public_keys": [
                    {"key_identifier": key.identifier, "key": key.public_pem(), "is_current": key.is_current}
                    for key in self._keys
                ]
            }

    def sign(self, body: bytes) -> str:
        """Base64 of the DER ECDSA-SHA256 signature over the exact bytes, with the current key."""
        with self._lock:
            private_key = self._current().private_key
        return base64.b64encode(private_key.sign(body, ec.ECDSA(hashes.SHA256()))).decode("ascii")

    def rotate(self, keep_old: bool = True) -> str:
        """A new current key; the old ones stay listed (is_current false) unless keep_old is false,
        since GitHub keeps serving a retired key while alerts signed with it may still be in flight.
        Returns the new identifier."""
        private_key = _new_private_key()
        new = _SigningKey(_identifier_for(private_key), private_key, True)
        with self._lock:
            for key in self._keys:
                key.is_current = False
            self._keys = [*self._keys, new] if keep_old else [new]
        logger.info(
            "sandbox github: rotated to key %s (old keys %s)",
            new.identifier,
            "kept" if keep_old else "dropped",
        )
        return new.identifier

    def replace_key_material(self) -> None:
        """New key material under the current identifier: what the service must flag to on-call as a
        known identifier whose key changed."""
        with self._lock:
            current = self._current()
            current.private_key = _new_private_key()
        logger.info("sandbox github: replaced the key material of %s", current.identifier)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "key_fetches": self.key_fetches,
                "conditional_hits": self.conditional_hits,
                "alerts_sent": self.alerts_sent,
                "keys_failure": self._keys_failure,
                "key_identifier": self._current().identifier,
                "key_identifiers": [key.identifier for key in self._keys],
            }

    async def send_alert(
        self,
        target: str,
        tokens: list[str],
        *,
        url: str | None,
        type_: str = "supermemory_api_key",
        source: str = "content",
    ) -> httpx.Response:
        """Sign and POST an alert the way GitHub does; the caller gets the target's answer as is."""
        body = build_alert(tokens, url=url, type_=type_, source=source)
        with self._lock:
            identifier = self._current().identifier
        headers = {
            "Github-Public-Key-Identifier": identifier,
            "Github-Public-Key-Signature": self.sign(body),
            "Content-Type": "application/json",
        }
        async with httpx.AsyncClient(timeout=_SEND_TIMEOUT_S) as client:
            response = await client.post(target, content=body, headers=headers)
        with self._lock:
            self.alerts_sent += 1
        logger.info(
            "sandbox github: sent an alert with %d token(s) to %s: %d",
            len(tokens),
            target,
            response.status_code,
        )
        return response

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(KEYS_PATH, self._keys_endpoint, methods=["GET"]),
                Route("/_sandbox/send-alert", self._send_alert_endpoint, methods=["POST"]),
                Route("/_sandbox/knobs", self._knobs_endpoint, methods=["GET", "POST"]),
                Route("/_sandbox/rotate", self._rotate_endpoint, methods=["POST"]),
                Route("/_sandbox/replace-key-material", self._replace_endpoint, methods=["POST"]),
                Route("/_sandbox/stats", self._stats_endpoint, methods=["GET"]),
            ]
        )

    async def _keys_endpoint(self, request: Request) -> Response:
        with self._lock:
            self.key_fetches += 1
            failure = self._keys_failure
            identifiers = [key.identifier for key in self._keys]
        if failure is not None:
            logger.info("sandbox github: keys fetch answered with failure mode %r", failure)
        if failure == "hang":
            await sleep_unless_disconnected(request, _HANG_S)
            return JSONResponse({"message": "Server Error"}, status_code=504)
        if failure == "500":
            return JSONResponse({"message": "Server Error"}, status_code=500)
        if failure == "429":
            return JSONResponse(
                {"message": "API rate limit exceeded"},
                status_code=429,
                headers={"Retry-After": "1", "X-RateLimit-Remaining": "0"},
            )
        if failure == "nonjson":
            return PlainTextResponse("<!DOCTYPE html><title>Unicorn!</title>", media_type="text/html")
        if failure == "wrongshape":
            # Identifiers without key material: a parser that trusts each entry's shape falls over.
            return JSONResponse(
                {"public_keys": [{"key_identifier": i, "is_current": True} for i in identifiers]}
            )
        if failure == "empty":
            return JSONResponse({"public_keys": []})

        body = json.dumps(self.public_keys_document(), separators=(",", ":")).encode("utf-8")
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        if _etag_matches(request.headers.get("if-none-match", ""), etag):
            with self._lock:
                self.conditional_hits += 1
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag})

    async def _send_alert_endpoint(self, request: Request) -> Response:
        try:
            payload = await json_body(request)
            if not isinstance(payload, dict):
                raise ValueError("expected a JSON object")
            target = payload.get("target")
            tokens = payload.get("tokens")
            url = payload.get("url")
            type_ = payload.get("type", "supermemory_api_key")
            source = payload.get("source", "content")
            if not isinstance(target, str) or not target.startswith(("http://", "https://")):
                raise ValueError("target must be an http(s) URL")
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError("tokens must be a list of strings")
            if not (url is None or isinstance(url, str)):
                raise ValueError("url must be a string or null")
            if not isinstance(type_, str) or not isinstance(source, str):
                raise ValueError("type and source must be strings")
        except ValueError as exc:
            return bad_request(str(exc))
        try:
            response = await self.send_alert(target, tokens, url=url, type_=type_, source=source)
        except httpx.HTTPError as exc:
            return JSONResponse(
                {"error": "Bad Gateway", "message": f"could not reach {target}: {exc!r}"}, status_code=502
            )
        try:
            answer: Any = response.json()
        except ValueError:
            answer = response.text
        return JSONResponse({"status": response.status_code, "body": answer})

    async def _knobs_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                payload = await json_body(request)
                if not isinstance(payload, dict) or set(payload) - {"keys_failure"}:
                    raise ValueError(
                        'expected {"keys_failure": null | "' + '" | "'.join(sorted(KEYS_FAILURES)) + '"}'
                    )
                if "keys_failure" in payload:
                    self.keys_failure = payload["keys_failure"]
            except ValueError as exc:
                return bad_request(str(exc))
        return JSONResponse({"keys_failure": self.keys_failure})

    async def _rotate_endpoint(self, request: Request) -> Response:
        keep_old = True
        if await request.body():
            try:
                payload = await json_body(request)
                if not isinstance(payload, dict) or not isinstance(payload.get("keep_old", True), bool):
                    raise ValueError('expected {"keep_old": true | false}')
            except ValueError as exc:
                return bad_request(str(exc))
            keep_old = payload.get("keep_old", True)
        return JSONResponse({"key_identifier": self.rotate(keep_old=keep_old)})

    async def _replace_endpoint(self, _request: Request) -> Response:
        self.replace_key_material()
        return JSONResponse({"key_identifier": self.key_identifier})

    async def _stats_endpoint(self, _request: Request) -> Response:
        return JSONResponse(self.stats())
