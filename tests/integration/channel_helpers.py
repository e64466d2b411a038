"""Channels for integration tests: a real receiver on loopback (the sandbox's), keys whose org has
channels pointing at it, and checks of what arrived with the reference Standard Webhooks package."""

from __future__ import annotations

import json
from typing import Any

from standardwebhooks.webhooks import Webhook

from service.sandbox import ChannelReceiver, Received, channel_secret

ALLOW_LOOPBACK = {"LEAK_RESPONDER_CHANNEL_ALLOWED_NETWORKS": "127.0.0.1/32"}
STATES = ["matched", "revoked", "confirmed"]


def webhook(base: str, name: str, seed: str = "tests") -> dict[str, str]:
    return {
        "id": f"wh_{name}",
        "type": "webhook",
        "url": f"{base}/hooks/{name}",
        "secret": channel_secret(seed, name),
    }


def slack(base: str, name: str) -> dict[str, str]:
    return {"id": f"sl_{name}", "type": "slack", "url": f"{base}/slack/{name}"}


def register(receiver: ChannelReceiver, *channels: dict[str, str]) -> None:
    for channel in channels:
        if channel["type"] == "webhook":
            receiver.add_secret("/hooks/" + channel["url"].rsplit("/", 1)[1], channel["secret"])


def verified_events(received: list[Received], secret: str) -> list[dict[str, Any]]:
    """Each delivery checked by the reference implementation (it raises on a bad signature), then
    parsed: what a receiver built on `standardwebhooks` would accept."""
    events = []
    for r in received:
        assert r.headers["content-type"] == "application/cloudevents+json"
        Webhook(secret).verify(r.body, r.headers)
        events.append(json.loads(r.body))
    return events
