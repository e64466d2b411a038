"""On-call hears through Sentry: every page code comes from a scenario that really produces it and
arrives at a local ingest endpoint with its level, fingerprint, tags, timeline and runbook link;
the pipeline's own liveness is a cron monitor; and a Sentry that is down or hangs slows nothing."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import sentry_sdk

from service.app import create_app
from service.runtime import Runtime
from service.sandbox import ServerThread, build_alert
from service.settings import Settings
from service.tokens import redact, token_hash
from tests.harness import SentrySink, Service, metric, postgres_env, wait_until

pytestmark = pytest.mark.integration


def page(sentry: SentrySink, code: str, level: str) -> dict:
    event = wait_until(lambda: sentry.pages(code) and sentry.pages(code)[0])
    assert event["level"] == level
    assert event["fingerprint"] == ["leak-responder", code]
    assert event["contexts"]["runbook"]["url"] == f"docs/runbook.md#{code}"
    return event


def assert_incident_tags(event: dict, token: str, org_id: str) -> None:
    tags = event["tags"]
    assert tags["incident_id"].startswith("inc_")
    assert tags["token_hash_prefix"] == token_hash(token)[:12]
    assert tags["org_id"] == org_id
    assert tags["reporter"] == "github"
    assert tags["source"] == "content"
    timeline = event["contexts"]["incident"]["timeline"]
    assert [e["event"] for e in timeline][:2] == ["received", "matched"]
    assert event["contexts"]["incident"]["redacted"] == redact(token)


def test_key_that_stays_alive_pages_revocation_unconfirmed(sandbox, make_service, sentry):
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service(sentry.env())
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    event = page(sentry, "revocation_unconfirmed", "fatal")
    assert_incident_tags(event, key.token, key.org_id)
    assert "probe_alive" in [e["event"] for e in event["contexts"]["incident"]["timeline"]]


def retries(service: Service) -> int:
    """Attempts to post a page that Sentry did not take: the first logged as `page_delayed`, the
    later ones at debug level."""
    return len(service.logged("page_delayed")) + sum(
        r["message"] == "page not taken by Sentry yet" for r in service.log_records()
    )


def waiting(service: Service) -> float:
    return metric(service.http.get(f"{service.url}/metrics").text, "leak_responder_pages_waiting")


@pytest.mark.parametrize("outage", ["stopped", "503", "429"])
def test_a_page_raised_while_sentry_is_briefly_down_arrives_once_it_is_back(
    sandbox, make_service, sentry, outage
):
    service = make_service(sentry.env())
    if outage == "stopped":
        sentry.stop()
    else:
        sentry.status = int(outage)
    sandbox.supermemory.set_knobs(never_revoke=True)
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: "revocation_unconfirmed" in (service.incident(key.token) or {}).get("pages", ""))
    if outage == "stopped":
        # A couple of attempts meet the closed port, then it is back.
        wait_until(lambda: retries(service) >= 2)
    else:
        wait_until(lambda: sentry.refused >= 2)
    # Meanwhile on-call hears of it elsewhere: one warning carrying the page, and the gauge.
    (delayed,) = service.logged("page_delayed")
    assert delayed["page"] == "revocation_unconfirmed" and delayed["level"] == "warning"
    assert delayed["status"] == (None if outage == "stopped" else int(outage))
    assert service.failures("alerting", "page_delayed") == 1 and waiting(service) == 1
    if outage == "stopped":
        sentry.start()
    else:
        sentry.status = None
    event = page(sentry, "revocation_unconfirmed", "fatal")
    assert_incident_tags(event, key.token, key.org_id)
    wait_until(lambda: len(sentry.pages("revocation_unconfirmed")) == 1)
    assert service.logged("page_dropped") == [] and len(service.logged("page_delayed")) == 1
    wait_until(lambda: waiting(service) == 0)


def test_a_page_sentry_never_takes_is_dropped_with_a_reason(sandbox, make_service, sentry):
    sentry.status = 503
    service = make_service({**sentry.env(), "LEAK_RESPONDER_PAGE_GIVE_UP_AFTER": "1"})
    sandbox.supermemory.set_knobs(never_revoke=True)
    key = sandbox.supermemory.keys[0]
    # The key in its sighting's URL too: neither the dropped page's line nor its attempts show it.
    service.post_alert(sandbox.github, [key.token], url=f"https://example.test/x?k={key.token}")
    (line,) = wait_until(lambda: service.logged("page_dropped"))
    for output in (service.log_text().encode(), sentry.all_bytes()):
        assert key.token[3:].encode() not in output and key.token[-16:].encode() not in output
    assert line["stage"] == "alerting" and line["page"] == "revocation_unconfirmed" and line["status"] == 503
    assert line["attempts"] >= 2 and line["level"] == "error"
    assert service.failures("alerting", "page_dropped") == 1
    sentry.status = None
    assert sentry.refused >= 2 and sentry.pages("revocation_unconfirmed") == []


def test_revoke_that_keeps_failing_pages_revocation_failed(sandbox, make_service, sentry):
    sandbox.supermemory.set_knobs(fail_next={"revoke": 10_000}, fail_status={"revoke": 503})
    service = make_service({**sentry.env(), "LEAK_RESPONDER_REVOKE_RETRY_WINDOW": "0.5"})
    key = sandbox.supermemory.keys[0]
    service.post_alert(sandbox.github, [key.token])
    event = page(sentry, "revocation_failed", "fatal")
    assert_incident_tags(event, key.token, key.org_id)
    assert "revoke_failed" in [e["event"] for e in event["contexts"]["incident"]["timeline"]]


def test_refused_admin_token_pages_lookup_unauthorized(sandbox, make_service, sentry):
    service = make_service({**sentry.env(), "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "not-the-admin-token"})
    token = sandbox.tokens[0]
    service.post_alert(sandbox.github, [token])
    event = page(sentry, "lookup_unauthorized", "fatal")
    assert event["tags"]["token_hash_prefix"] == token_hash(token)[:12]
    assert event["tags"]["reporter"] == "github"


def test_keys_url_down_pages_reporter_keys_unavailable(sandbox, make_service, sentry):
    sandbox.github.keys_failure = "500"
    service = make_service(sentry.env())
    assert service.post_alert(sandbox.github, [sandbox.tokens[0]]).status_code == 503
    event = page(sentry, "reporter_keys_unavailable", "error")
    assert event["tags"]["reporter"] == "github"


def test_changed_key_material_pages_signing_key_changed(sandbox, make_service, sentry):
    make_service({**sentry.env(), "LEAK_RESPONDER_KEYS_REFRESH_INTERVAL": "0.3"})
    sandbox.github.replace_key_material()
    event = page(sentry, "signing_key_changed", "warning")
    assert event["tags"]["reporter"] == "github"
    assert event["tags"]["key_identifier"] == sandbox.github.key_identifier


def test_refused_owner_pages_owner_unreachable(sandbox, make_service, sentry, smtp):
    smtp.refuse = {"owner1@example.test"}
    service = make_service({**sentry.env(), **smtp.env()})
    key = sandbox.supermemory.keys[1]
    service.post_alert(sandbox.github, [key.token])
    event = page(sentry, "owner_unreachable", "warning")
    assert_incident_tags(event, key.token, key.org_id)
    service.wait_state(key.token, "closed")


def test_pipeline_checks_in_with_the_cron_monitor(sandbox, make_service, sentry):
    service = make_service(sentry.env(LEAK_RESPONDER_SENTRY_CHECKIN_INTERVAL="0.3"))
    check_ins = wait_until(lambda: len(sentry.items("check_in")) >= 2 and sentry.items("check_in"))
    assert {c["monitor_slug"] for c in check_ins} == {"leak-responder-pipeline"}
    assert {c["status"] for c in check_ins} == {"ok"}
    assert check_ins[0]["monitor_config"]["schedule"]["type"] == "interval"
    assert service.logged("pager_log_only") == [], "pages reach Sentry: no start-up notice"


def test_worker_loop_stuck_on_its_store_is_pipeline_stalled(sandbox, make_service, sentry, pg_url, tmp_path):
    """A table lock held elsewhere (a long migration, a hand-run `LOCK`) blocks the worker loop's
    next store call; silent for 30 s, it checks in `error` with a log line and a count, and `ok`
    again once the lock is gone."""
    env = {**postgres_env(sandbox, pg_url), **sentry.env(LEAK_RESPONDER_SENTRY_CHECKIN_INTERVAL="0.5")}
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    service = make_service(env)

    def statuses() -> list[str]:
        return [c["status"] for c in sentry.items("check_in")]

    wait_until(lambda: "ok" in statuses())
    lock = psycopg.connect(pg_url)
    try:
        lock.execute("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE")
        record = wait_until(lambda: service.logged("pipeline_stalled"), timeout=60)[0]
        wait_until(lambda: "error" in statuses())
    finally:
        lock.close()  # ends the transaction, and with it the lock
    assert (record["stage"], record["level"]) == ("alerting", "error")
    # Logged rounded to 0.1 s: a check a few milliseconds past the 30 s limit says 30.0.
    assert record["silent_for"] >= 30
    wait_until(lambda: statuses()[-1] == "ok")
    assert service.failures("alerting", "pipeline_stalled") >= 1


@pytest.fixture(params=["refusing", "hanging"])
def dead_dsn(request) -> Iterator[str]:
    """A DSN whose port refuses connections, or accepts them and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if request.param == "hanging":
        listener.listen(64)
    else:
        listener.close()
    yield f"http://publickey@127.0.0.1:{port}/1"
    listener.close()


def test_sentry_down_or_hanging_slows_nothing(sandbox, make_service, smtp, dead_dsn):
    sandbox.supermemory.set_knobs(never_revoke=True)
    service = make_service(
        {"SENTRY_DSN": dead_dsn, "LEAK_RESPONDER_SENTRY_CHECKIN_INTERVAL": "0.2", **smtp.env()}
    )
    tokens = [k.token for k in sandbox.supermemory.keys[:3]]
    started = time.monotonic()
    assert service.post_alert(sandbox.github, tokens).status_code == 200
    for token in tokens:
        wait_until(lambda token=token: "notified" in service.events(token))
    # Probe schedule 1.2 s, then the urgent emails: seconds, while every page and check-in stalls.
    assert time.monotonic() - started < 15
    assert len(service.log_records()) > 0 and service.count_state("unconfirmed") == 3
    # Keys 0-2 belong to owners 0-2; owners 0 and 2 also list a security address.
    assert len(smtp.received()) == 5


def test_exception_while_handling_an_alert_reports_no_token(sandbox, sentry, tmp_path, monkeypatch):
    """A bug on the request path, with the alert's tokens in its message, its locals and the body."""
    env = {
        **sandbox.env(),
        **sentry.env(),
        "LEAK_RESPONDER_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    settings = Settings.load(env, env_file=None)
    runtime = Runtime.build(settings)
    token = sandbox.tokens[0]

    async def broken_intake(alert, items, match_after, decide=None):
        raise RuntimeError(f"cannot record {items[0].token}: simulated bug")

    monkeypatch.setattr(runtime.store, "intake", broken_intake)
    body = build_alert([token], url=f"https://example.test/?key={token}")
    headers = {
        "Github-Public-Key-Identifier": sandbox.github.key_identifier,
        "Github-Public-Key-Signature": sandbox.github.sign(body),
        "Authorization": f"Bearer {token}",
    }
    try:
        with ServerThread(create_app(settings, runtime)) as server:
            response = httpx.post(f"{server.url}/v1/alerts/github", content=body, headers=headers, timeout=30)
            assert response.status_code == 500
        sentry_sdk.flush(5)
        events = wait_until(lambda: [e for e in sentry.events() if e.get("exception")], timeout=10)
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()
    event = events[0]
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert redact(token) in event["exception"]["values"][-1]["value"]
    frames = [f for v in event["exception"]["values"] for f in v["stacktrace"]["frames"]]
    assert frames and not any("vars" in f for f in frames)
    raw = sentry.all_bytes()
    assert token.encode() not in raw
    assert token[3:].encode() not in raw
    assert token[-20:].encode() not in raw
