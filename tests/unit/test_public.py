"""Public reports' pieces that need no server: who the client is, what a body holds, the names a
client gets in the store, the once-per-condition page, and the settings."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json

import pytest

from service.alerting import Gathering, Pager
from service.inbound import BodyBudget
from service.inbound.public import (
    REPORT_LIMIT,
    ClientNames,
    PublicError,
    client_address,
    media_type,
    parse_public,
    read_public,
)
from service.reasons import Reason
from service.sandbox import seeded_keys
from service.settings import Rate, Settings, SettingsError
from service.tokens import token_hash

KEYS = [k.token for k in seeded_keys(6, seed="public-unit")]
KEY, OTHER = KEYS[0], KEYS[1]
PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


# -- the client ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        pytest.param("203.0.113.7", [], "203.0.113.7", id="direct"),
        pytest.param("203.0.113.7", ["198.51.100.1"], "203.0.113.7", id="untrusted-peer-header-ignored"),
        pytest.param("10.1.2.3", ["198.51.100.1"], "198.51.100.1", id="trusted-proxy"),
        pytest.param("10.1.2.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1", id="client-written-hop-ignored"),
        pytest.param("10.1.2.3", ["6.6.6.6", "198.51.100.1, 10.9.9.9"], "198.51.100.1", id="two-proxies"),
        pytest.param("10.1.2.3", [], "10.1.2.3", id="trusted-without-header"),
        pytest.param("10.1.2.3", ["10.4.4.4"], "10.4.4.4", id="all-hops-trusted"),
        pytest.param("2001:db8:1:2:3:4:5:6", [], "2001:db8:1:2::/64", id="ipv6-is-its-64"),
        pytest.param("::ffff:203.0.113.7", [], "203.0.113.7", id="ipv4-mapped"),
        pytest.param("10.1.2.3", ["not-an-ip"], "not-an-ip", id="garbage-hop-is-its-own-client"),
        pytest.param(None, [], "unknown", id="no-peer"),
    ],
)
def test_client_address(peer, forwarded, client):
    assert client_address(peer, forwarded, PROXIES) == client


def test_client_names_are_keyed_hashes_that_rotate_daily():
    clock = [1_000_000.0]
    names = ClientNames(b"k" * 32, clock=lambda: clock[0])
    first = names.name("203.0.113.7")
    assert first.startswith("client:") and "203" not in first
    assert names.name("203.0.113.7") == first
    assert names.name("203.0.113.8") != first
    assert ClientNames(b"j" * 32, clock=lambda: clock[0]).name("203.0.113.7") != first
    clock[0] += 86400
    assert names.name("203.0.113.7") != first


# -- the body --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "text/plain; charset=utf-8", "application/json", "Application/JSON; charset=UTF-8"],
)
def test_accepted_media_types(content_type):
    assert media_type(content_type) in ("text/plain", "application/json")


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html",
     "application/jsonl", "application/octet-stream"],
)  # fmt: skip
def test_other_media_types_are_415(content_type):
    with pytest.raises(PublicError) as caught:
        media_type(content_type)
    assert caught.value.reason is Reason.PUBLIC_REPORT_UNSUPPORTED_TYPE and caught.value.status == 415


def hashes(report) -> list[str]:
    return [f.token_hash for f in report.findings]


def test_plain_text_in_every_encoding_the_detector_knows():
    encoded = base64.b64encode(f'{{"key": "{OTHER}"}}'.encode()).decode()
    body = f"leaked: {KEY}\nconfig: {encoded}\nagain {KEY}\n".encode()
    report = parse_public(body, "text/plain", 20)
    assert hashes(report) == [token_hash(KEY), token_hash(OTHER)]
    assert report.url is None


def test_json_text_and_url():
    body = json.dumps({"text": f"x {KEY} y", "url": "https://pastebin.example/raw/abc"}).encode()
    report = parse_public(body, "application/json", 20)
    assert hashes(report) == [token_hash(KEY)]
    assert report.url == "https://pastebin.example/raw/abc"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(f'{{"text": 5, "other": "{KEY}"}}', id="text-not-a-string"),
        pytest.param(f'["{KEY}"]', id="a-list"),
        pytest.param(f"not json at all {KEY}", id="not-json"),
        pytest.param(f'{{"text": "{KEY}"', id="truncated"),
    ],
)
def test_json_of_another_shape_is_scanned_as_text(body):
    """A key sent the wrong way is still a leaked key: nothing is refused for its shape."""
    report = parse_public(body.encode(), "application/json", 20)
    assert hashes(report) == [token_hash(KEY)] and report.url is None


def test_bytes_that_are_not_utf8_do_not_hide_a_key():
    report = parse_public(b"\xff\xfe junk " + KEY.encode() + b" \xc3", "text/plain", 20)
    assert hashes(report) == [token_hash(KEY)]


def test_the_report_pages_form_encoding():
    body = f"url=https://gist.example/u/1\r\ntext=found this: {KEY}\r\nurl=https://no.example/\r\n".encode()
    report = parse_public(body, "text/plain", 20)
    assert hashes(report) == [token_hash(KEY)]
    assert report.url == "https://gist.example/u/1"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("javascript:alert(1)", id="not-http"),
        pytest.param("https://", id="no-host"),
        pytest.param("https://x.example/a b", id="whitespace"),
        pytest.param("https://x.example/" + "a" * 3000, id="too-long"),
        pytest.param(f"https://x.example/?k={OTHER}", id="holds-a-key"),
        pytest.param(
            "https://x.example/?k=" + base64.b64encode(OTHER.encode()).decode(), id="holds-encoded-key"
        ),
        pytest.param("https://x.example/?k=sm_short_but_keyish_a1b2c3d4e5f6", id="key-shaped"),
    ],
)
def test_unusable_urls_are_dropped_but_their_keys_kept(url):
    report = parse_public(json.dumps({"text": KEY, "url": url}).encode(), "application/json", 20)
    assert report.url is None
    assert token_hash(KEY) in hashes(report)
    # A key in the URL, plain or encoded, is found and revoked like the one in the text.
    assert (token_hash(OTHER) in hashes(report)) == ("k=" in url and "keyish" not in url)


def test_holds_encoded_key_case_finds_the_key_in_the_url():
    url = "https://x.example/?k=" + base64.b64encode(OTHER.encode()).decode()
    report = parse_public(json.dumps({"text": "nothing", "url": url}).encode(), "application/json", 20)
    assert hashes(report) == [token_hash(OTHER)] and report.url is None


def test_more_distinct_keys_than_the_cap_is_413():
    keys = KEYS[:4]
    body = "\n".join(keys + keys).encode()
    assert len(parse_public(body, "text/plain", 4).findings) == 4
    with pytest.raises(PublicError) as caught:
        parse_public(body, "text/plain", 3)
    assert caught.value.reason is Reason.PUBLIC_REPORT_TOO_MANY_KEYS and caught.value.status == 413
    assert not any(k[:8] in caught.value.message for k in keys)


@pytest.mark.parametrize("size", [REPORT_LIMIT, REPORT_LIMIT + 1])
def test_the_size_limit_is_counted_while_reading(size):
    async def chunks():
        for start in range(0, size, 1000):
            yield b"x" * min(1000, size - start)

    async def read():
        return await read_public(chunks(), {}, BodyBudget(2 * REPORT_LIMIT))

    if size <= REPORT_LIMIT:
        assert len(asyncio.run(read())) == size
    else:
        with pytest.raises(PublicError) as caught:
            asyncio.run(read())
        assert caught.value.reason is Reason.PUBLIC_REPORT_TOO_LARGE and caught.value.status == 413


# -- the once-per-condition page -------------------------------------------------------------------


class Recorder(Pager):
    def __init__(self) -> None:
        flood = Gathering(gather=0.2, window=0.3, until_quiet=True)
        super().__init__(conditions={Reason.PUBLIC_REPORTS_FLOODED: flood})
        self.pages: list[tuple[Reason, str, dict[str, str]]] = []

    def _deliver(self, code, message, tags, context) -> None:
        super()._deliver(code, message, tags, context)
        self.pages.append((code, message, dict(tags)))


def test_a_flood_pages_once_with_its_count_and_again_after_a_quiet_spell():
    async def scenario() -> list[tuple[Reason, str, dict[str, str]]]:
        pager = Recorder()

        def refused() -> None:
            pager.page(Reason.PUBLIC_REPORTS_FLOODED, "flooded", {}, {})

        for _ in range(50):
            refused()
        await asyncio.sleep(0.25)
        assert len(pager.pages) == 1
        for _ in range(10):
            refused()
            await asyncio.sleep(0.05)
        assert len(pager.pages) == 1, "one page while the condition lasts"
        await asyncio.sleep(0.5)
        refused()
        await asyncio.sleep(0.3)
        return pager.pages

    pages = asyncio.run(scenario())
    assert [(code, tags["count"]) for code, _, tags in pages] == [
        (Reason.PUBLIC_REPORTS_FLOODED, "50"),
        (Reason.PUBLIC_REPORTS_FLOODED, "1"),
    ]
    assert "50 in 0.2 s" in pages[0][1]


# -- settings --------------------------------------------------------------------------------------

BASE = {
    "LEAK_RESPONDER_SUPERMEMORY_API_URL": "http://127.0.0.1:1",
    "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "t",
}


def test_public_settings_defaults_and_parsing():
    settings = Settings.load(BASE, env_file=None)
    assert settings.public_rate == Rate(10, 60.0) and str(settings.public_rate) == "10/minute"
    assert settings.public_global_rate == Rate(300, 60.0)
    assert settings.public_max_keys == 20 and settings.trusted_proxies == ()
    custom = Settings.load(
        {
            **BASE,
            "LEAK_RESPONDER_PUBLIC_RATE": "3/second",
            "LEAK_RESPONDER_PUBLIC_GLOBAL_RATE": "1000/hour",
            "LEAK_RESPONDER_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8",
        },
        env_file=None,
    )
    assert (custom.public_rate, custom.public_global_rate) == (Rate(3, 1.0), Rate(1000, 3600.0))
    assert custom.trusted_proxies == PROXIES
    shown = dict(custom.describe())
    assert shown["LEAK_RESPONDER_PUBLIC_RATE"] == "3/second"
    assert shown["LEAK_RESPONDER_TRUSTED_PROXIES"] == "10.0.0.0/8,fd00::/8"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEAK_RESPONDER_PUBLIC_RATE", "10"),
        ("LEAK_RESPONDER_PUBLIC_RATE", "0/minute"),
        ("LEAK_RESPONDER_PUBLIC_RATE", "10/fortnight"),
        ("LEAK_RESPONDER_PUBLIC_GLOBAL_RATE", "-1/second"),
        ("LEAK_RESPONDER_PUBLIC_MAX_KEYS", "0"),
        ("LEAK_RESPONDER_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("LEAK_RESPONDER_TRUSTED_PROXIES", "proxy.internal"),
    ],
)
def test_bad_public_settings_name_themselves(name, value):
    with pytest.raises(SettingsError) as caught:
        Settings.load({**BASE, name: value}, env_file=None)
    assert caught.value.name == name
