"""A stand-in for Supermemory that implements the three calls of contract.md §6, with knobs for the ways the
real one can misbehave.

The service's hardest paths (429 with Retry-After, 5xx storms, timeouts, an auth cache that keeps a
revoked key alive for a while, a revoke that silently does nothing) cannot be provoked against the real
API on demand. Here each one is a field of `Knobs`, settable from Python or over HTTP while the service
is running, and the counters in `stats()` let a test assert what the service actually did: how many
revoke calls per key, how many of them took effect, how the lookups were batched.

The sandbox is the provider, so it holds raw tokens; it still never logs one (hashes and redacted forms
only), because its logs end up in CI output next to the service's. `GET /_sandbox/keys` deliberately
returns the tokens: it is what lets a demo print a ready-to-paste command with a live key in it.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import logging
import random
import secrets
import string
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeGuard

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.sandbox._http import bad_request, json_body, sleep_unless_disconnected
from service.tokens import redact, token_hash

logger = logging.getLogger(__name__)

ROUTES = ("lookup", "revoke", "probe")
# A knob keyed "all" applies to every route that has no entry of its own.
ALL_ROUTES = "all"
# Public on purpose: it guards a loopback stand-in, and the demo prints it.
DEFAULT_ADMIN_TOKEN = "sandbox-admin-token"  # noqa: S105
MAX_LOOKUP_BATCH = 100

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ALNUM = string.ascii_letters + string.digits
_HEX = "0123456789abcdef"
_UNAUTHORIZED = {"error": "Unauthorized", "message": "Invalid API key"}


@dataclass
class SandboxKey:
    """One API key as the provider knows it. `token` stays out of repr so that logging a key is safe."""

    token: str = field(repr=False)
    id: str
    org_id: str
    name: str
    owner_email: str
    owner_name: str
    notify: list[str]
    enabled: bool = True
    # What the second release's lookup adds (RFC 3339 strings as the admin API sends them).
    created_at: str | None = None
    last_used_at: str | None = None
    org_name: str | None = None
    admins: list[dict[str, str]] = field(default_factory=list)
    channels: list[dict[str, str]] = field(default_factory=list, repr=False)
    # Merged over this key's lookup entry as is: how a test makes the admin API send a malformed field.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _derive(seed: str, label: str, alphabet: str, length: int) -> str:
    stream = hashlib.shake_256(f"{seed}\x00{label}".encode()).digest(length)
    return "".join(alphabet[byte % len(alphabet)] for byte in stream)


def channel_secret(seed: str, label: str) -> str:
    """A Standard Webhooks secret (`whsec_` + base64 of 24 bytes), the same for the same seed."""
    return (
        "whsec_"
        + base64.b64encode(hashlib.shake_256(f"{seed}\x00secret/{label}".encode()).digest(24)).decode()
    )


def org_channels(receiver: str, org_id: str, seed: str) -> list[dict[str, str]]:
    """An org's webhook and Slack channel, pointing at the sandbox's receiver (`receiver.py`)."""
    return [
        {
            "id": f"ch_{org_id}_webhook",
            "type": "webhook",
            "url": f"{receiver}/hooks/{org_id}",
            "secret": channel_secret(seed, org_id),
        },
        {"id": f"ch_{org_id}_slack", "type": "slack", "url": f"{receiver}/slack/{org_id}"},
    ]


def seeded_keys(count: int = 5, seed: str = "sandbox", receiver: str | None = None) -> list[SandboxKey]:
    """Keys shaped like real ones (`sm_` + 22 base58 + `_` + 64 alphanumerics), the same for the same seed.

    Owners are shared ((count + 1) // 2 of them, assigned round-robin) so that the one-email-per-owner
    and several-keys-per-owner paths are exercised by default; even-numbered owners also list a second
    notify address so that recipient dedupe is too. Each key says when it was created and last used
    (a day before the sandbox started, so before any leak it is told of). With `receiver` (the base
    URL of a `ChannelReceiver`), each owner's org also has an admin, a webhook and a Slack channel
    pointing there.
    """
    owners = max(1, (count + 1) // 2)
    last_used = datetime.fromtimestamp(int(time.time()) - 86400, UTC).isoformat().replace("+00:00", "Z")
    keys = []
    for i in range(count):
        n = i % owners
        email = f"owner{n}@example.test"
        notify = [email, f"security{n}@example.test"] if n % 2 == 0 else [email]
        token = f"sm_{_derive(seed, f'key/{i}/a', _BASE58, 22)}_{_derive(seed, f'key/{i}/b', _ALNUM, 64)}"
        org_id = f"org_{_derive(seed, f'org/{n}', _HEX, 12)}"
        keys.append(
            SandboxKey(
                token=token,
                id=f"key_{_derive(seed, f'id/{i}', _HEX, 16)}",
                org_id=org_id,
                name=f"sandbox key {i}",
                owner_email=email,
                owner_name=f"Sandbox Owner {n}",
                notify=notify,
                created_at=f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T09:30:00Z",
                last_used_at=last_used,
                org_name=f"Sandbox Org {n}",
                admins=[{"email": f"admin{n}@example.test", "name": f"Sandbox Admin {n}"}]
                if receiver
                else [],
                channels=org_channels(receiver, org_id, seed) if receiver else [],
            )
        )
    return keys


@dataclass
class Knobs:
    """How the sandbox misbehaves. Per-route dicts are keyed by "lookup", "revoke", "probe" or "all"."""

    latency_ms: dict[str, float] = field(default_factory=dict)
    # Fraction of calls answering 503, drawn from a Random seeded with the sandbox's seed.
    error_rate: dict[str, float] = field(default_factory=dict)
    # The next N calls answer fail_status, before error_rate is consulted.
    fail_next: dict[str, int] = field(default_factory=dict)
    fail_status: dict[str, int] = field(default_factory=dict)
    # Sent as Retry-After with 429 answers; fractions are allowed so tests need not wait whole seconds.
    retry_after: float | None = None
    hang_ms: dict[str, float] = field(default_factory=dict)
    # After a revoke, probes with that key keep answering 200 this long, like an auth cache.
    propagation_delay_s: float = 0.0
    # Revoke answers 200 {"success": true} but the key stays enabled.
    never_revoke: bool = False
    admin_token: str = DEFAULT_ADMIN_TOKEN


def _route_value(knob: dict[str, Any], route: str, default: Any) -> Any:
    if route in knob:
        return knob[route]
    return knob.get(ALL_ROUTES, default)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_route_dict(name: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object keyed by route")
    unknown = set(value) - {*ROUTES, ALL_ROUTES}
    if unknown:
        raise ValueError(f"{name}: unknown route(s) {sorted(unknown)}; use {[*ROUTES, ALL_ROUTES]}")
    result: dict[str, Any] = {}
    for route, item in value.items():
        if name in ("fail_next", "fail_status"):
            if not isinstance(item, int) or isinstance(item, bool):
                raise ValueError(f"{name}.{route} must be an integer")
            if name == "fail_next" and item < 0:
                raise ValueError(f"{name}.{route} must be >= 0")
            if name == "fail_status" and not 400 <= item <= 599:
                raise ValueError(f"{name}.{route} must be an HTTP error status (400-599)")
            result[route] = item
            continue
        if not _is_number(item) or item < 0:
            raise ValueError(f"{name}.{route} must be a number >= 0")
        if name == "error_rate" and item > 1:
            raise ValueError(f"{name}.{route} must be between 0 and 1")
        result[route] = float(item)
    return result


def _validate_knob(name: str, value: object) -> object:
    """Checked before anything is applied, so a bad update over HTTP changes nothing."""
    if name in ("latency_ms", "error_rate", "fail_next", "fail_status", "hang_ms"):
        return _validate_route_dict(name, value)
    if name == "retry_after":
        if value is not None and (not _is_number(value) or value < 0):
            raise ValueError("retry_after must be null or a number >= 0")
        return None if value is None else float(value)
    if name == "propagation_delay_s":
        if not _is_number(value) or value < 0:
            raise ValueError("propagation_delay_s must be a number >= 0")
        return float(value)
    if name == "never_revoke":
        if not isinstance(value, bool):
            raise ValueError("never_revoke must be a boolean")
        return value
    if name == "admin_token":
        if not isinstance(value, str) or not value:
            raise ValueError("admin_token must be a non-empty string")
        return value
    raise ValueError(f"unknown knob {name!r}; knobs are {[f.name for f in dataclasses.fields(Knobs)]}")


def _format_retry_after(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _lookup_entry(digest: str, key: SandboxKey) -> dict[str, Any]:
    """A key as the admin API's lookup describes it; the optional fields only when the key has them."""
    entry: dict[str, Any] = {
        "keyHash": digest,
        "id": key.id,
        "orgId": key.org_id,
        "name": key.name,
        "enabled": key.enabled,
        "owner": {"email": key.owner_email, "name": key.owner_name},
        "notify": list(key.notify),
    }
    if key.created_at is not None:
        entry["createdAt"] = key.created_at
    if key.last_used_at is not None:
        entry["lastUsedAt"] = key.last_used_at
    if key.org_name is not None or key.admins or key.channels:
        entry["org"] = {
            "name": key.org_name,
            "admins": copy.deepcopy(key.admins),
            "channels": copy.deepcopy(key.channels),
        }
    entry.update(copy.deepcopy(key.raw))
    return entry


_KEY_FIELDS = {f.name: f for f in dataclasses.fields(SandboxKey)}


def _key_from_json(item: object) -> SandboxKey:
    if not isinstance(item, dict):
        raise ValueError("each key must be an object")
    # key_hash is what GET /_sandbox/keys adds; it is derived from the token, so it is dropped here.
    item = {name: value for name, value in item.items() if name != "key_hash"}
    unknown = set(item) - set(_KEY_FIELDS)
    if unknown:
        raise ValueError(f"unknown key field(s) {sorted(unknown)}")
    missing = {
        name
        for name, f in _KEY_FIELDS.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    } - set(item)
    if missing:
        raise ValueError(f"missing key field(s) {sorted(missing)}")
    for name in ("token", "id", "org_id", "name", "owner_email", "owner_name"):
        if not isinstance(item[name], str) or not item[name]:
            raise ValueError(f"{name} must be a non-empty string")
    notify = item["notify"]
    if not isinstance(notify, list) or not all(isinstance(n, str) for n in notify):
        raise ValueError("notify must be a list of strings")
    for name in ("created_at", "last_used_at", "org_name"):
        if not isinstance(item.get(name), str | None):
            raise ValueError(f"{name} must be a string or null")
    for name in ("admins", "channels"):
        value = item.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"{name} must be a list of objects")
    if not isinstance(item.get("raw", {}), dict):
        raise ValueError("raw must be an object")
    if not isinstance(item.get("enabled", True), bool):
        raise ValueError("enabled must be a boolean")
    return SandboxKey(**item)


class SupermemorySandbox:
    """Keys, knobs and counters behind one Starlette app; safe to drive from a test thread while
    uvicorn serves the app from another."""

    def __init__(
        self,
        keys: Iterable[SandboxKey] | None = None,
        *,
        knobs: Knobs | None = None,
        seed: str = "sandbox",
    ) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        # reset() returns to these, so a sandbox built with a custom admin token keeps it.
        self._initial_knobs = copy.deepcopy(knobs) if knobs is not None else Knobs()
        self.knobs = copy.deepcopy(self._initial_knobs)
        self._keys: dict[str, SandboxKey] = {}
        self._by_hash: dict[str, SandboxKey] = {}
        self._enabled_as_added: dict[str, bool] = {}
        self._reset_state()
        self.add_keys(seeded_keys(seed=seed) if keys is None else keys)

    def _reset_state(self) -> None:
        self._random = random.Random(self._seed)
        self._revoked_at: dict[str, float] = {}
        self._calls: Counter[str] = Counter(dict.fromkeys(ROUTES, 0))
        self._effective_revokes: Counter[str] = Counter()
        self._revoke_calls: Counter[str] = Counter()
        self._probe_calls: Counter[str] = Counter()
        self._lookup_batches: list[int] = []

    @property
    def keys(self) -> list[SandboxKey]:
        """Copies, so a caller cannot change the sandbox's state behind its lock."""
        with self._lock:
            return [dataclasses.replace(key, notify=list(key.notify)) for key in self._keys.values()]

    def add_keys(self, keys: Iterable[SandboxKey]) -> None:
        """Add keys; a duplicate id or token is refused (ValueError) because lookups and revokes would
        become ambiguous."""
        new = [dataclasses.replace(key, notify=list(key.notify)) for key in keys]
        with self._lock:
            ids: set[str] = set()
            hashes: set[str] = set()
            for key in new:
                digest = token_hash(key.token)
                if key.id in self._keys or key.id in ids:
                    raise ValueError(f"duplicate key id {key.id!r}")
                if digest in self._by_hash or digest in hashes:
                    raise ValueError(f"duplicate token for key id {key.id!r} ({redact(key.token)})")
                ids.add(key.id)
                hashes.add(digest)
            for key in new:
                self._keys[key.id] = key
                self._by_hash[token_hash(key.token)] = key
                self._enabled_as_added[key.id] = key.enabled
        logger.info("sandbox supermemory: added %d key(s): %s", len(new), ", ".join(k.id for k in new))

    def update_key(self, key_id: str, **changes: Any) -> SandboxKey:
        """Change fields of a key (its org, its times, `raw`), as the provider's data changes; the
        token and id stay. Returns a copy of the key as it now is."""
        if {"token", "id"} & set(changes):
            raise ValueError("a key's token and id do not change")
        with self._lock:
            key = dataclasses.replace(self._keys[key_id], **changes)
            self._keys[key_id] = key
            self._by_hash[token_hash(key.token)] = key
            return dataclasses.replace(key)

    def set_knobs(self, **changes: Any) -> Knobs:
        """Partial update; each given field replaces the current one whole. All fields are validated
        before any is applied, so a rejected update (ValueError) changes nothing."""
        validated = {name: _validate_knob(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in validated.items():
                setattr(self.knobs, name, value)
            return copy.deepcopy(self.knobs)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self._calls),
                "effective_revokes": dict(self._effective_revokes),
                "revoke_calls": dict(self._revoke_calls),
                "probe_calls": dict(self._probe_calls),
                "lookup_batches": list(self._lookup_batches),
            }

    def reset(self) -> None:
        """Counters cleared, knobs back to the constructor's, every key enabled or not as when added.

        Keys added after construction stay: a demo that added its own keys should not lose them. The
        knobs object is updated in place, so references held by tests stay live.
        """
        with self._lock:
            for f in dataclasses.fields(Knobs):
                setattr(self.knobs, f.name, copy.deepcopy(getattr(self._initial_knobs, f.name)))
            for key_id, enabled in self._enabled_as_added.items():
                self._keys[key_id].enabled = enabled
            self._reset_state()
        logger.info("sandbox supermemory: reset")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v3/admin/api-keys/lookup", self._lookup, methods=["POST"]),
                Route("/v3/auth/scoped-key/{id}", self._revoke, methods=["DELETE"]),
                Route("/v3/session", self._probe, methods=["GET"]),
                Route("/_sandbox/stats", self._stats_endpoint, methods=["GET"]),
                Route("/_sandbox/knobs", self._knobs_endpoint, methods=["GET", "POST"]),
                Route("/_sandbox/keys", self._keys_endpoint, methods=["GET", "POST"]),
                Route("/_sandbox/reset", self._reset_endpoint, methods=["POST"]),
            ]
        )

    # -- the provider's API ----------------------------------------------------------------------

    async def _gate(self, request: Request, route: str, key_id: str | None = None) -> Response | None:
        """Count, sleep, then injected failures, in that order (so a test can tell a call that was
        made from one that was answered). None lets the real behaviour run."""
        with self._lock:
            self._calls[route] += 1
            if key_id is not None and route == "revoke":
                self._revoke_calls[key_id] += 1
            elif key_id is not None and route == "probe":
                self._probe_calls[key_id] += 1
            delay_ms = _route_value(self.knobs.hang_ms, route, 0.0) + _route_value(
                self.knobs.latency_ms, route, 0.0
            )
        await sleep_unless_disconnected(request, delay_ms / 1000)
        with self._lock:
            status: int | None = None
            fail_next = self.knobs.fail_next
            counter_route = route if route in fail_next else ALL_ROUTES
            if fail_next.get(counter_route, 0) > 0:
                fail_next[counter_route] -= 1
                status = _route_value(self.knobs.fail_status, route, 503)
            elif self._random.random() < _route_value(self.knobs.error_rate, route, 0.0):
                status = 503
            retry_after = self.knobs.retry_after
        if status is None:
            return None
        logger.info("sandbox supermemory: injected %d on %s", status, route)
        headers = {}
        if status == 429:
            body = {"error": "Too Many Requests", "message": "Rate limit exceeded"}
            if retry_after is not None:
                headers["Retry-After"] = _format_retry_after(retry_after)
        else:
            body = {"error": HTTPStatus(status).phrase, "message": "Injected by the sandbox"}
        return JSONResponse(body, status_code=status, headers=headers)

    def _is_admin(self, request: Request) -> bool:
        presented = _bearer(request)
        return presented is not None and secrets.compare_digest(
            presented.encode(), self.knobs.admin_token.encode()
        )

    @staticmethod
    def _admin_refused() -> JSONResponse:
        return JSONResponse({"error": "Unauthorized", "message": "Invalid admin token"}, status_code=401)

    async def _lookup(self, request: Request) -> Response:
        if (failure := await self._gate(request, "lookup")) is not None:
            return failure
        if not self._is_admin(request):
            return self._admin_refused()
        try:
            payload = await json_body(request)
        except ValueError as exc:
            return bad_request(str(exc))
        hashes = payload.get("keyHashes") if isinstance(payload, dict) else None
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            return bad_request("keyHashes must be a list of strings")
        if len(hashes) > MAX_LOOKUP_BATCH:
            return bad_request(f"at most {MAX_LOOKUP_BATCH} keyHashes per call")
        found = []
        with self._lock:
            self._lookup_batches.append(len(hashes))
            for digest in dict.fromkeys(hashes):
                key = self._by_hash.get(digest)
                if key is not None:
                    found.append(_lookup_entry(digest, key))
        logger.info("sandbox supermemory: lookup of %d hash(es), %d known", len(hashes), len(found))
        return JSONResponse({"keys": found})

    async def _revoke(self, request: Request) -> Response:
        key_id = request.path_params["id"]
        if (failure := await self._gate(request, "revoke", key_id)) is not None:
            return failure
        if not self._is_admin(request):
            return self._admin_refused()
        with self._lock:
            key = self._keys.get(key_id)
            if key is None or not key.enabled:
                outcome = "not found"
            elif self.knobs.never_revoke:
                outcome = "ignored (never_revoke)"
            else:
                key.enabled = False
                self._revoked_at[key_id] = time.monotonic()
                self._effective_revokes[key_id] += 1
                outcome = "revoked"
        logger.info("sandbox supermemory: revoke %s: %s", key_id, outcome)
        if outcome == "not found":
            return JSONResponse({"error": "Not found"}, status_code=404)
        return JSONResponse({"success": True})

    async def _probe(self, request: Request) -> Response:
        token = _bearer(request)
        with self._lock:
            key = self._by_hash.get(token_hash(token)) if token is not None else None
        if (failure := await self._gate(request, "probe", key.id if key is not None else None)) is not None:
            return failure
        with self._lock:
            revoked_at = self._revoked_at.get(key.id) if key is not None else None
            alive = key is not None and (
                key.enabled
                or (revoked_at is not None and time.monotonic() - revoked_at < self.knobs.propagation_delay_s)
            )
        logger.info(
            "sandbox supermemory: probe with %s: %s",
            redact(token) if token is not None else "no key",
            "alive" if alive else "401",
        )
        if not alive or key is None:
            return JSONResponse(_UNAUTHORIZED, status_code=401)
        return JSONResponse({"org": {"id": key.org_id}, "key": {"id": key.id, "name": key.name}})

    # -- control endpoints -----------------------------------------------------------------------

    async def _stats_endpoint(self, _request: Request) -> Response:
        return JSONResponse(self.stats())

    async def _knobs_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                payload = await json_body(request)
                if not isinstance(payload, dict):
                    raise ValueError("knobs must be a JSON object")
                self.set_knobs(**payload)
            except ValueError as exc:
                return bad_request(str(exc))
        with self._lock:
            return JSONResponse(dataclasses.asdict(self.knobs))

    async def _keys_endpoint(self, request: Request) -> Response:
        if request.method == "GET":
            # A bare list, like the POST body, so one sandbox's keys can be posted into another.
            return JSONResponse(
                [{**dataclasses.asdict(key), "key_hash": token_hash(key.token)} for key in self.keys]
            )
        try:
            payload = await json_body(request)
            if not isinstance(payload, list):
                raise ValueError("expected a JSON list of keys")
            new = [_key_from_json(item) for item in payload]
            self.add_keys(new)
        except ValueError as exc:
            return bad_request(str(exc))
        return JSONResponse({"added": [key.id for key in new]}, status_code=201)

    async def _reset_endpoint(self, _request: Request) -> Response:
        self.reset()
        return JSONResponse({"reset": True})
