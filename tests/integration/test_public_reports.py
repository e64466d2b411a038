"""Public reports over real HTTP: anyone may send a leaked key, and the answer tells them nothing
about it; limits before any work; the page and security.txt that lead people there."""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
import time

import httpx
import pytest

from service.tokens import token_hash
from tests.harness import metric, wait_until
from tests.integration.public_helpers import assert_received, public, stable_headers

pytestmark = pytest.mark.integration

PROXY = {"LEAK_RESPONDER_TRUSTED_PROXIES": "127.0.0.0/8"}


def sightings(service, token: str) -> list[tuple[str, str | None, str | None]]:
    with service.db() as conn:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT s.reporter, s.url, s.source FROM sightings s JOIN incidents i ON i.id = s.incident_id"
                " WHERE i.token_hash = ? ORDER BY s.id",
                (token_hash(token),),
            )
        ]


def public_outcome(service, outcome: str) -> float:
    text = service.http.get(f"{service.url}/metrics").text
    return metric(text, "leak_responder_public_reports_total", outcome=outcome)


def test_a_pasted_key_is_revoked_and_its_owner_told_a_member_of_the_public_reported_it(
    sandbox, make_service, smtp
):
    service = make_service(smtp.env())
    key = sandbox.supermemory.keys[1]
    response = public(service, f"found this in a paste:\nSUPERMEMORY_API_KEY={key.token}\n")
    assert_received(response)
    service.wait_state(key.token, "closed")
    assert sightings(service, key.token) == [("public", None, None)]
    message = smtp.to(key.owner_email)[0]
    for part in (message.part("plain"), message.part("html")):
        assert "reported by a member of the public" in part
    assert key.token.encode() not in message.raw
    text = service.http.get(f"{service.url}/metrics").text
    assert metric(text, "leak_responder_public_reports_total", outcome="received") == 1
    assert metric(text, "leak_responder_public_keys_found_total") == 1


def test_json_with_a_url_and_encoded_keys(sandbox, service):
    live, other = sandbox.tokens[0], sandbox.tokens[2]
    encoded = base64.b64encode(f'{{"apiKey":"{other}"}}'.encode()).decode()
    url = "https://pastebin.example/raw/Xy12"
    assert_received(public(service, {"text": f"{live}\nblob: {encoded}", "url": url}))
    service.wait_state(live, "confirmed")
    service.wait_state(other, "confirmed")
    assert sightings(service, live) == sightings(service, other) == [("public", url, None)]
    # A second report of the same key adds a sighting, not a second revocation.
    assert_received(public(service, {"text": live, "url": "https://elsewhere.example/p/1"}))
    wait_until(lambda: len(sightings(service, live)) == 2)
    assert sandbox.supermemory.stats()["effective_revokes"][sandbox.supermemory.keys[0].id] == 1


def test_nothing_found_is_received_all_the_same_and_recorded_hash_only(sandbox, service):
    assert_received(public(service, "just some text, no key here"))
    assert_received(public(service, {"text": "sm_notakey_but_shaped_like_one_abcdefghijk"}))
    with service.db() as conn:
        rows = conn.execute("SELECT reporter, item_count, new_incidents FROM alerts").fetchall()
    assert [tuple(r) for r in rows] == [("public", 0, 0), ("public", 0, 0)]
    assert service.count("incidents") == 0
    assert sandbox.supermemory.stats()["calls"]["lookup"] == 0


@pytest.mark.parametrize(
    "content_type",
    ["", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html", "image/png"],
)
def test_other_content_types_are_415_and_change_nothing(sandbox, service, content_type):
    response = public(service, f"key {sandbox.tokens[0]}", content_type=content_type)
    assert response.status_code == 415
    assert response.json()["error"] == "public_report_unsupported_type"
    assert service.count("alerts") == 0 and service.count("incidents") == 0
    assert public_outcome(service, "public_report_unsupported_type") == 1
    assert service.failures("public", "public_report_unsupported_type") == 1
    wait_until(lambda: service.logged("public_report_unsupported_type"))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_over_64_kib_is_413_counted_while_reading(sandbox, service, chunked):
    body = (sandbox.tokens[0] + "\n" + "x" * (64 * 1024)).encode()
    content = (body[i : i + 4096] for i in range(0, len(body), 4096)) if chunked else body
    response = httpx.post(
        f"{service.url}/v1/public/reports", content=content, headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 413 and response.json()["error"] == "public_report_too_large"
    assert service.count("alerts") == 0 and service.count("incidents") == 0
    # Exactly at the limit is fine.
    assert_received(public(service, "y" * (64 * 1024)))


def test_more_keys_than_the_cap_is_413_and_changes_nothing(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_PUBLIC_MAX_KEYS": "2"})
    response = public(service, "\n".join(sandbox.tokens[:3]))
    assert response.status_code == 413 and response.json()["error"] == "public_report_too_many_keys"
    assert service.count("alerts") == 0 and service.count("incidents") == 0
    assert sandbox.supermemory.stats()["calls"]["lookup"] == 0
    assert service.failures("public", "public_report_too_many_keys") == 1
    assert_received(public(service, "\n".join(sandbox.tokens[:2] * 3)))


def test_a_client_over_its_rate_is_429_before_any_work(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_PUBLIC_RATE": "3/minute"})
    for _ in range(3):
        assert_received(public(service, "nothing"))
    refused = public(service, f"now a key {sandbox.tokens[0]}")
    assert refused.status_code == 429 and refused.json()["error"] == "public_rate_limited"
    assert refused.headers["retry-after"] == "20"
    assert service.count("alerts") == 3 and service.count("incidents") == 0
    # Before any work: refused whatever the body, even one that would be a 415 or a 413.
    assert public(service, "x", content_type="text/html").status_code == 429
    assert public(service, "x" * (100 * 1024)).status_code == 429
    assert public_outcome(service, "public_rate_limited") == 3
    assert service.failures("public", "public_rate_limited") == 3
    wait_until(lambda: len(service.logged("public_rate_limited")) == 3)


def test_forwarded_clients_count_apart_only_behind_a_trusted_proxy(sandbox, make_service, tmp_path):
    (tmp_path / "trusting").mkdir()
    trusting = make_service(
        {"LEAK_RESPONDER_PUBLIC_RATE": "2/minute", **PROXY}, workdir=tmp_path / "trusting"
    )
    for client in ("198.51.100.1", "198.51.100.2"):
        for _ in range(2):
            assert_received(public(trusting, "nothing", client=client))
        assert public(trusting, "nothing", client=client).status_code == 429
    # A hop the client wrote itself (left of the proxy's) is not believed.
    assert public(trusting, "nothing", client="203.0.113.9, 198.51.100.1").status_code == 429

    (tmp_path / "direct").mkdir()
    direct = make_service({"LEAK_RESPONDER_PUBLIC_RATE": "2/minute"}, workdir=tmp_path / "direct")
    assert_received(public(direct, "nothing", client="198.51.100.1"))
    assert_received(public(direct, "nothing", client="198.51.100.2"))
    assert public(direct, "nothing", client="198.51.100.3").status_code == 429, "header ignored"
    # No client address anywhere in what either service keeps.
    for service in (trusting, direct):
        service.stop()
        for path in service.workdir.glob("leak-responder.db*"):
            blob = path.read_bytes()
            assert b"198.51.100" not in blob and b"127.0.0.1" not in blob, path.name
        assert b"198.51.100" not in service.log_path.read_bytes()


def test_everyones_rate_pages_once_with_a_count(sandbox, make_service, sentry):
    service = make_service({"LEAK_RESPONDER_PUBLIC_GLOBAL_RATE": "4/second", **PROXY, **sentry.env()})
    answers = [public(service, "nothing", client=f"198.51.100.{i}") for i in range(12)]
    statuses = [a.status_code for a in answers]
    assert statuses.count(202) >= 4 and statuses.count(429) >= 6, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"] == "public_global_rate_limited"
    assert refused.headers["retry-after"] == "1"
    pages = wait_until(lambda: sentry.pages("public_reports_flooded"), timeout=10)
    time.sleep(1.5)
    pages = sentry.pages("public_reports_flooded")
    assert len(pages) == 1, "one page for the flood, not one per request"
    assert pages[0]["tags"]["count"] == str(statuses.count(429))
    assert service.failures("public", "public_global_rate_limited") == statuses.count(429)
    assert service.failures("alerting", "public_reports_flooded") == 1


def test_a_store_that_cannot_commit_is_503(sandbox, service):
    with sqlite3.connect(service.db_path) as conn:
        conn.execute("CREATE TRIGGER no_alerts BEFORE INSERT ON alerts BEGIN SELECT RAISE(ABORT, 'x'); END")
    response = public(service, f"key {sandbox.tokens[0]}")
    assert response.status_code == 503 and response.json()["error"] == "store_unavailable"
    assert service.count("incidents") == 0
    assert public_outcome(service, "store_unavailable") == 1


def test_no_oracle_in_status_body_or_headers(sandbox, make_service):
    """Nothing, a non-key, a key-shaped unknown, a revoked key and a live key: the same answer."""
    service = make_service({"LEAK_RESPONDER_PUBLIC_RATE": "100/second"})
    revoked = sandbox.tokens[3]
    service.post_alert(sandbox.github, [revoked])
    service.wait_state(revoked, "confirmed")
    unknown = f"sm_{secrets.token_hex(11)}_{secrets.token_hex(32)}"
    bodies = {
        "nothing": "hello, nothing to see",
        "non-key": "password=hunter2",
        "unknown": f"key {unknown}",
        "revoked": f"key {revoked}",
        "live": f"key {sandbox.tokens[4]}",
    }
    answers = {name: public(service, body) for name, body in bodies.items()}
    answers["live-json"] = public(service, {"text": sandbox.tokens[5], "url": "https://x.example/a"})
    for answer in answers.values():
        assert_received(answer)
    assert len({(a.status_code, a.content, tuple(stable_headers(a))) for a in answers.values()}) == 1
    service.wait_state(sandbox.tokens[4], "confirmed")
    service.wait_state(unknown, "false_positive")


def test_the_report_page_posts_to_the_endpoint(sandbox, service):
    page = httpx.get(f"{service.url}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    form = re.search(r"<form ([^>]*)>", html)
    assert form is not None
    assert 'action="/v1/public/reports"' in form.group(1) and 'method="post"' in form.group(1)
    assert 'enctype="text/plain"' in form.group(1)
    assert re.search(r'name="url"[^>]*type="url"', html) and 'name="text"' in html
    assert html.index('name="url"') < html.index('name="text"'), "the URL field must come first"
    # No external assets, no script: nothing fetched from elsewhere.
    assert not re.search(r"<(script|link|img|iframe)\b", html, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "form-action 'self'" in page.headers["content-security-policy"]

    # What a browser sends for that form (text/plain encoding, the URL field first).
    live = sandbox.tokens[0]
    body = f"url=https://gist.example/u/9\r\ntext=found:\r\n{live}\r\n"
    assert_received(public(service, body))
    service.wait_state(live, "confirmed")
    assert sightings(service, live) == [("public", "https://gist.example/u/9", None)]


def test_security_txt_points_at_the_report_page(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_SECURITY_CONTACT": "security@example.test"})
    response = httpx.get(f"{service.url}/.well-known/security.txt")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    fields = [tuple(line.split(": ", 1)) for line in response.text.splitlines()]
    assert fields[:2] == [("Contact", "mailto:security@example.test"), ("Contact", f"{service.url}/report")]
    values = dict(fields[2:])
    assert values["Canonical"] == f"{service.url}/.well-known/security.txt"
    assert values["Policy"] == f"{service.url}/report"
    expires = time.mktime(time.strptime(values["Expires"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert time.time() + 150 * 86400 < expires < time.time() + 365 * 86400
    # Behind a trusted proxy that ended TLS, the public origin is https.
    (service.workdir / "behind").mkdir()
    behind = make_service({**PROXY}, workdir=service.workdir / "behind")
    proxied = httpx.get(f"{behind.url}/.well-known/security.txt", headers={"X-Forwarded-Proto": "https"})
    assert f"Canonical: https://127.0.0.1:{behind.port}/.well-known/security.txt" in proxied.text
    assert "mailto:" not in proxied.text, "no security contact set there"
    untrusted = httpx.get(f"{service.url}/.well-known/security.txt", headers={"X-Forwarded-Proto": "https"})
    assert "Canonical: http://" in untrusted.text


def test_received_is_durable_before_the_answer(sandbox, service):
    """The 202 comes after the intake's commit: a kill right after it loses nothing."""
    live = sandbox.tokens[1]
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 3000})
    assert_received(public(service, live))
    service.kill()
    assert service.state(live) == "received"
    sandbox.supermemory.set_knobs(latency_ms={})
    restarted = service.start()
    restarted.wait_state(live, "confirmed", timeout=30)
