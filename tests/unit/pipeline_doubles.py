"""What the unit tests of the pipeline's decisions share: a clock and an RNG the test drives, the real
SQLite store on a temporary file, and doubles for the third-party boundaries only (Supermemory's
API, the pager's delivery, the SMTP relay, the notifier as the pipeline sees it).

Incidents are put in the state a test needs through the store's own intake and fenced transitions,
so what a step is handed is exactly what a claim hands the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from service.alerting import Pager
from service.notify.result import NotifyResult
from service.notify.smtp import SendOutcome, SendResult
from service.pipeline import Policy, Steps
from service.reasons import Reason
from service.store import (
    AlertRecord,
    Incident,
    IncidentRef,
    Sealer,
    SqliteStore,
    State,
    TokenSighting,
    Transition,
)
from service.supermemory import LOOKUP_BATCH, Asked, CallFailed, KeyInfo, Probe, ProbeVerdict, RevokeResult
from service.tokens import token_hash

T = TypeVar("T")

START = 1_800_000_000.0
OWNER = "test-replica/1-worker"
TOKEN_TYPE = "supermemory_api_key"


class Clock:
    """Time as the test says it is: every part under test reads this one clock."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def token(n: int) -> str:
    """A distinct key-shaped token (`sm_<org>_<random>`), made up for the test."""
    return f"sm_org{n:04d}_{hashlib.sha256(str(n).encode()).hexdigest()[:40]}"


def key_info(n: int, *emails: str) -> KeyInfo:
    return KeyInfo(
        key_hash=token_hash(token(n)),
        id=f"key_{n}",
        org_id=f"org{n:04d}",
        name=f"key {n}",
        enabled=True,
        recipients=[{"email": e, "name": e.partition("@")[0]} for e in emails],
    )


class FakeSupermemory:
    """Supermemory's three calls, answered as the test scripts them, with every call recorded.

    `probe_answers` are used in order, the last one repeated (an exception is raised, as a bug in
    the client would); `lookup_error` and `revoke_error` make the call fail as the real client
    reports a failure (CallFailed with a reason).
    """

    def __init__(self) -> None:
        self.keys: dict[str, KeyInfo] = {}
        self.lookup_error: CallFailed | None = None
        self.lookup_gate: asyncio.Event | None = None
        self.on_lookup: Callable[[], Awaitable[None]] | None = None
        self.revoke_error: CallFailed | None = None
        self.revoke_result = RevokeResult.REVOKED
        self.revoke_gate: asyncio.Event | None = None
        self.probe_answers: list[Probe | Exception] = [dead()]
        self.lookups: list[list[str]] = []
        self.revokes: list[str] = []
        self.probes: list[str] = []

    def know(self, *keys: KeyInfo) -> None:
        for key in keys:
            self.keys[key.key_hash] = key

    async def lookup(self, hashes: Sequence[str]) -> dict[str, KeyInfo]:
        self.lookups.append(list(hashes))
        if self.on_lookup is not None:
            await self.on_lookup()
        if self.lookup_gate is not None:
            await self.lookup_gate.wait()
        if self.lookup_error is not None:
            raise self.lookup_error
        return {h: self.keys[h] for h in hashes if h in self.keys}

    def ask(self, hashes: Sequence[str]) -> Asked:
        """As the real client's: chunks of at most LOOKUP_BATCH, each answered by one `lookup`."""
        chunks = [list(hashes[i : i + LOOKUP_BATCH]) for i in range(0, len(hashes), LOOKUP_BATCH)]
        return [(chunk, asyncio.ensure_future(self.lookup(chunk))) for chunk in chunks]

    async def revoke(self, key_id: str) -> RevokeResult:
        self.revokes.append(key_id)
        if self.revoke_gate is not None:
            await self.revoke_gate.wait()
        if self.revoke_error is not None:
            raise self.revoke_error
        return self.revoke_result

    async def probe(self, raw: str) -> Probe:
        self.probes.append(raw)
        answer = self.probe_answers.pop(0) if len(self.probe_answers) > 1 else self.probe_answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def dead() -> Probe:
    return Probe(ProbeVerdict.DEAD, Reason.PROBE_UNAUTHORIZED, 401)


def alive() -> Probe:
    return Probe(ProbeVerdict.ALIVE, Reason.PROBE_KEY_ALIVE, 200)


def inconclusive(retry_after: float | None = None) -> Probe:
    return Probe(ProbeVerdict.INCONCLUSIVE, Reason.PROBE_SERVER_ERROR, 503, retry_after)


class RecordingPager(Pager):
    """The real pager (its log line and metric), with every page also kept for the test to read."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[tuple[Reason, dict[str, str]]] = []

    def page(self, code: Reason, message: str, tags: Mapping[str, str], context: Mapping[str, Any]) -> None:
        super().page(code, message, tags, context)
        self.pages.append((code, dict(tags)))

    def codes(self) -> list[Reason]:
        return [code for code, _ in self.pages]


class FakeNotifier:
    """The notifier as the pipeline sees it: answers `result` (built by the test) and records who
    it was handed."""

    def __init__(self, result: NotifyResult | None = None) -> None:
        self.result = result or NotifyResult()
        self.calls: list[list[str]] = []

    async def notify(self, incidents: Sequence[Incident]) -> NotifyResult:
        self.calls.append([i.id for i in incidents])
        return self.result


class FakeSmtp:
    """The SMTP relay as the outbox sees it (`SmtpSender.send`): answers per envelope recipient,
    SENT unless the test set another outcome, and keeps every message handed over."""

    where = "smtp.test:25"

    def __init__(self) -> None:
        self.sent: list[tuple[str, EmailMessage]] = []
        self.answers: dict[str, SendResult] = {}
        # When set, a send is announced on `entered` and then waits for `gate`: a send in flight.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> SendResult:
        self.sent.append((recipient, message))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.answers.get(recipient, SendResult(SendOutcome.SENT))

    def to(self, recipient: str) -> list[EmailMessage]:
        return [m for r, m in self.sent if r == recipient]


def policy(**overrides: Any) -> Policy:
    values: dict[str, Any] = {
        "dry_run": False,
        "probe_schedule": (0.0, 10.0, 20.0, 40.0),
        "probe_inconclusive_window": 100.0,
        "revoke_retry_window": 900.0,
        "backoff_base": 1.0,
        "backoff_max": 300.0,
        "reprobe_interval": 3600.0,
        "unconfirmed_window": 7 * 24 * 3600.0,
    }
    return Policy(**{**values, **overrides})


DATA_KEY = os.urandom(32)


def open_store(path: Path, clock: Clock) -> SqliteStore:
    return SqliteStore(path / "store.db", Sealer(DATA_KEY), clock=clock)


def run_with_store(tmp_path: Path, clock: Clock, scenario: Callable[[SqliteStore], Awaitable[T]]) -> T:
    """Run `scenario` against a freshly opened real store, closed afterwards whatever happens."""

    async def main() -> T:
        store = open_store(tmp_path, clock)
        await store.open()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


def steps_for(
    store: SqliteStore,
    clock: Clock,
    client: FakeSupermemory | None = None,
    pager: RecordingPager | None = None,
    notifier: Any = None,
    seed: int = 7,
    **overrides: Any,
) -> Steps:
    return Steps(
        store,
        client or FakeSupermemory(),  # type: ignore[arg-type]
        pager or RecordingPager(),
        policy(**overrides),
        notifier,
        clock=clock,
        rng=random.Random(seed),
    )


def alert_of(*tokens: str, reporter: str = "manual") -> tuple[AlertRecord, list[TokenSighting]]:
    """One alert carrying `tokens`: its record and its items."""
    items = [
        TokenSighting(t, TOKEN_TYPE, f"https://paste.example/{i}", "paste", reporter)
        for i, t in enumerate(tokens)
    ]
    return AlertRecord(reporter, hashlib.sha256(repr(tokens).encode()).hexdigest(), len(items)), items


async def intake_refs(store: SqliteStore, *tokens: str, reporter: str = "manual") -> list[IncidentRef]:
    """One alert carrying `tokens`, as the intake records it (due at once for a worker)."""
    return await store.intake(*alert_of(*tokens, reporter=reporter), match_after=0.0)


async def intake(store: SqliteStore, *numbers: int, reporter: str = "manual") -> list[str]:
    """One alert carrying the tokens `token(n)`; the incidents' ids."""
    return [r.id for r in await intake_refs(store, *(token(n) for n in numbers), reporter=reporter)]


async def drive(store: SqliteStore, incident_id: str, to: State, due: float | None, **fields: Any) -> None:
    """Move an incident to `to` as the steps would have left it (an operator-style transition, fenced
    on state only), due at `due`."""
    [current] = await store.incidents([incident_id])
    applied = await store.apply(
        [Transition(incident_id, current.state, "test_setup", state=to, next_run_at=due, set=fields)]
    )
    assert applied == [True]


def key_fields(n: int, *emails: str) -> dict[str, Any]:
    """What a successful lookup records for `token(n)`."""
    key = key_info(n, *emails)
    return {
        "label": "true_positive",
        "key_id": key.id,
        "org_id": key.org_id,
        "key_name": key.name,
        "recipients": key.recipients,
    }


async def claim_one(store: SqliteStore, incident_id: str) -> Incident:
    """The incident as the worker's claim hands it over (leased to OWNER)."""
    claimed = await store.claim(OWNER, 1000, 30.0)
    found = [i for i in claimed if i.id == incident_id]
    assert found, f"{incident_id} was not due"
    return found[0]


async def one(store: SqliteStore, incident_id: str) -> Incident:
    [incident] = await store.incidents([incident_id])
    return incident


async def record(store: SqliteStore, *transitions: Transition) -> list[bool]:
    return await store.apply(list(transitions))
