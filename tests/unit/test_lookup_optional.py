"""The lookup's optional fields (createdAt, lastUsedAt, org): read when usable, each unusable one
left out with a reason code and its field path, and never in the way of the key itself."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest

from service.reasons import Reason
from service.store import ChannelType
from service.supermemory import KeyInfo, SupermemoryClient
from tests.unit.http_stub import stub

SECRET = "whsec_" + base64.b64encode(b"s" * 24).decode()
WEBHOOK = {"id": "wh", "type": "webhook", "url": "https://hooks.example/x", "secret": SECRET}
SLACK = {"id": "sl", "type": "slack", "url": "https://hooks.slack.com/services/T/B/x"}


def looked_up(**extra: Any) -> KeyInfo:
    entry = {
        "keyHash": "h" * 64,
        "id": "key_1",
        "orgId": "org_1",
        "name": "k",
        "enabled": True,
        "owner": {"email": "owner@example.test", "name": "Owner"},
        "notify": ["notify@example.test"],
        **extra,
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"keys": [entry]})

    async def go() -> KeyInfo:
        async with stub(handler) as server:
            client = SupermemoryClient(
                api_url=server.url, admin_url=server.url, admin_token="t", timeout=1, concurrency=1
            )
            try:
                return (await client.lookup(["h" * 64]))["h" * 64]
            finally:
                await client.aclose()

    return asyncio.run(go())


def test_an_older_admin_api_without_the_fields_still_works():
    key = looked_up()
    assert (key.created_at, key.last_used_at, key.org_name, key.channels, key.problems) == (
        None, None, None, [], [],
    )  # fmt: skip
    assert [r["role"] for r in key.recipients] == ["owner", "notify"]


def test_the_fields_when_all_are_usable():
    key = looked_up(
        createdAt="2025-01-02T03:04:05Z",
        lastUsedAt="2025-01-02T03:04:06.500+01:00",
        org={
            "name": "Acme",
            "admins": [{"email": "admin@example.test", "name": "Ad"}],
            "channels": [WEBHOOK, SLACK],
        },
    )
    assert key.created_at == 1735787045.0
    assert key.last_used_at == 1735787046.5 - 3600
    assert key.org_name == "Acme"
    assert key.recipients[-1] == {"email": "admin@example.test", "name": "Ad", "role": "admin"}
    assert [(c.id, c.type, c.url, c.secret) for c in key.channels] == [
        ("wh", ChannelType.WEBHOOK, WEBHOOK["url"], SECRET),
        ("sl", ChannelType.SLACK, SLACK["url"], None),
    ]
    assert key.problems == []
    assert SECRET not in repr(key.channels) and WEBHOOK["url"] not in repr(key.channels)
    assert looked_up(createdAt=None, lastUsedAt=None, org=None).problems == []


@pytest.mark.parametrize(
    ("extra", "problems"),
    [
        ({"createdAt": 1735787045}, [(Reason.LOOKUP_FIELD_MALFORMED, "createdAt")]),
        ({"lastUsedAt": "yesterday"}, [(Reason.LOOKUP_FIELD_MALFORMED, "lastUsedAt")]),
        ({"lastUsedAt": "2025-01-02T03:04:05"}, [(Reason.LOOKUP_FIELD_MALFORMED, "lastUsedAt")]),
        ({"org": ["Acme"]}, [(Reason.LOOKUP_FIELD_MALFORMED, "org")]),
        ({"org": {"name": 7}}, [(Reason.LOOKUP_FIELD_MALFORMED, "org.name")]),
        ({"org": {"admins": "a@x"}}, [(Reason.LOOKUP_FIELD_MALFORMED, "org.admins")]),
        ({"org": {"admins": [{"name": "no address"}]}}, [(Reason.LOOKUP_FIELD_MALFORMED, "org.admins[0]")]),
        ({"org": {"channels": {"id": "x"}}}, [(Reason.CHANNEL_MALFORMED, "org.channels")]),
        ({"org": {"channels": [{**WEBHOOK, "url": ""}]}}, [(Reason.CHANNEL_MALFORMED, "org.channels[0]")]),
        (
            {"org": {"channels": [{"id": "x", "type": "slack"}]}},
            [(Reason.CHANNEL_MALFORMED, "org.channels[0]")],
        ),
        (
            {"org": {"channels": [{**SLACK, "type": "teams"}]}},
            [(Reason.CHANNEL_MALFORMED, "org.channels[0]")],
        ),
        (
            {"org": {"channels": [{**WEBHOOK, "secret": "s3cret"}]}},
            [(Reason.CHANNEL_MALFORMED, "org.channels[0]")],
        ),
        (
            {"org": {"channels": [{**WEBHOOK, "secret": "whsec_!!"}]}},
            [(Reason.CHANNEL_MALFORMED, "org.channels[0]")],
        ),
        (
            {"org": {"channels": [{**WEBHOOK, "secret": None}]}},
            [(Reason.CHANNEL_MALFORMED, "org.channels[0]")],
        ),
        ({"org": {"channels": [SLACK, SLACK]}}, [(Reason.CHANNEL_MALFORMED, "org.channels[1]")]),
    ],
)
def test_an_unusable_field_is_left_out_with_its_reason(extra, problems):
    key = looked_up(**extra)
    assert key.problems == problems
    assert (key.id, key.org_id, [r["email"] for r in key.recipients][:2]) == (
        "key_1", "org_1", ["owner@example.test", "notify@example.test"],
    )  # fmt: skip


def test_the_usable_parts_beside_an_unusable_one_are_kept():
    key = looked_up(
        createdAt=3,
        org={"name": "Acme", "admins": [{"email": "a@x.test"}, 5], "channels": [{"id": "bad"}, SLACK]},
    )
    assert key.org_name == "Acme"
    assert [r["email"] for r in key.recipients if r["role"] == "admin"] == ["a@x.test"]
    assert [c.id for c in key.channels] == ["sl"]
    assert [p for _, p in key.problems] == ["org.admins[1]", "org.channels[0]", "createdAt"]
