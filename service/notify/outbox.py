"""Telling owners, exactly once per recipient and incident, through the store's outbox.

Each (incident, recipient) is a delivery row. A sender first holds the rows it is about to cover
(`reserve_deliveries`, under a time-limited hold so that a dead sender's rows come free), hands one
message to SMTP, then records the outcome (`finish_deliveries`). Whoever holds a row is the only one
sending it, so retries, restarts and a second replica never send twice, with one exception that no
outbox can close: a process killed after the SMTP server took the message and before the outcome was
committed. We chose at-least-once for that window (docs/notify.md says why): the row is found still
`sending` once its hold runs out, sent again under the same Message-ID, and logged as uncertain.

Grouping: keys of one recipient first reported in the same alert go out as one email. A confirmed key
waits up to `group_wait` seconds while sibling keys of its alert that may share a recipient are still
being matched, revoked or probed; whichever key's turn comes once they are ready sends for all of
them, and wakes the ones that were waiting. An unconfirmed key never waits: its email is urgent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage

from service.notify.compose import Letter, owner_email, refusal_email
from service.notify.result import NotifyResult
from service.notify.smtp import SendOutcome, SmtpSender
from service.observability import failure
from service.reasons import Reason
from service.store import (
    DELIVERY_FINAL,
    Delivery,
    DeliveryStatus,
    Incident,
    Sighting,
    State,
    Store,
    StoreError,
)

log = logging.getLogger("service.notify")

OWNER = "owner"
# The second email of a key first reported unconfirmed (urgently) that a re-probe then found dead.
FOLLOW_UP = "owner_confirmed"
REFUSAL = "refusal"
_READY = frozenset({State.CONFIRMED, State.UNCONFIRMED})
_IN_FLIGHT = frozenset({State.RECEIVED, State.MATCHED, State.REVOKED})
_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[^@\s<>,;\"]+")
_STATUS = {
    SendOutcome.SENT: DeliveryStatus.SENT,
    SendOutcome.REFUSED: DeliveryStatus.REFUSED,
    SendOutcome.RETRY: DeliveryStatus.PENDING,
}

Recipient = dict[str, str]
_Rows = dict[tuple[str, str, str], Delivery]


def recipients(incident: Incident, fallback: str | None) -> list[Recipient]:
    """The owner and the notify list, each address once; the security contact when there is none.

    Addresses are lowercased: they are the outbox's keys, and one owner listed as `Ann@x` by one key
    and `ann@x` by another must still get one email.
    """
    found: dict[str, Recipient] = {}
    for r in incident.recipients:
        address = str(r.get("email") or "").strip().lower()
        if address and address not in found:
            found[address] = {"email": address, "name": str(r.get("name") or "")}
    if not found and fallback:
        found[fallback.lower()] = {"email": fallback.lower(), "name": ""}
    return list(found.values())


def purpose_of(incident: Incident) -> str:
    """Which of the owner's emails an incident is due: a confirmed key whose owner was told, while
    it was unconfirmed, that it may still work gets the follow-up, a delivery of its own. One whose
    re-probe confirmed it before that urgent email could go (SMTP down meanwhile) gets the first
    email after all, with the confirmed wording: nothing was said that needs following up, and the
    urgent email's delivery, left pending, is the one this completes."""
    if (
        incident.state is State.CONFIRMED
        and incident.unconfirmed_at is not None
        and incident.notified_at is not None
    ):
        return FOLLOW_UP
    return OWNER


def mask(address: str) -> str:
    """An address as logs may show it: enough to tell owners apart, not a mailing list."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


class EmailNotifier:
    def __init__(
        self,
        store: Store,
        sender: SmtpSender,
        letter: Letter,
        *,
        group_wait: float,
        hold: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sender = sender
        self.letter = letter
        self.group_wait = group_wait
        self.hold = hold
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._clock = clock

    async def notify(self, incidents: Sequence[Incident]) -> NotifyResult:
        result = NotifyResult()
        try:
            await self._notify(incidents, result)
        except StoreError as exc:
            # Rows held by us come free when their hold runs out; nothing is lost, only delayed.
            failure(
                log, "notify", Reason.STORE_UNAVAILABLE, f"outbox unavailable: {exc}", level=logging.ERROR
            )
            for incident in incidents:
                if incident.id not in result.done:
                    result.pending[incident.id] = Reason.STORE_UNAVAILABLE
        return result

    async def _notify(self, incidents: Sequence[Incident], result: NotifyResult) -> None:
        now = self._clock()
        siblings = await self.store.alert_siblings([i.id for i in incidents])
        pool = {i.id: i for i in incidents}
        for group in siblings.values():
            for sibling in group:
                if sibling.state in _READY:
                    pool.setdefault(sibling.id, sibling)
        rows = _index(await self.store.deliveries(list(pool)))

        plans: dict[tuple[str, str], tuple[Recipient, dict[str, Incident]]] = {}
        for incident in incidents:
            purpose = purpose_of(incident)
            todo = [
                r for r in self._recipients(incident) if not _final(rows, incident.id, r["email"], purpose)
            ]
            if not todo:
                continue
            if self._should_wait(incident, todo, siblings.get(incident.id, []), now):
                result.waiting[incident.id] = (incident.confirmed_at or now) + self.group_wait
                continue
            for recipient in todo:
                _, covered = plans.setdefault((recipient["email"], purpose), (recipient, {}))
                covered[incident.id] = incident
                for sibling in siblings.get(incident.id, []):
                    if (
                        sibling.id in pool
                        and sibling.state in _READY
                        and purpose_of(sibling) == purpose
                        and recipient["email"] in {r["email"] for r in self._recipients(sibling)}
                        and not _final(rows, sibling.id, recipient["email"], purpose)
                    ):
                        covered[sibling.id] = sibling

        covered_ids = sorted({i for _, covered in plans.values() for i in covered})
        sightings = await self.store.sightings(covered_ids)
        await asyncio.gather(
            *(
                self._send_owner(recipient, purpose, list(covered.values()), sightings, result)
                for (_, purpose), (recipient, covered) in plans.items()
            )
        )
        rows = _index(await self.store.deliveries(list(pool)))
        await self._tell_contact(pool, rows, result)
        rows = _index(await self.store.deliveries(list(pool)))
        self._conclude(incidents, rows, result)
        claimed = {i.id for i in incidents}
        # Siblings told alongside are still scheduled for their own (later) turn: bring it forward.
        await self.store.wake([i for i in covered_ids if i not in claimed])

    def _recipients(self, incident: Incident) -> list[Recipient]:
        return recipients(incident, self.letter.reply_to)

    def _should_wait(
        self, incident: Incident, todo: Sequence[Recipient], siblings: Sequence[Incident], now: float
    ) -> bool:
        if incident.state is not State.CONFIRMED or incident.confirmed_at is None:
            return False
        if now >= incident.confirmed_at + self.group_wait:
            return False
        addresses = {r["email"] for r in todo}
        for sibling in siblings:
            if sibling.state not in _IN_FLIGHT:
                continue
            # Recipients are known from the lookup on; before it, any sibling may share one.
            if sibling.state is State.RECEIVED or addresses & {r["email"] for r in self._recipients(sibling)}:
                return True
        return False

    async def _send_owner(
        self,
        recipient: Recipient,
        purpose: str,
        incidents: Sequence[Incident],
        sightings: Mapping[str, Sequence[Sighting]],
        result: NotifyResult,
    ) -> None:
        address = recipient["email"]
        taken = await self._reserve(address, purpose, incidents)
        if not taken:
            return
        if not _ADDRESS.fullmatch(address):
            await self._finish(address, purpose, taken, DeliveryStatus.REFUSED, None, "bad_recipient_address")
            failure(
                log,
                "notify",
                Reason.BAD_RECIPIENT_ADDRESS,
                "recipient address is malformed",
                recipient=mask(address),
            )
            return
        message = owner_email(self.letter, recipient, taken, sightings, purpose, purpose == FOLLOW_UP)
        await self._deliver(address, purpose, taken, message, result)

    async def _tell_contact(self, pool: Mapping[str, Incident], rows: _Rows, result: NotifyResult) -> None:
        """A recipient that refused for good: the security contact hears of it, once per address."""
        contact = self.letter.reply_to
        refused: dict[str, list[Incident]] = {}
        reasons: dict[str, str] = {}
        for (incident_id, address, purpose), row in rows.items():
            if purpose != OWNER or row.status is not DeliveryStatus.REFUSED:
                continue
            if contact is None or address == contact.lower():
                continue
            if not _final(rows, incident_id, address, REFUSAL):
                refused.setdefault(address, []).append(pool[incident_id])
                reasons[address] = row.detail or "refused"
        for address, incidents in refused.items():
            assert contact is not None
            taken = await self._reserve(address, REFUSAL, incidents)
            if taken:
                message = refusal_email(self.letter, contact, address, taken, reasons[address], REFUSAL)
                await self._deliver(address, REFUSAL, taken, message, result, to=contact)

    async def _reserve(self, address: str, purpose: str, incidents: Sequence[Incident]) -> list[Incident]:
        reservation = await self.store.reserve_deliveries(
            self.holder, address, purpose, [i.id for i in incidents], self.hold
        )
        if reservation.uncertain:
            failure(
                log,
                "notify",
                Reason.RESEND_UNKNOWN_OUTCOME,
                "sending again: an earlier attempt died before recording whether it was delivered",
                recipient=mask(address),
                purpose=purpose,
                incidents=len(reservation.uncertain),
            )
        taken = set(reservation.taken)
        return [i for i in incidents if i.id in taken]

    async def _deliver(
        self,
        address: str,
        purpose: str,
        incidents: Sequence[Incident],
        message: EmailMessage,
        result: NotifyResult,
        to: str | None = None,
    ) -> None:
        """Send one message covering `incidents` for `address` (to `to` when the message goes to
        someone else about that address) and record the outcome on their rows."""
        sent = await self.sender.send(message, self.letter.sender, to or address)
        await self._finish(
            address, purpose, incidents, _STATUS[sent.outcome], message["Message-ID"], sent.detail
        )
        if sent.outcome is SendOutcome.SENT:
            log.info(
                "email sent",
                extra={
                    "recipient": mask(to or address),
                    "purpose": purpose,
                    "incidents": len(incidents),
                    "message_id": message["Message-ID"],
                },
            )
            return
        assert sent.reason is not None
        reason = (
            Reason.SECURITY_CONTACT_REFUSED
            if to is not None and sent.outcome is SendOutcome.REFUSED
            else sent.reason
        )
        config_problem = sent.reason in (
            Reason.SMTP_AUTH_FAILED,
            Reason.SMTP_SENDER_REFUSED,
            Reason.SMTP_TLS_REQUIRED,
        )
        failure(
            log,
            "notify",
            reason,
            f"email not delivered: {sent.detail}",
            level=logging.ERROR if config_problem or to is not None else logging.WARNING,
            recipient=mask(to or address),
            purpose=purpose,
            smtp=self.sender.where,
        )
        if sent.outcome is SendOutcome.RETRY:
            for incident in incidents:
                result.pending[incident.id] = sent.reason

    async def _finish(
        self,
        address: str,
        purpose: str,
        incidents: Sequence[Incident],
        status: DeliveryStatus,
        message_id: str | None,
        detail: str | None,
    ) -> None:
        await self.store.finish_deliveries(
            self.holder, address, purpose, [i.id for i in incidents], status, message_id, detail
        )

    def _conclude(self, incidents: Sequence[Incident], rows: _Rows, result: NotifyResult) -> None:
        contact = self.letter.reply_to
        for incident in incidents:
            addresses = [r["email"] for r in self._recipients(incident)]
            if not addresses:
                failure(
                    log,
                    "notify",
                    Reason.NO_RECIPIENT,
                    "no owner address and no security contact",
                    incident_id=incident.id,
                )
                result.unreachable[incident.id] = []
                result.done.add(incident.id)
                continue
            purpose = purpose_of(incident)
            owners_done = all(_final(rows, incident.id, a, purpose) for a in addresses)
            # Only the first email's refusal reaches on-call and the security contact: a follow-up
            # refused goes to an address they have been told of already.
            refused = (
                []
                if purpose != OWNER
                else [a for a in addresses if _status(rows, incident.id, a, OWNER) is DeliveryStatus.REFUSED]
            )
            if refused:
                result.unreachable[incident.id] = refused
            contact_done = all(
                contact is None or a == contact.lower() or _final(rows, incident.id, a, REFUSAL)
                for a in refused
            )
            if owners_done and contact_done:
                result.done.add(incident.id)
                result.waiting.pop(incident.id, None)
                result.pending.pop(incident.id, None)
            elif incident.id not in result.waiting:
                result.pending.setdefault(incident.id, Reason.DELIVERY_HELD_ELSEWHERE)


def _index(deliveries: Sequence[Delivery]) -> _Rows:
    return {(d.incident_id, d.recipient.lower(), d.purpose): d for d in deliveries}


def _status(rows: _Rows, incident_id: str, address: str, purpose: str) -> DeliveryStatus | None:
    row = rows.get((incident_id, address.lower(), purpose))
    return None if row is None else row.status


def _final(rows: _Rows, incident_id: str, address: str, purpose: str) -> bool:
    return _status(rows, incident_id, address, purpose) in DELIVERY_FINAL
