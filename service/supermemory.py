"""The three Supermemory calls (contract.md §6): lookup and revoke on the admin API, the probe on
the public one.

Each call returns a classified outcome instead of raising transport details at the pipeline: the
pipeline decides what to retry and when, this module only says what happened, with a reason code.
One shared connection pool and one semaphore bound what we send, so a 10,000-token alert cannot
open 10,000 sockets to the provider. The calls go through a lean HTTP/1.1 client of our own
(service.http1): with httpx, the lookups cost a fifth of the ack path's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import enum
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from service.backoff import retry_after
from service.http1 import Answer, HttpClient, HttpFailure
from service.reasons import Reason
from service.store.models import ChannelSpec, ChannelType

LOOKUP_BATCH = 100


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
    # Optional facts of the second release's lookup; None or empty when the admin API omits them.
    created_at: float | None = None
    last_used_at: float | None = None
    org_name: str | None = None
    channels: list[ChannelSpec] = field(default_factory=list)
    # Optional fields that were present but unusable, ignored: (reason, field path), never a value.
    problems: list[tuple[Reason, str]] = field(default_factory=list)


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

LookupCall = Callable[[list[str]], Awaitable[dict[str, KeyInfo]]]
# Hashes asked of the Coalescer: each chunk (one call carries it whole) and the future of its answer.
Asked = list[tuple[list[str], "asyncio.Future[dict[str, KeyInfo]]"]]


class Coalescer:
    """Shares lookup calls among concurrent callers: one call carries up to `batch` hashes of
    whoever asked while the previous call was in flight.

    In a burst (a new token pattern backfilled over all of a host, a repository forked a thousand
    times) every alert would otherwise cost the admin API one call. Rules:

    - nothing in flight: a call starts at once, so a lone alert waits for nothing; it leaves in the
      next turn of the event loop, carrying every hash asked in the turn that started it;
    - a call in flight: hashes queue, and the queue goes out as one call when it ends;
    - a full batch queued: it goes out beside the calls in flight (up to `parallel` of them), so a
      10,000-token alert is not serialised behind one call at a time.

    A caller's hashes travel in chunks of at most `batch`; a chunk is never split between calls, so
    a call that fails fails exactly the callers whose chunks it carried. A caller of one chunk (a
    small alert) goes ahead of the queued chunks of bigger ones: it rides the next call rather
    than wait behind a big alert's hundreds of calls.
    """

    def __init__(self, call: LookupCall, *, batch: int = LOOKUP_BATCH, parallel: int = 8) -> None:
        self._call = call
        self._batch = batch
        self._parallel = parallel
        self._queue: collections.deque[tuple[list[str], asyncio.Future[dict[str, KeyInfo]]]]
        self._queue = collections.deque()
        # Chunks of one-chunk callers, served before `_queue`.
        self._ahead: collections.deque[tuple[list[str], asyncio.Future[dict[str, KeyInfo]]]]
        self._ahead = collections.deque()
        self._queued = 0
        self._inflight = 0
        # Calls started whose task has not run yet, so has not taken its chunks (see `_dispatch`).
        self._starting = 0
        # Each call's task and the chunks it carries now (none once it is done with them, None
        # until it takes them); strong references too, as the event loop keeps only weak ones to
        # running tasks.
        self._calls: dict[asyncio.Task[None], Asked | None] = {}

    def ask(self, hashes: Sequence[str]) -> Asked:
        """Queue these hashes, in chunks, for the calls to come, without waiting: the caller awaits
        each chunk's future in its own task (every task between a call's answer and its caller
        is one more turn of the event loop). Cancelling a future gives its chunk up: a chunk
        still queued then leaves the queue, one in flight has its answer dropped."""
        loop = asyncio.get_running_loop()
        asked: Asked = []
        queue = self._ahead if len(hashes) <= self._batch else self._queue
        for start in range(0, len(hashes), self._batch):
            chunk = list(hashes[start : start + self._batch])
            future: asyncio.Future[dict[str, KeyInfo]] = loop.create_future()
            queue.append((chunk, future))
            self._queued += len(chunk)
            asked.append((chunk, future))
        self._dispatch()
        return asked

    async def lookup(self, hashes: Sequence[str]) -> dict[str, KeyInfo]:
        """Which of these hashes are keys; CallFailed if a call carrying any of them failed."""
        asked = self.ask(hashes)
        found: dict[str, KeyInfo] = {}
        try:
            for _, future in asked:
                found |= await future
        finally:
            give_up(asked)
        return found

    def _dispatch(self) -> None:
        """Start calls for what is queued, as many as the rules allow, each in a task of its own.

        A call takes its chunks when its task first runs, in the next turn of the event loop (the
        turn it left in before): it carries everything asked in the turn that started it. Under
        load a turn resumes dozens of requests that ask one after another, and the first of them
        went alone, the others waiting for its answer before theirs could leave."""
        while self._inflight < self._parallel:
            # What is queued beyond what the calls about to start will take.
            free = self._queued - self._batch * self._starting
            if free <= 0 or (self._inflight and free < self._batch):
                return
            self._inflight += 1
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._send())
            self._calls[task] = None
            task.add_done_callback(self._sent)

    def _next_group(self) -> Asked | None:
        """The chunks the next call may carry now (empty if every one taken was given up), or None
        when no call may start: nothing queued, or a call in flight and less than a batch queued."""
        if not (self._ahead or self._queue) or (self._inflight and self._queued < self._batch):
            return None
        return self._take()

    def _take(self) -> Asked:
        """Up to a batch of queued chunks, small callers' first (those given up are dropped)."""
        group: Asked = []
        size = 0
        for queue in (self._ahead, self._queue):
            while queue and size + len(queue[0][0]) <= self._batch:
                chunk, future = queue.popleft()
                self._queued -= len(chunk)
                if not future.done():
                    group.append((chunk, future))
                    size += len(chunk)
        return group

    async def _send(self) -> None:
        """One call, then, in the same task, the next one for what queued meanwhile: that call
        leaves in the turn of the event loop that read this one's answer. Through this task's end
        and a new task's start it left two turns later, a wait every queued caller had, each turn
        under load a round of every request's ready work."""
        task = asyncio.current_task()
        assert task is not None
        self._starting -= 1
        group = self._take()
        self._calls[task] = group
        if not group:
            self._inflight -= 1  # every chunk it would have carried was given up
        while group:
            try:
                found = await self._call(list(dict.fromkeys(h for chunk, _ in group for h in chunk)))
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for chunk, future in group:
                    if not future.done():
                        future.set_result({h: found[h] for h in chunk if h in found})
            self._inflight -= 1
            group = self._next_group() or []
            if group:
                self._inflight += 1
            self._calls[task] = group
            self._dispatch()  # full batches beside it, as ever

    def _sent(self, task: asyncio.Task[None]) -> None:
        """A callback rather than a `finally`, so that it also runs for a call cancelled before it
        started: the chunks stay queued for the next call. The callers of the chunks a cancelled
        call carried hear CancelledError instead of waiting forever, and the queue goes on."""
        group = self._calls.pop(task)
        if group is None:
            # Cancelled before it took any chunk: they are still queued, for the next call.
            self._starting -= 1
            self._inflight -= 1
        elif group:
            for _, future in group:
                future.cancel()
            self._inflight -= 1
        self._dispatch()


def give_up(asked: Asked) -> None:
    """Cancel what is not answered yet (see `Coalescer.ask`); an answered chunk's failure counts as
    retrieved, so that a chunk's failure after its caller gave up is not "never retrieved"."""
    for _, future in asked:
        if not future.cancel() and not future.cancelled():
            future.exception()


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
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._admin_url = admin_url.rstrip("/")
        self._admin_headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._lookup_path = lookup_path
        self._revoke_path = revoke_path
        self._probe_path = probe_path
        self._slots = asyncio.Semaphore(concurrency)
        self._http = HttpClient(timeout=timeout, connections=concurrency, user_agent="leak-responder")
        self._lookups = Coalescer(self._lookup_call, parallel=concurrency)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        async with self._slots:
            try:
                return await self._http.request(method, url, headers, body)
            except HttpFailure as exc:
                # Timeout, connection error, or an answer that arrived but cannot be read.
                raise CallFailed(exc.reason) from None

    async def lookup(self, hashes: Sequence[str]) -> dict[str, KeyInfo]:
        """Which of these hashes are Supermemory keys. A hash absent from the answer is not one.

        Concurrent callers share calls (see `Coalescer`); CallFailed when a call carrying any of
        these hashes failed.
        """
        return await self._lookups.lookup(hashes)

    def ask(self, hashes: Sequence[str]) -> Asked:
        """`lookup` without waiting: each chunk's future (see `Coalescer.ask`)."""
        return self._lookups.ask(hashes)

    async def _lookup_call(self, hashes: list[str]) -> dict[str, KeyInfo]:
        """One admin call; the Coalescer never hands it more than LOOKUP_BATCH hashes."""
        response = await self._send(
            "POST",
            self._admin_url + self._lookup_path,
            {**self._admin_headers, "Content-Type": "application/json"},
            json.dumps({"keyHashes": hashes}, separators=(",", ":")).encode(),
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
                extra = _Optional(key)
                found[key["keyHash"]] = KeyInfo(
                    key_hash=key["keyHash"],
                    id=str(key["id"]),
                    org_id=str(key.get("orgId") or ""),
                    name=str(key.get("name") or ""),
                    enabled=bool(key.get("enabled", True)),
                    recipients=recipients + extra.admins,
                    created_at=extra.instant("createdAt"),
                    last_used_at=extra.instant("lastUsedAt"),
                    org_name=extra.org_name,
                    channels=extra.channels,
                    problems=extra.problems,
                )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CallFailed(Reason.BAD_RESPONSE, response.status_code) from None
        return {h: found[h] for h in hashes if h in found}

    async def revoke(self, key_id: str) -> RevokeResult:
        """2xx and 404 both mean the key no longer exists upstream; the revoke is idempotent."""
        path = self._revoke_path.replace("{id}", quote(key_id, safe=""))
        response = await self._send("DELETE", self._admin_url + path, self._admin_headers)
        if response.status_code == 404:
            return RevokeResult.ALREADY_GONE
        _raise_for_admin(response)
        return RevokeResult.REVOKED

    async def probe(self, token: str) -> Probe:
        """Ask the public API whether the leaked key still works. Only a 401 proves it does not."""
        try:
            response = await self._send(
                "GET", self._api_url + self._probe_path, {"Authorization": f"Bearer {token}"}
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


_WHSEC = "whsec_"


class _Optional:
    """The lookup's optional fields of one key, each read on its own: one that is present but
    unusable is left out and noted in `problems`, and never costs the key its revoke or its email
    (an admin API of an older release omits them all, which is no problem at all)."""

    def __init__(self, key: dict[str, Any]) -> None:
        self._key = key
        self.problems: list[tuple[Reason, str]] = []
        self.org_name: str | None = None
        self.admins: list[dict[str, str]] = []
        self.channels: list[ChannelSpec] = []
        org = key.get("org")
        if org is None:
            return
        if not isinstance(org, dict):
            self._bad(Reason.LOOKUP_FIELD_MALFORMED, "org")
            return
        name = org.get("name")
        if isinstance(name, str):
            self.org_name = name
        elif name is not None:
            self._bad(Reason.LOOKUP_FIELD_MALFORMED, "org.name")
        self._read_admins(org.get("admins"))
        self._read_channels(org.get("channels"))

    def _bad(self, reason: Reason, path: str) -> None:
        self.problems.append((reason, path))

    def instant(self, name: str) -> float | None:
        """An RFC 3339 time (with its offset, as RFC 3339 requires), or null."""
        value = self._key.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                return parsed.timestamp()
        self._bad(Reason.LOOKUP_FIELD_MALFORMED, name)
        return None

    def _read_admins(self, admins: object) -> None:
        if admins is None:
            return
        if not isinstance(admins, list):
            self._bad(Reason.LOOKUP_FIELD_MALFORMED, "org.admins")
            return
        for i, admin in enumerate(admins):
            address = admin.get("email") if isinstance(admin, dict) else None
            name = admin.get("name") if isinstance(admin, dict) else None
            if not isinstance(address, str) or not address or not isinstance(name, str | None):
                self._bad(Reason.LOOKUP_FIELD_MALFORMED, f"org.admins[{i}]")
                continue
            self.admins.append({"email": address, "name": name or "", "role": "admin"})

    def _read_channels(self, channels: object) -> None:
        if channels is None:
            return
        if not isinstance(channels, list):
            self._bad(Reason.CHANNEL_MALFORMED, "org.channels")
            return
        seen: set[str] = set()
        for i, channel in enumerate(channels):
            spec = _channel(channel)
            if spec is None or spec.id in seen:
                self._bad(Reason.CHANNEL_MALFORMED, f"org.channels[{i}]")
                continue
            seen.add(spec.id)
            self.channels.append(spec)


def _channel(value: object) -> ChannelSpec | None:
    """A channel with an id, a known type and a URL; a webhook also needs its `whsec_` secret."""
    if not isinstance(value, dict):
        return None
    channel_id, kind, url = value.get("id"), value.get("type"), value.get("url")
    if not isinstance(channel_id, str) or not channel_id or not isinstance(url, str) or not url:
        return None
    if kind == ChannelType.SLACK:
        return ChannelSpec(channel_id, ChannelType.SLACK, url)
    if kind != ChannelType.WEBHOOK:
        return None
    secret = value.get("secret")
    if not isinstance(secret, str) or not secret.startswith(_WHSEC):
        return None
    try:
        if not base64.b64decode(secret.removeprefix(_WHSEC), validate=True):
            return None
    except (binascii.Error, ValueError):
        return None
    return ChannelSpec(channel_id, ChannelType.WEBHOOK, url, secret)


def _raise_for_admin(response: Answer) -> None:
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


def _retry_after(response: Answer) -> float | None:
    return retry_after(response.headers.get("retry-after"))
