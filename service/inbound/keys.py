"""One reporter's verification keys, fetched from its keys URL and cached by identifier.

An alert must be verified within the partner's 15 s, and the keys endpoint (GitHub's API) is rate
limited and can be down. So: a cache hit never touches the network; an unknown identifier (a key
rotation) refetches, but with one fetch in flight at a time and one miss-triggered fetch a minute,
so a flood of forged identifiers cannot turn into a flood of requests; and a failed fetch never
throws away keys that worked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.inbound.reasons import InboundError
from service.inbound.reporters import Reporter
from service.reasons import Reason

logger = logging.getLogger("service.inbound")

EventHook = Callable[[Reason, dict[str, str]], None]

_DETAIL_MAX = 200


class _BadResponse(Exception):
    """A keys response that arrived but cannot be used; its message is the event's detail."""


class KeyCache:
    """Counters (`hits`, `misses`, `fetches`, `fetch_failures`) are plain ints for the metrics
    module to read; the HTTP client, with its timeouts, belongs to the caller."""

    def __init__(
        self,
        reporter: Reporter,
        client: httpx.AsyncClient,
        *,
        auth_token: str | None = None,
        refresh_interval: float = 3600.0,
        miss_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_event: EventHook | None = None,
    ) -> None:
        if not reporter.keys_url:
            raise ValueError(f"reporter {reporter.name} has no keys URL")
        self.reporter = reporter
        self._keys_url = reporter.keys_url
        self._client = client
        self._auth_token = auth_token
        self._refresh_interval = refresh_interval
        self._miss_interval = miss_interval
        self._clock = clock
        self._on_event = on_event
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._etag: str | None = None
        self._last_miss_fetch: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._timer: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0
        self.fetches = 0
        self.fetch_failures = 0

    @property
    def known(self) -> int:
        """How many verification keys are cached (what the console shows of the cache)."""
        return len(self._keys)

    async def get(self, identifier: str) -> ec.EllipticCurvePublicKey:
        key = self._keys.get(identifier)
        if key is not None:
            self.hits += 1
            return key
        self.misses += 1
        # Whether the reporter was asked since this request arrived: only its fresh answer can
        # say an identifier is unknown.
        asked = False
        if self._inflight is not None and not self._inflight.done():
            # A fetch already under way may well bring this key: wait for it rather than start one.
            await asyncio.shield(self._inflight)
            asked = True
        if identifier not in self._keys and self._miss_refetch_allowed():
            self._last_miss_fetch = self._clock()
            await self.refresh()
            asked = True
        key = self._keys.get(identifier)
        if key is not None:
            return key
        if not self._keys:
            raise InboundError(
                Reason.KEYS_UNAVAILABLE,
                f"{self.reporter.name} verification keys are unavailable, retry later",
            )
        if not asked:
            # Someone else's miss used the refetch a moment ago, perhaps before the reporter
            # published this key (a rotation). A 401 would lose a genuine alert for good, since
            # partners do not retry a 4xx; a 503 brings it back once a refetch is allowed.
            wait = self._miss_interval - (self._clock() - (self._last_miss_fetch or 0.0))
            raise InboundError(
                Reason.KEY_NOT_YET_FETCHED,
                "unknown public key identifier; the reporter's keys are refetched shortly, retry then",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        raise InboundError(Reason.KEY_UNKNOWN, "unknown public key identifier")

    async def refresh(self) -> bool:
        """Fetch once, or join the fetch in flight; True when that fetch succeeded (304 included).

        The fetch runs in its own task so that a caller giving up (a cancelled request) does not
        abort it for everyone waiting on it.
        """
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        return await asyncio.shield(self._inflight)

    def start(self) -> None:
        """Refresh now and then every `refresh_interval`; needs a running event loop."""
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def aclose(self) -> None:
        for task in (self._timer, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._timer = None

    def _miss_refetch_allowed(self) -> bool:
        return self._last_miss_fetch is None or self._clock() - self._last_miss_fetch >= self._miss_interval

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                # A bug here (or in the event hook) must not stop the timer for the life of the process.
                logger.exception(
                    "%s keys refresh crashed",
                    self.reporter.name,
                    extra={"reason": Reason.KEYS_FETCH_FAILED.value, "reporter": self.reporter.name},
                )
            await asyncio.sleep(self._refresh_interval)

    async def _fetch(self) -> bool:
        self.fetches += 1
        headers = {"Accept": "application/json"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        if self._auth_token:
            headers["Authorization"] = f"Bearer {self._auth_token}"
        try:
            response = await self._client.get(self._keys_url, headers=headers)
        except httpx.HTTPError as exc:
            return self._failed(Reason.KEYS_FETCH_FAILED, f"{type(exc).__name__}: {exc}")
        if response.status_code == 304 and self._keys:
            return True
        if not response.is_success:
            return self._failed(Reason.KEYS_FETCH_FAILED, f"HTTP {response.status_code}")
        try:
            keys = _parse_keys(response)
        except _BadResponse as exc:
            return self._failed(Reason.KEYS_BAD_RESPONSE, str(exc))
        self._warn_changed(keys)
        self._keys = keys
        self._etag = response.headers.get("etag")
        return True

    def _failed(self, reason: Reason, detail: str) -> bool:
        self.fetch_failures += 1
        detail = detail[:_DETAIL_MAX]
        logger.warning(
            "%s keys fetch failed: %s",
            self.reporter.name,
            detail,
            extra={"reason": reason.value, "reporter": self.reporter.name},
        )
        self._emit(reason, {"reporter": self.reporter.name, "detail": detail})
        return False

    def _warn_changed(self, fresh: dict[str, ec.EllipticCurvePublicKey]) -> None:
        """Same identifier, other key: either the reporter botched a rotation or someone is in its
        key distribution. We follow the reporter (it is the authority) but a human should look."""
        for identifier, key in fresh.items():
            old = self._keys.get(identifier)
            if old is None or _spki(old) == _spki(key):
                continue
            logger.warning(
                "%s signing key %s changed its key material",
                self.reporter.name,
                identifier,
                extra={"reason": Reason.SIGNING_KEY_CHANGED.value, "reporter": self.reporter.name},
            )
            self._emit(
                Reason.SIGNING_KEY_CHANGED,
                {"reporter": self.reporter.name, "key_identifier": identifier},
            )

    def _emit(self, reason: Reason, data: dict[str, str]) -> None:
        if self._on_event is not None:
            self._on_event(reason, data)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _parse_keys(response: httpx.Response) -> dict[str, ec.EllipticCurvePublicKey]:
    """Usable P-256 keys by identifier; entries we cannot use are skipped (a reporter may publish
    other curves one day), but a response with none usable is refused so the old keys stay."""
    try:
        document = response.json()
    except ValueError:
        raise _BadResponse("response is not JSON") from None
    entries = document.get("public_keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _BadResponse("response has no public_keys array")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        identifier, pem = entry.get("key_identifier"), entry.get("key")
        if not identifier or not isinstance(identifier, str) or not isinstance(pem, str):
            continue
        key = _load_p256(pem)
        if key is not None:
            keys[identifier] = key
    if not keys:
        raise _BadResponse(f"no usable P-256 key among {len(entries)} entries")
    return keys


def _load_p256(pem: str) -> ec.EllipticCurvePublicKey | None:
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None
