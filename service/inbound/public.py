"""Public reports in: anyone who finds a leaked key may send it, without authentication.

That is safe because whoever holds a leaked key can only help by having it revoked, and it is only
safe if the endpoint tells the sender nothing: the answer is one and the same whatever the text held
(see `docs/public-reports.md`). So this module refuses only on what the sender already knows (its
rate, the body's size and type, how many keys it pasted), and everything else becomes keys to hand
to the intake, found by the same detector as every other report, in every encoding it knows.

Limits come before any work: a client's rate and everyone's, kept by the store (one bucket row each
on PostgreSQL, shared by the replicas). A client is its address, or the `X-Forwarded-For` hop that
the trusted proxies name; it reaches the store only as a keyed hash whose key changes every day.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from service.detection import Finding, scan_text
from service.inbound.body import BodyBudget
from service.reasons import Reason
from service.refusal import Refusal
from service.store import RateBucket, Store
from service.tokens import KEY_SHAPE

PUBLIC = "public"
REPORT_LIMIT = 64 * 1024
URL_LIMIT = 2048
MEDIA_TYPES = ("text/plain", "application/json")
# How often the keyed hash that names clients changes: rows and memory never hold a name that can be
# matched against another day's, and a bucket lives far shorter than this anyway.
ROTATE_SECONDS = 86400.0
GLOBAL_BUCKET = "global"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Nothing here depends on whether a key is live: the sender knows each of these already.
STATUS: dict[Reason, int] = {
    Reason.PUBLIC_RATE_LIMITED: 429,
    Reason.PUBLIC_GLOBAL_RATE_LIMITED: 429,
    Reason.PUBLIC_REPORT_TOO_LARGE: 413,
    Reason.PUBLIC_REPORT_TOO_MANY_KEYS: 413,
    Reason.PUBLIC_REPORT_UNSUPPORTED_TYPE: 415,
    # Bodies being received, everyone's together, hold their budget: as the sender's retry.
    Reason.BODY_BUDGET_FULL: 503,
}


class PublicError(Refusal):
    STATUS = STATUS


@dataclass(frozen=True, slots=True)
class PublicReport:
    """The distinct keys a report held, in order of first appearance, and the URL it named, if that
    URL was a usable http(s) URL holding no key of its own (a key in a URL would be stored in clear
    with the sighting; the key itself is among `findings`)."""

    findings: list[Finding]
    url: str | None


# -- who is asking ---------------------------------------------------------------------------------


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str:
    """The client a request counts against: the peer, unless the peer is a trusted proxy, in which
    case the `X-Forwarded-For` hop it appended, and so on right to left while the hop is trusted too.

    Only hops appended by trusted proxies are believed: everything left of the first untrusted hop
    was written by the client and could be anything. An IPv6 client is its /64, the block one
    subscriber is usually given, or it could take a fresh address for every request.
    """
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    current = peer or "unknown"
    while hops and is_trusted(current, trusted):
        current = hops.pop()
    return _as_client(current)


def requester(connection: HTTPConnection, trusted: Sequence[Network]) -> str:
    """`client_address` of a request as it came in: every limit kept per client (public reports,
    console sign-ins) names the client this one way, so a proxy in front never makes all its clients
    one, and a client never escapes a limit by writing its own `X-Forwarded-For`."""
    peer = connection.client.host if connection.client else None
    return client_address(peer, connection.headers.getlist("x-forwarded-for"), trusted)


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def is_trusted(address: str | None, trusted: Sequence[Network]) -> bool:
    """Whether `address` is one of the proxies whose forwarding headers are believed."""
    if address is None:
        return False
    ip = _parse_ip(address)
    return ip is not None and any(ip in network for network in trusted)


def _as_client(address: str) -> str:
    ip = _parse_ip(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip) if ip is not None else address


class ClientNames:
    """Names for clients that the store may hold: an HMAC of the address under a key derived from the
    data key (shared by replicas, so they name a client alike) and the day, so a name cannot be
    matched with the next day's and a leaked table says nothing without the data key."""

    def __init__(self, data_key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._secret = hmac.new(data_key, b"leak-responder public report clients", hashlib.sha256).digest()
        self._clock = clock

    def name(self, client: str) -> str:
        day = int(self._clock() // ROTATE_SECONDS)
        digest = hmac.new(self._secret, f"{day}\n{client}".encode(), hashlib.sha256).hexdigest()
        return f"client:{digest[:32]}"


class PublicLimits:
    """A client's rate, then everyone's: a request over either is refused before any other work."""

    def __init__(
        self,
        store: Store,
        names: ClientNames,
        per_client: tuple[int, float],
        everyone: tuple[int, float],
    ) -> None:
        self._store = store
        self._names = names
        self._per_client = per_client
        self._everyone = everyone

    async def take(self, client: str) -> None:
        """Count one request of `client`; PublicError(429, Retry-After) when it is over a limit.
        A StoreError (the buckets could not be read) goes to the caller: it is our fault, a 503."""
        buckets = [
            RateBucket(self._names.name(client), *self._per_client),
            RateBucket(GLOBAL_BUCKET, *self._everyone),
        ]
        refusal = await self._store.take_rates(buckets)
        if refusal is None:
            return
        headers = {"Retry-After": str(max(1, math.ceil(refusal.retry_after)))}
        if refusal.bucket == 0:
            raise PublicError(Reason.PUBLIC_RATE_LIMITED, "too many reports from this client", headers)
        raise PublicError(
            Reason.PUBLIC_GLOBAL_RATE_LIMITED, "too many reports from everyone just now", headers
        )


# -- what was sent ---------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise PublicError(
            Reason.PUBLIC_REPORT_UNSUPPORTED_TYPE,
            'send text/plain, or application/json as {"text": "…", "url": "…"}',
        )
    return media


async def read_public(chunks: AsyncIterator[bytes], headers: Mapping[str, str], budget: BodyBudget) -> bytes:
    """The body under 64 KiB, counted on the bytes received, and within the budget that every
    route's bodies share (see `BodyBudget`): a crowd of slow anonymous uploads holds no more memory
    than a crowd of slow alerts."""
    too_large = PublicError(Reason.PUBLIC_REPORT_TOO_LARGE, f"a report may hold at most {REPORT_LIMIT} bytes")
    return await budget.read_as(chunks, headers, REPORT_LIMIT, too_large)


def parse_public(body: bytes, media: str, max_keys: int) -> PublicReport:
    """Keys and URL of a report. Lenient on purpose, as anything refused here could be a leaked key
    left alive: bytes that are not UTF-8 are replaced, and JSON that is not `{"text", "url"}` (or is
    not JSON) is scanned as the text it is. Refused only past `max_keys` distinct keys, which bounds
    the lookups one report can cause; the sender can split the paste."""
    text = body.decode("utf-8", errors="replace")
    url: str | None = None
    if media == "application/json":
        text, url = _json_fields(text)
    elif text.startswith("url=") and "\r\ntext=" in text:
        # A browser form posting as text/plain (the /report page): "url=…\r\ntext=…\r\n". The URL
        # field comes first because an input of type url cannot hold a line break.
        first, _, rest = text.partition("\r\n")
        url, text = first.removeprefix("url="), rest.removeprefix("text=")
    in_url = scan_text(url) if url else []
    findings = _distinct([*scan_text(text), *in_url])
    if len(findings) > max_keys:
        raise PublicError(
            Reason.PUBLIC_REPORT_TOO_MANY_KEYS,
            f"a report may hold at most {max_keys} keys; send the rest in further reports",
        )
    keep_url = url is not None and not in_url and KEY_SHAPE.search(url) is None and _usable_url(url)
    return PublicReport(findings, url if keep_url else None)


def _json_fields(text: str) -> tuple[str, str | None]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return text, None
    if not isinstance(document, dict) or not isinstance(document.get("text"), str):
        return text, None
    url = document.get("url")
    return document["text"], url if isinstance(url, str) else None


def _usable_url(url: str) -> bool:
    """An http(s) URL with a host, of sane length and no whitespace or control characters: it goes to
    the owner's email, so it must at least be a link and not a paragraph."""
    if not url or len(url) > URL_LIMIT or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _distinct(findings: Iterable[Finding]) -> list[Finding]:
    seen: dict[str, Finding] = {}
    for finding in findings:
        seen.setdefault(finding.token_hash, finding)
    return list(seen.values())
