"""Who is signed in to the console, and whether a form really came from the console.

The session is a signed cookie, not a server-side row: replicas share nothing but the database and
the data key, and a signed cookie needs only the key. It holds the operator's name, a CSRF token,
an expiry and a tag of the operator's configured token hash, so that taking an operator out of
`LEAK_RESPONDER_OPERATOR_TOKENS` (or giving them a new token) ends their sessions at the next
request. Signing out clears the cookie; a copy of it taken before stays valid until it expires,
which is why sessions are short (`SESSION_SECONDS`).

A form is accepted only when its Origin (or, lacking one, its Referer) is this service's own host
and its CSRF token is the session's. The sign-in form has a CSRF token too, from a signed
pre-session cookie, so that another site cannot sign a browser in under a token of its choosing.

Keys are derived from the data key (HMAC with a label per purpose), so no new secret has to be
configured, and a data key that changes signs everyone out.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from starlette.requests import Request
from starlette.responses import Response

from service.inbound.body import BodyBudget
from service.reasons import Reason
from service.refusal import Refusal

COOKIE = "leak_responder_console"
SESSION_SECONDS = 8 * 3600
# Long enough to read the sign-in page and paste a token, short enough not to linger.
SIGNIN_SECONDS = 3600
# Failed sign-ins allowed per client address in the window; past it, every sign-in is refused
# (even a right one) until the oldest failure leaves the window.
SIGNIN_FAILURES = 5
SIGNIN_WINDOW = 300.0
_CLIENTS_KEPT = 10_000


STATUS: dict[Reason, int] = {
    Reason.SIGNIN_RATE_LIMITED: 429,
    Reason.CSRF_INVALID: 403,
    Reason.ORIGIN_REFUSED: 403,
    Reason.SESSION_INVALID: 401,
    Reason.PASTE_INVALID: 400,
    Reason.FORM_INVALID: 400,
    Reason.BODY_BUDGET_FULL: 503,
}


class ConsoleError(Refusal):
    STATUS = STATUS


@dataclass(frozen=True, slots=True)
class Session:
    """`operator` is None before sign-in: the pre-session that carries the sign-in form's CSRF token."""

    operator: str | None
    csrf: str
    expires: float
    tag: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signs and reads session cookies, and seals the console's report pastes between its two steps."""

    def __init__(self, data_key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._sign_key = hmac.new(data_key, b"leak-responder console session", hashlib.sha256).digest()
        self._paste = AESGCM(hmac.new(data_key, b"leak-responder console paste", hashlib.sha256).digest())
        self._clock = clock

    def _tag(self, operator: str, digest: str) -> str:
        return hmac.new(self._sign_key, f"{operator}\0{digest}".encode(), hashlib.sha256).hexdigest()[:32]

    def anonymous(self) -> Session:
        return Session(None, secrets.token_urlsafe(24), self._clock() + SIGNIN_SECONDS, "")

    def signed_in(self, operator: str, operators: Mapping[str, str]) -> Session:
        """A fresh session (and CSRF token: the pre-session's is never reused after sign-in)."""
        return Session(
            operator,
            secrets.token_urlsafe(24),
            self._clock() + SESSION_SECONDS,
            self._tag(operator, operators[operator]),
        )

    def encode(self, session: Session) -> str:
        payload = _b64(
            json.dumps(
                {"o": session.operator, "c": session.csrf, "e": session.expires, "t": session.tag},
                separators=(",", ":"),
            ).encode()
        )
        signature = hmac.new(self._sign_key, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(signature)}"

    def decode(self, cookie: str | None, operators: Mapping[str, str]) -> Session | None:
        """The cookie's session, or None when there is none; ConsoleError(session_invalid) when a
        cookie is there but forged, expired, or of an operator whose token is no longer configured."""
        if not cookie:
            return None
        payload, _, signature = cookie.partition(".")
        try:
            expected = hmac.new(self._sign_key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(signature), expected):
                raise ConsoleError(Reason.SESSION_INVALID, "the session cookie is not this service's")
            fields = json.loads(_unb64(payload))
            session = Session(fields["o"], fields["c"], float(fields["e"]), fields["t"])
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConsoleError(Reason.SESSION_INVALID, "the session cookie is malformed") from None
        if session.expires < self._clock():
            raise ConsoleError(Reason.SESSION_INVALID, "the session has expired; sign in again")
        if session.operator is not None:
            digest = operators.get(session.operator)
            if digest is None or not hmac.compare_digest(session.tag, self._tag(session.operator, digest)):
                raise ConsoleError(Reason.SESSION_INVALID, "the operator's token has changed; sign in again")
        return session

    # -- the report form's paste, between "scan" and "report" --

    def seal_paste(self, paste: bytes, operator: str) -> str:
        """The paste, encrypted for the second step, so that no page ever holds it in clear; bound
        to the operator, so one operator's sealed paste cannot be submitted by another."""
        nonce = os.urandom(12)
        return _b64(nonce + self._paste.encrypt(nonce, paste, operator.encode()))

    def open_paste(self, sealed: str, operator: str) -> bytes:
        try:
            blob = _unb64(sealed)
            return self._paste.decrypt(blob[:12], blob[12:], operator.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise ConsoleError(Reason.PASTE_INVALID, "the scanned paste cannot be read back") from None


def set_cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=not loopback(request),
    )


def clear_cookie(response: Response, request: Request) -> None:
    secure = not loopback(request)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict", secure=secure)


def loopback(request: Request) -> bool:
    """Whether the browser reached us on a loopback address (a developer's `make run`), the one
    place where a cookie may go without Secure: there is no TLS there, and no network either."""
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_origin(request: Request) -> None:
    """A state-changing request must come from a page of this host. Origin is what browsers send
    on every POST; Referer stands in when a privacy setting removed Origin. Neither: refused.

    The host, not the scheme, is compared: behind a proxy that ends TLS the service sees http while
    the browser says https, and the host is what another site cannot fake in a browser.
    """
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        origin = request.headers.get("referer")
    if not origin:
        raise ConsoleError(Reason.ORIGIN_REFUSED, "the request has no Origin or Referer")
    claimed = urlsplit(origin).netloc.lower()
    own = request.headers.get("host", "").lower()
    if not claimed or not hmac.compare_digest(claimed, own):
        raise ConsoleError(Reason.ORIGIN_REFUSED, "the request comes from another site")


def check_csrf(session: Session | None, presented: str | None) -> None:
    if session is None or not presented or not hmac.compare_digest(session.csrf, presented):
        raise ConsoleError(Reason.CSRF_INVALID, "the form's CSRF token is missing or stale; reload")


async def read_form(request: Request, limit: int, budget: BodyBudget) -> dict[str, str]:
    """A urlencoded form (what the console's forms send), read under `limit` bytes and within the
    budget every route's bodies share (see `BodyBudget`): the sign-in form is read before anyone is
    known, so a crowd of slow sign-ins must hold no more memory than a crowd of slow alerts.

    Read here rather than by a multipart library: the console has no file upload, and a form that
    is not what its pages send is refused before anything is parsed.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise ConsoleError(Reason.FORM_INVALID, "the console's forms are sent urlencoded")
    invalid = ConsoleError(Reason.FORM_INVALID, f"the form is not UTF-8, or over {limit} bytes")
    body = await budget.read_as(request.stream(), request.headers, limit, invalid)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):  # ValueError: too many fields
        raise invalid from None
    return dict(pairs)


class SigninLimiter:
    """Failed sign-ins per client address (`requester`'s, so behind a trusted proxy the forwarded
    client), in memory: at most SIGNIN_FAILURES in SIGNIN_WINDOW.

    Per process: with several replicas an attacker gets that many tries per replica, which still
    makes guessing a 256-bit token hopeless; the limit is there to make noise and slow scripts.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def check(self, client: str) -> None:
        """ConsoleError(signin_rate_limited), with Retry-After, while `client` is over the limit."""
        now = self._clock()
        failures = self._failures.get(client)
        if failures is None:
            return
        while failures and failures[0] <= now - SIGNIN_WINDOW:
            failures.popleft()
        if len(failures) >= SIGNIN_FAILURES:
            wait = max(1, int(failures[0] + SIGNIN_WINDOW - now) + 1)
            raise ConsoleError(
                Reason.SIGNIN_RATE_LIMITED,
                f"too many failed sign-ins from this address; try again in {wait} s",
                {"Retry-After": str(wait)},
            )

    def failed(self, client: str) -> None:
        if len(self._failures) >= _CLIENTS_KEPT and client not in self._failures:
            # Forget the client whose last failure is oldest: a flood of addresses cannot grow this.
            oldest = min(self._failures, key=lambda c: self._failures[c][-1] if self._failures[c] else 0.0)
            del self._failures[oldest]
        self._failures.setdefault(client, collections.deque()).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
