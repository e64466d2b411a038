"""The operator console in a real Chromium against the real service: sign in, watch an alert arrive
and reach `confirmed` on a list that refreshes itself, read its timeline, retry a stuck incident,
report a paste, sign out; a wrong token is refused. One browser and one service serve the whole
module (a Chromium start costs seconds), so the tests run in file order, each from where the last
one left the browser. Every page is also screenshotted into the module's temporary directory."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from service.tokens import redact
from tests.harness import Sandbox, Service, wait_until
from tests.integration.console_helpers import accessible, chromium, screenshot, text, wait_for
from tests.integration.operator_helpers import TOKENS, operator_env, report

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


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
def browser() -> Iterator[WebDriver]:
    driver = chromium()
    yield driver
    driver.quit()


def visit(browser: WebDriver, service: Service, path: str) -> None:
    browser.get(f"{service.url}{path}")


def no_raw_tokens(browser: WebDriver, sandbox: Sandbox) -> None:
    html = browser.page_source
    for token in sandbox.tokens:
        assert token not in html


def test_a_wrong_token_is_refused_and_logged(browser, service, shots):
    visit(browser, service, "/console/incidents")
    assert browser.current_url.startswith(f"{service.url}/console/login?next=")
    browser.find_element(By.ID, "token").send_keys("not-an-operator-token")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "signin-error"))
    assert "not an operator" in text(browser, "#signin-error")
    assert browser.get_cookies()[0]["name"] == "leak_responder_console"
    assert not any(
        c.get("value", "").count(".") == 1 and "alice" in c["value"] for c in browser.get_cookies()
    )
    wait_until(lambda: any(r.get("stage") == "console" for r in service.logged("auth_forbidden")))
    accessible(browser)
    screenshot(browser, shots / "login-refused.png")


def test_sign_in_then_an_alert_appears_and_reaches_confirmed(browser, service, sandbox, shots):
    browser.find_element(By.ID, "token").send_keys(TOKENS["alice"])
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    # Back where the sign-in page was asked for: the incident list.
    wait_for(browser, lambda: browser.current_url == f"{service.url}/console/incidents")
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # loopback: the one place a cookie goes without Secure
    assert text(browser, ".mode") == "ENFORCE"
    assert "No incident matches" in text(browser, "#rows")

    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    # No reload: the page fetches its rows again by itself until the incident is confirmed.
    row = f"//tbody[@id='rows']/tr[.//code[text()='{redact(token)}']]"
    wait_for(browser, lambda: browser.find_elements(By.XPATH, f"{row}//span[text()='confirmed']"))
    cells = [c.text for c in browser.find_elements(By.XPATH, f"{row}/td")]
    assert cells[0] == redact(token)
    assert cells[1] == sandbox.supermemory.keys[0].org_id
    assert cells[2] == "github"
    assert cells[3] == "confirmed"
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", cells[5]) and re.fullmatch(r"\d+ ms|\d+\.\d s", cells[6])
    assert browser.find_element(By.ID, "rows").get_attribute("data-updated")
    no_raw_tokens(browser, sandbox)
    accessible(browser)
    screenshot(browser, shots / "incidents.png")


def test_filters_narrow_the_list(browser, service, sandbox):
    visit(browser, service, "/console/incidents?state=false_positive")
    assert "No incident matches" in text(browser, "#rows")
    visit(browser, service, "/console/incidents?reporter=github&state=confirmed")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rows tr")) == 1
    assert browser.find_element(By.CSS_SELECTOR, "#f-state option[selected]").text == "confirmed"
    visit(browser, service, "/console/incidents?state=bogus")
    assert text(browser, "#reason") == "query_invalid"


def test_the_incident_page_draws_its_timeline(browser, service, sandbox, shots):
    visit(browser, service, "/console/incidents")
    browser.find_element(By.CSS_SELECTOR, "#rows a").click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "timeline"))
    assert text(browser, "#incident-state") == "confirmed"
    stages = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#timeline .stage")]
    assert stages == ["received", "matched", "revoked", "confirmed"]
    gaps = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#timeline .gap")]
    assert len(gaps) == 3 and all(re.fullmatch(r"\+(\d+ ms|\d+\.\d s)", g) for g in gaps)
    marks = browser.find_elements(By.CSS_SELECTOR, "#timeline .mark circle")
    xs = [float(m.get_attribute("cx")) for m in marks]
    assert xs == sorted(xs) and len(set(xs)) == 4
    link = browser.find_element(By.LINK_TEXT, "https://github.com/octocat/demo/blob/main/.env")
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert not browser.find_elements(By.ID, "retry")  # confirmed: nothing to retry
    no_raw_tokens(browser, sandbox)
    accessible(browser)
    screenshot(browser, shots / "incident.png")


def test_retry_a_stuck_incident(browser, service, sandbox, shots):
    sandbox.supermemory.set_knobs(never_revoke=True)
    token = sandbox.tokens[1]
    incident_id = report(service, {"tokens": [token]}).json()["findings"][0]["incident_id"]
    service.wait_state(token, "unconfirmed", timeout=30)
    visit(browser, service, f"/console/incidents/{incident_id}")
    assert text(browser, "#incident-state") == "unconfirmed"
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#timeline .bad .stage")] == [
        "unconfirmed"
    ]
    screenshot(browser, shots / "incident-stuck.png")

    sandbox.supermemory.set_knobs(never_revoke=False)
    browser.find_element(By.ID, "retry").click()
    wait_for(browser, lambda: "Retry requested" in browser.page_source)
    assert browser.current_url == f"{service.url}/console/incidents/{incident_id}?retried=1"
    service.wait_state(token, "confirmed")
    browser.refresh()
    assert text(browser, "#incident-state") == "confirmed"
    stages = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#timeline .stage")]
    assert stages[-3:] == ["retry requested", "revoked", "confirmed"]
    assert "operator=alice" in browser.find_element(By.TAG_NAME, "details").get_attribute("innerHTML")
    no_raw_tokens(browser, sandbox)
    screenshot(browser, shots / "incident-retried.png")


def test_report_a_paste(browser, service, sandbox, shots):
    token = sandbox.tokens[2]
    visit(browser, service, "/console/report")
    accessible(browser)
    browser.find_element(By.ID, "text").send_keys(f"deploy log\nSUPERMEMORY_API_KEY={token}\n")
    browser.find_element(By.ID, "url").send_keys("https://chat.example/leak")
    browser.find_element(By.ID, "scan").click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "findings"))
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#findings td")]
    assert cells == [redact(token), "high", "plain", "2:21"]
    assert service.incident(token) is None  # a scan reports nothing
    no_raw_tokens(browser, sandbox)
    accessible(browser)
    screenshot(browser, shots / "report-review.png")

    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda: browser.find_elements(By.ID, "reported"))
    incident_id = service.incident(token)["id"]
    assert browser.find_element(By.LINK_TEXT, incident_id)
    service.wait_state(token, "confirmed")
    with service.db() as conn:
        (sighting,) = conn.execute("SELECT * FROM sightings WHERE incident_id = ?", (incident_id,)).fetchall()
    assert (sighting["reporter"], sighting["operator"], sighting["url"]) == (
        "manual",
        "alice",
        "https://chat.example/leak",
    )
    no_raw_tokens(browser, sandbox)
    screenshot(browser, shots / "report-done.png")


def test_overview_shows_states_timings_and_mode(browser, service, sandbox, shots):
    visit(browser, service, "/console/")
    assert "ENFORCE" in text(browser, "#mode")
    desc = browser.find_element(By.CSS_SELECTOR, ".bars desc").get_attribute("textContent")
    assert "confirmed: 3." in desc and "unconfirmed: 0." in desc
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, ".plot figcaption")]
    assert len(captions) == 4
    assert all(re.search(r"p50 .+, p95 .+ over 3 incidents\.", c) for c in captions)
    assert browser.find_elements(By.CSS_SELECTOR, "circle.p50") and browser.find_elements(
        By.CSS_SELECTOR, "rect.p95"
    )
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#caches td")][:2] == ["github", "1"]
    no_raw_tokens(browser, sandbox)
    accessible(browser)
    screenshot(browser, shots / "overview.png")


def test_a_phone_gets_cards_not_a_wide_table(browser, service, shots):
    browser.set_window_size(390, 844)
    try:
        visit(browser, service, "/console/incidents")
        accessible(browser)
        assert not browser.find_element(By.CSS_SELECTOR, "table.incidents thead th").is_displayed()
        label = browser.execute_script(
            "return getComputedStyle(document.querySelector('#rows td'), '::before').content"
        )
        assert label == '"Key: "'
        browser.save_screenshot(str(shots / "incidents-phone.png"))
    finally:
        browser.set_window_size(1280, 900)


def test_resolve_an_unconfirmed_incident_by_hand(browser, service, sandbox, shots):
    sandbox.supermemory.set_knobs(never_revoke=True)
    token = sandbox.tokens[3]
    incident_id = report(service, {"tokens": [token]}).json()["findings"][0]["incident_id"]
    service.wait_state(token, "unconfirmed", timeout=30)
    visit(browser, service, f"/console/incidents/{incident_id}")
    # A note that holds a key is refused, and the incident stays as it was.
    browser.find_element(By.ID, "resolve-note").send_keys(f"it was {token}")
    browser.find_element(By.ID, "resolve").click()
    wait_for(browser, lambda: "report_note_holds_key" in browser.page_source)
    assert service.state(token) == "unconfirmed"
    no_raw_tokens(browser, sandbox)

    visit(browser, service, f"/console/incidents/{incident_id}")
    browser.find_element(By.ID, "resolve-note").send_keys("deleted in the admin console, SEC-7")
    browser.find_element(By.ID, "resolve").click()
    wait_for(browser, lambda: "Resolved by hand" in browser.page_source)
    sandbox.supermemory.set_knobs(never_revoke=False)
    assert text(browser, "#incident-state") == "closed"
    assert not browser.find_elements(By.ID, "resolve")  # final: nothing left to resolve
    trail = browser.find_element(By.TAG_NAME, "details").get_attribute("innerHTML")
    assert "deleted in the admin console, SEC-7" in trail and "operator=alice" in trail
    assert service.incident(token)["token_sealed"] is None
    screenshot(browser, shots / "incident-resolved.png")


def test_sign_out(browser, service, shots):
    visit(browser, service, "/console/")
    browser.find_element(By.CSS_SELECTOR, ".signout button").click()
    wait_for(browser, lambda: browser.current_url == f"{service.url}/console/login")
    visit(browser, service, "/console/incidents")
    assert browser.current_url.startswith(f"{service.url}/console/login?next=")
    assert list(shots.glob("*.png")), "no screenshot was written"
