"""The emails themselves: rendered from the Jinja2 templates beside this module, plain text and HTML.

Everything shown comes from the incident as the store holds it (name, redacted form, org, times,
sightings), never from a raw token, which the notifier does not have. Sighting URLs come from
reporters, so they are scrubbed of anything key-shaped (a leaked key can sit in a URL's query) and
the HTML is autoescaped (a URL is attacker-controlled text).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from service.notify.remediation import places
from service.store import Incident, Sighting, State
from service.tokens import scrub

CONSOLE_URL = "https://console.supermemory.ai"
# How a sighting's reporter reads in an email, where it differs from its name in the store.
REPORTERS = {"public": "a member of the public (public report form)"}

_env = Environment(
    loader=PackageLoader("service.notify", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@dataclass(frozen=True, slots=True)
class Letter:
    """Who sends, and where replies go: the same for every email of one process."""

    sender: str
    reply_to: str | None


def message_id(recipient: str, purpose: str, incident_ids: Sequence[str], sender: str) -> str:
    """The same recipient, purpose and incidents always give the same Message-ID, so that a message
    sent again after a crash (see docs/notify.md) is recognisably the same message to mail clients."""
    digest = hashlib.sha256(
        "\n".join([recipient.lower(), purpose, *sorted(incident_ids)]).encode()
    ).hexdigest()
    domain = sender.rpartition("@")[2] or "leak-responder"
    return f"<{digest[:40]}@{domain}>"


def owner_email(
    letter: Letter,
    recipient: dict[str, str],
    incidents: Sequence[Incident],
    sightings: Mapping[str, Sequence[Sighting]],
    purpose: str,
    followup: bool = False,
) -> EmailMessage:
    """The owner's email; `followup` is the second one, for keys first reported as unconfirmed
    (the urgent email) that a later re-probe found dead: the owner hears the end of the story."""
    unconfirmed = any(i.state is State.UNCONFIRMED for i in incidents)
    used = any(i.used_after_leak for i in incidents)
    urgent = unconfirmed or used
    keys = [_key(i, sightings.get(i.id, ())) for i in incidents]
    context = {
        "name": recipient.get("name") or "",
        "keys": keys,
        "urgent": urgent,
        "unconfirmed": unconfirmed,
        "followup": followup,
        "used_after_leak": used,
        "console_url": CONSOLE_URL,
        "security_contact": letter.reply_to,
    }
    subject = _followup_subject(keys) if followup else _owner_subject(keys, unconfirmed, used)
    message = _envelope(letter, recipient["email"], subject)
    message["Message-ID"] = message_id(recipient["email"], purpose, [i.id for i in incidents], letter.sender)
    if urgent:
        message["Importance"] = "high"
    message.set_content(_env.get_template("owner.txt.j2").render(context))
    message.add_alternative(_env.get_template("owner.html.j2").render(context), subtype="html")
    return message


def refusal_email(
    letter: Letter, contact: str, refused: str, incidents: Sequence[Incident], reason: str, purpose: str
) -> EmailMessage:
    """To the security contact: an owner address refused our mail, so a person must reach them."""
    context = {
        "refused": refused,
        "reason": scrub(reason),
        "keys": [_key(i, ()) for i in incidents],
    }
    message = _envelope(letter, contact, f"Could not tell {refused} about {len(incidents)} leaked key(s)")
    message["Message-ID"] = message_id(
        f"{contact}/{refused}", purpose, [i.id for i in incidents], letter.sender
    )
    message.set_content(_env.get_template("refused.txt.j2").render(context))
    return message


def _envelope(letter: Letter, to: str, subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = letter.sender
    message["To"] = to
    if letter.reply_to:
        message["Reply-To"] = letter.reply_to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    # RFC 3834: no out-of-office replies to a machine.
    message["Auto-Submitted"] = "auto-generated"
    return message


def _owner_subject(keys: Sequence[Mapping[str, object]], unconfirmed: bool, used: bool) -> str:
    one = keys[0]["redacted"] if len(keys) == 1 else None
    if used and unconfirmed:
        if one:
            return f"URGENT: rotate Supermemory API key {one} now: used after the leak, it may still work"
        return f"URGENT: {len(keys)} leaked Supermemory API keys: used after the leak, some may still work"
    if used:
        if one:
            return f"URGENT: your Supermemory API key {one} was used after the leak; it has been revoked"
        return (
            f"URGENT: {len(keys)} of your leaked Supermemory API keys, used after the leak, have been revoked"
        )
    if unconfirmed:
        if one:
            return f"URGENT: rotate your Supermemory API key {one} now: it leaked and may still work"
        return f"URGENT: rotate {len(keys)} leaked Supermemory API keys now: some may still work"
    if one:
        return f"Your Supermemory API key {one} was leaked and has been revoked"
    return f"{len(keys)} of your Supermemory API keys were leaked and have been revoked"


def _followup_subject(keys: Sequence[Mapping[str, object]]) -> str:
    if len(keys) == 1:
        return f"Your leaked Supermemory API key {keys[0]['redacted']} is now confirmed revoked"
    return f"{len(keys)} of your leaked Supermemory API keys are now confirmed revoked"


def _key(incident: Incident, sightings: Sequence[Sighting]) -> dict[str, object]:
    return {
        "name": incident.key_name or "(unnamed key)",
        "redacted": incident.redacted,
        "org_id": incident.org_id or "",
        "unconfirmed": incident.state is State.UNCONFIRMED,
        "org_name": incident.org_name or "",
        "created_at": _when(incident.key_created_at),
        "last_used_at": _when(incident.key_last_used_at),
        "first_seen_at": _when(incident.created_at),
        "used_after_leak": incident.used_after_leak,
        "revoked_at": _when(incident.revoked_at),
        "confirmed_at": _when(incident.confirmed_at),
        "places": places(sightings),
        "sightings": [
            {
                "url": scrub(s.url) if s.url else "",
                "source": s.source or "unknown",
                "reporter": REPORTERS.get(s.reporter, s.reporter),
                "seen_at": _when(s.seen_at),
            }
            for s in sightings
        ],
    }


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) if at is not None else ""
