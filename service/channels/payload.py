"""What a channel is told: a CloudEvents 1.0 event for webhooks, an incoming-webhook message for
Slack, both built from the incident as the store holds it (redacted form, ids, times, sightings),
never from a raw token or its hash, which this package never has.

Each event says what was true at its state: a `matched` event carries no revoke time even when it is
sent (or retried) after the revoke, so the same event is the same document however late it goes out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.store import ChannelJob, Incident, Sighting, State
from service.tokens import scrub

SOURCE = "/leak-responder"
TYPE = "com.supermemory.apikey.leak."
MEDIA_TYPE = "application/cloudevents+json"
_SLACK_SIGHTINGS = 10

_HEADLINE = {
    State.MATCHED: "found in public; revoking it now",
    State.REVOKED: "revoked",
    State.CONFIRMED: "revoked, and confirmed dead (the key now gets 401)",
    State.UNCONFIRMED: "revoked, but NOT confirmed dead: it may still work; rotate it now",
}


def event_id(job: ChannelJob) -> str:
    """Stable for (incident, channel, state): the same through every retry and on every replica,
    so a receiver can dedupe on it (it is also the `webhook-id`)."""
    digest = hashlib.sha256(f"{job.incident_id}\0{job.channel_id}\0{job.state}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def facts(job: ChannelJob, incident: Incident, sightings: Sequence[Sighting]) -> dict[str, Any]:
    """The event's `data`: the incident as it stood at the event's state."""
    revoked = job.state in (State.REVOKED, State.CONFIRMED, State.UNCONFIRMED)
    return {
        "incidentId": incident.id,
        "keyId": incident.key_id,
        "keyName": incident.key_name,
        "orgId": incident.org_id,
        "redacted": incident.redacted,
        "state": str(job.state),
        "firstSeenAt": iso(incident.created_at),
        "revokedAt": iso(incident.revoked_at) if revoked else None,
        "confirmedAt": iso(incident.confirmed_at) if job.state is State.CONFIRMED else None,
        "lastUsedAt": iso(incident.key_last_used_at),
        "usedAfterLeak": incident.used_after_leak,
        "sightings": [
            {"reporter": s.reporter, "source": s.source, "url": scrub(s.url) if s.url else None}
            for s in sightings
        ],
    }


def cloud_event(job: ChannelJob, incident: Incident, sightings: Sequence[Sighting]) -> bytes:
    event = {
        "specversion": "1.0",
        "id": event_id(job),
        "source": SOURCE,
        "type": TYPE + str(job.state),
        "time": iso(job.created_at),
        "subject": incident.key_id,
        "datacontenttype": "application/json",
        "data": facts(job, incident, sightings),
    }
    return json.dumps(event, separators=(",", ":")).encode()


def _slack_text(value: str) -> str:
    """Slack's mrkdwn treats &, < and > as markup: reporter URLs and key names are untrusted text."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(job: ChannelJob, incident: Incident, sightings: Sequence[Sighting]) -> bytes:
    data = facts(job, incident, sightings)
    name = _slack_text(incident.key_name or "(unnamed key)")
    org = _slack_text(incident.org_name or incident.org_id or "")
    headline = f"Supermemory API key {incident.redacted} ({name}) of {org}: {_HEADLINE[job.state]}"
    if incident.used_after_leak:
        headline += ". It was used after it leaked"
    fields = [
        ("State", str(job.state)),
        ("Incident", incident.id),
        ("First seen", data["firstSeenAt"]),
        ("Last used", data["lastUsedAt"] or "unknown"),
    ]
    if data["revokedAt"]:
        fields.append(("Revoked", data["revokedAt"]))
    if data["confirmedAt"]:
        fields.append(("Confirmed dead", data["confirmedAt"]))
    where = [
        f"• {_slack_text(s['url'] or '(no URL)')} ({_slack_text(s['source'] or 'unknown')},"
        f" {_slack_text(s['reporter'])})"
        for s in data["sightings"][:_SLACK_SIGHTINGS]
    ]
    if len(data["sightings"]) > _SLACK_SIGHTINGS:
        # A section's text holds 3,000 characters at most; the event and the API have them all.
        where.append(f"… and {len(data['sightings']) - _SLACK_SIGHTINGS} more")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]},
    ]
    if where:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": "*Found at*\n" + "\n".join(where)}}
        )
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"event {event_id(job)}"}]})
    return json.dumps({"text": headline, "blocks": blocks}, separators=(",", ":")).encode()
