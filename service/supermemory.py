"""The three Supermemory calls (contract.md §6): lookup and revoke on the admin API, the probe on
the public one.

Each call returns a classified outcome instead of raising transport details at the pipeline: the
pipeline decides what to retry and when, this module only says what happened, with a reason code.
One shared connection pool and one semaphore bound what we send, so a 10,000-token alert cannot
open 10,000 sockets to the provider.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from service.reasons import Reason

LOOKUP_BATCH = 100
_CONNECTIONS_PER_POOL = 8


class ProbeVerdict(enum.StrEnum):
    DEAD = "dead"
    ALIVE = "alive"
    INCONCLUSIVE = "inconclusive"


class CallFailed(Exception):
    """A lookup or revoke that did not get an answer we can act on. Never carries a token."""

    def __init__(self, reason: Reason, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}" + (f" (HTTP {status})" if status else ""))
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_hash: str
    id: str
    org_id: str
    name: str
    enabled: bool
    recipients: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class Probe:
    verdict: ProbeVerdict
    reason: Reason
    status: int | None = None
    retry_after: float | None = None


class RevokeResult(enum.StrEnum):
    REVOKED = "revoked"
    ALREADY_GONE = "already_gone"


_QUOTA_WORDS = ("rate limit", "rate-limit", "ratelimit", "quota", "too many")


class SupermemoryClient:
    def __init__(
        self,
        *,
        api_url: str,
        admin_url: str,
        admin_token: str,
        timeout: float,
        concurrency: int,
        lookup_path: str = "/v3/admin/api-keys/lookup",
        revoke_path: str = "/v3/auth/scoped-key/{id}",
        probe_path: str = "/v3/session",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._admin_url = admin_url.rstrip("/")
        self._admin_headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._lookup_path = lookup_path
        self._revoke_path = revoke_path
        self._probe_path = probe_path
        self._slots = asyncio.Semaphore(concurrency)
        # httpcore's pool checks every idle connection on every request it assigns, so one pool of
        # 32 connections spends more CPU on bookkeeping than on HTTP. Small pools in turn keep that
        # scan short: a 1,000-key alert took 12.2 s of CPU with one pool of 32 and 3.6 s with 4 of 8.
        shards = -(-concurrency // _CONNECTIONS_PER_POOL)
        per_pool = -(-concurrency // shards)
        self._pools = [
            httpx.AsyncClient(
                timeout=timeout,
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                transport=transport,
                follow_redirects=False,
                headers={"User-Agent": "leak-responder"},
            )
            for _ in range(shards)
        ]
        self._next_pool = itertools.cycle(self._pools)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with self._slots:
            try:
                return await next(self._next_pool).request(method, url, **kwargs)
            except httpx.TimeoutException:
                raise CallFailed(Reason.TIMEOUT) from None
            except httpx.TransportError:
                raise CallFailed(Reason.CONNECTION_ERROR) from None
            except httpx.RequestError:
                # An answer that arrived but cannot be read (a bad Content-Encoding, a redirect loop).
                raise CallFailed(Reason.BAD_RESPONSE) from None

    async def lookup(self, hashes: Sequence[str]) -> dict[str, KeyInfo]:
        """Which of these hashes are Supermemory keys. A hash absent from the answer is not one."""
        if len(hashes) > LOOKUP_BATCH:
            raise ValueError(f"at most {LOOKUP_BATCH} hashes per lookup")
        response = await self._send(
            "POST",
            self._admin_url + self._lookup_path,
            json={"keyHashes": list(hashes)},
            headers=self._admin_headers,
        )
        _raise_for_admin(response)
        try:
            found: dict[str, KeyInfo] = {}
            for key in response.json()["keys"]:
                owner = key.get("owner") or {}
                recipients = []
                if owner.get("email"):
                    recipients.append(
                        {"email": owner["email"], "name": owner.get("name") or "", "role": "owner"}
                    )
                recipients += [{"email": e, "name": "", "role": "notify"} for e in key.get("notify") or []]
                found[key["keyHash"]] = KeyInfo(
                    key_hash=key["keyHash"],
                    id=str(key["id"]),
                    org_id=str(key.get("orgId") or ""),
                    name=str(key.get("name") or ""),
                    enabled=bool(key.get("enabled", True)),
                    recipients=recipients,
                )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CallFailed(Reason.BAD_RESPONSE, response.status_code) from None
        return {h: found[h] for h in hashes if h in found}

    async def revoke(self, key_id: str) -> RevokeResult:
        """2xx and 404 both mean the key no longer exists upstream; the revoke is idempotent."""
        path = self._revoke_path.replace("{id}", quote(key_id, safe=""))
        response = await self._send("DELETE", self._admin_url + path, headers=self._admin_headers)
        if response.status_code == 404:
            return RevokeResult.ALREADY_GONE
        _raise_for_admin(response)
        return RevokeResult.REVOKED

    async def probe(self, token: str) -> Probe:
        """Ask the public API whether the leaked key still works. Only a 401 proves it does not."""
        try:
            response = await self._send(
                "GET", self._api_url + self._probe_path, headers={"Authorization": f"Bearer {token}"}
            )
        except CallFailed as exc:
            return Probe(ProbeVerdict.INCONCLUSIVE, Reason(f"probe_{exc.reason}"))
        status = response.status_code
        if status == 401:
            if any(word in response.text.lower() for word in _QUOTA_WORDS):
                return Probe(
                    ProbeVerdict.INCONCLUSIVE, Reason.PROBE_RATE_LIMITED, status, _retry_after(response)
                )
            return Probe(ProbeVerdict.DEAD, Reason.PROBE_UNAUTHORIZED, status)
        if 200 <= status < 300 or status in (402, 403):
            return Probe(ProbeVerdict.ALIVE, Reason.PROBE_KEY_ALIVE, status)
        if status == 429:
            return Probe(ProbeVerdict.INCONCLUSIVE, Reason.PROBE_RATE_LIMITED, status, _retry_after(response))
        if status >= 500:
            return Probe(ProbeVerdict.INCONCLUSIVE, Reason.PROBE_SERVER_ERROR, status)
        return Probe(ProbeVerdict.INCONCLUSIVE, Reason.PROBE_UNEXPECTED_STATUS, status)


def _raise_for_admin(response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        raise CallFailed(Reason.ADMIN_UNAUTHORIZED, status)
    if status == 429:
        raise CallFailed(Reason.RATE_LIMITED, status, _retry_after(response))
    if status >= 500:
        raise CallFailed(Reason.SERVER_ERROR, status)
    raise CallFailed(Reason.BAD_RESPONSE, status)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
