"""What leaves for Sentry: the scrubber over events and breadcrumbs, and how pages get there."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import sentry_sdk

from service.alerting import (
    FILTERED,
    Answer,
    EventBudget,
    KeptEnvelopes,
    PageCourier,
    Pager,
    PageRetry,
    SentryPager,
    _wait_asked,
    scrub_event,
)
from service.reasons import Reason
from service.tokens import redact

TOKEN = "sm_" + "A" * 22 + "_" + "b" * 64


def test_key_shaped_strings_are_redacted_at_any_depth():
    event = {
        "message": f"failed for {TOKEN}",
        "exception": {"values": [{"value": f"boom {TOKEN}", "stacktrace": {"frames": [{"x": [TOKEN]}]}}]},
        "breadcrumbs": {"values": [{"data": {"items": [{"body": [f"x{TOKEN}x", 3, None]}]}}]},
        "tuple": (TOKEN,),
    }
    scrubbed = scrub_event(event)
    assert TOKEN not in repr(scrubbed)
    assert scrubbed["message"] == f"failed for {redact(TOKEN)}"
    assert scrubbed["breadcrumbs"]["values"][0]["data"]["items"][0]["body"][1:] == [3, None]


def test_values_under_token_like_keys_are_dropped_whatever_they_look_like():
    event = {
        "request": {"headers": {"Authorization": "Bearer opaque", "X-Api-Key": "k", "Accept": "*/*"}},
        "extra": {"tokens": ["ghp_notakey"], "admin_token": "x", "password": "p", "smtp_url": "smtp://u:p@h"},
        "payload": [{"token": "ghp_123", "type": "github", "url": "https://x"}],
        "tags": {"token_hash_prefix": "abc123", "token_type": "t", "token_count": 2},
    }
    scrubbed = scrub_event(event)
    assert scrubbed["request"]["headers"] == {
        "Authorization": FILTERED,
        "X-Api-Key": FILTERED,
        "Accept": "*/*",
    }
    assert scrubbed["extra"]["tokens"] == FILTERED
    assert scrubbed["extra"]["admin_token"] == FILTERED
    assert scrubbed["extra"]["password"] == FILTERED
    assert scrubbed["payload"] == [{"token": FILTERED, "type": "github", "url": "https://x"}]
    assert scrubbed["tags"] == event["tags"]


def test_keys_themselves_are_scrubbed():
    assert scrub_event({TOKEN: 1}) == {redact(TOKEN): 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(Pager):
    def __init__(self, clock: Clock) -> None:
        super().__init__(repeat_window=60, clock=clock)
        self.sent: list[tuple[Reason, str, dict[str, str]]] = []

    def _deliver(self, code, message, tags, context) -> None:
        self.sent.append((code, message, dict(tags)))


def test_one_page_per_condition_and_then_its_count():
    clock = Clock()
    pager = Recorder(clock)
    for _ in range(200):
        pager.page(Reason.REPORTER_KEYS_UNAVAILABLE, "no keys", {"reporter": "gitlab"}, {})
    pager.page(Reason.REPORTER_KEYS_UNAVAILABLE, "no keys", {"reporter": "github"}, {})
    assert [(c, t["reporter"]) for c, _, t in pager.sent] == [
        (Reason.REPORTER_KEYS_UNAVAILABLE, "gitlab"),
        (Reason.REPORTER_KEYS_UNAVAILABLE, "github"),
    ]
    # The window closes: the next occurrence sends the count of the last window, then pages anew.
    clock.now += 61
    pager.page(Reason.REPORTER_KEYS_UNAVAILABLE, "no keys", {"reporter": "gitlab"}, {})
    assert pager.sent[2][2] == {"reporter": "gitlab", "repeats": "199"}
    assert "199 more times" in pager.sent[2][1]
    assert pager.sent[3] == (Reason.REPORTER_KEYS_UNAVAILABLE, "no keys", {"reporter": "gitlab"})
    pager.page(Reason.REPORTER_KEYS_UNAVAILABLE, "no keys", {"reporter": "gitlab"}, {})
    pager.flush()
    assert pager.sent[4][2]["repeats"] == "1" and len(pager.sent) == 5


def test_admin_token_refused_is_one_condition_but_each_unrevoked_key_is_its_own():
    pager = Recorder(Clock())
    for n in range(5):
        tags = {"incident_id": f"inc_{n}", "org_id": "o"}
        pager.page(Reason.LOOKUP_UNAUTHORIZED, "admin token refused", tags, {})
        pager.page(Reason.REVOCATION_FAILED, "not revoked", tags, {})  # the pipeline's once per incident
    codes = [c for c, _, _ in pager.sent]
    assert codes.count(Reason.LOOKUP_UNAUTHORIZED) == 1
    assert codes.count(Reason.REVOCATION_FAILED) == 5


def test_error_events_have_a_budget():
    clock = Clock()
    budget = EventBudget(burst=3, per_second=0.5, clock=clock)
    assert [budget.admit() for _ in range(5)] == [True, True, True, False, False]
    clock.now += 2  # one token back
    assert [budget.admit() for _ in range(2)] == [True, False]


def test_url_passwords_are_masked_in_events_and_logs():
    event = {
        "message": "could not connect to postgresql://leak:pg-pass@db/leak",
        "extra": {"x": ["smtp://u:p@m"]},
    }
    scrubbed = scrub_event(event)
    assert scrubbed["message"] == "could not connect to postgresql://leak:***@db/leak"
    assert scrubbed["extra"]["x"] == ["smtp://u:***@m"]


class FakeIngest:
    """Sentry's ingest as the courier sees it: answers each post from a script (then 200), keeps the
    bodies, and moves the courier's clock on by `step` seconds a post."""

    def __init__(self, *answers: Answer | Exception, step: float = 0.0) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []
        self.step = step
        self.now = 0.0

    def post(self, body: bytes) -> Answer:
        self.bodies.append(body)
        self.now += self.step
        answer = self.answers.pop(0) if self.answers else Answer(200)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def pages(self) -> list[str]:
        return [json.loads(b.split(b"\n")[2])["message"] for b in self.bodies]


QUICK = PageRetry(give_up_after=60.0, backoff_base=0.001, backoff_max=0.01)


def courier_for(ingest: FakeIngest, retry: PageRetry = QUICK) -> PageCourier:
    client = sentry_sdk.Client(
        dsn="http://publickey@127.0.0.1:9/1", transport=KeptEnvelopes(), default_integrations=False
    )
    return PageCourier(client, ingest.post, retry, clock=lambda: ingest.now)


def posted(ingest: FakeIngest, count: int) -> None:
    """Until the courier has made `count` posts (closing earlier would cut its retries short)."""
    deadline = time.monotonic() + 5
    while len(ingest.bodies) < count and time.monotonic() < deadline:
        time.sleep(0.005)


def dropped(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "reason", None) == Reason.PAGE_DROPPED]


def test_the_courier_retries_a_page_until_sentry_takes_it_and_no_page_stops_the_next(caplog):
    ingest = FakeIngest(Answer(None), Answer(503), Answer(429, 0.02), Answer(200), RuntimeError("boom"))
    courier = courier_for(ingest)
    for n in range(3):
        courier.send({"message": f"page {n}", "tags": {"page": "revocation_failed"}})
    with caplog.at_level(logging.DEBUG, logger="service.alerting"):
        posted(ingest, 6)
        courier.close(timeout=5)
    # No answer, a 5xx and a 429 are tried again, with the same envelope (the same event id: one
    # event in Sentry even if an answer was lost); a post that raised costs only its own page.
    assert ingest.pages() == ["page 0"] * 4 + ["page 1", "page 2"]
    assert len(set(ingest.bodies[:4])) == 1
    assert dropped(caplog) == []
    # The page's first miss is told once (page_delayed), its later ones only at debug level.
    reasons = [r.reason for r in caplog.records if hasattr(r, "reason")]
    assert reasons == [Reason.PAGE_DELAYED, Reason.INTERNAL_ERROR]
    # Backoff within its 10 ms cap, but never sooner than the 20 ms the 429 asked for.
    waits = [r.retry_in for r in caplog.records if hasattr(r, "retry_in")]
    assert len(waits) == 3 and max(waits[:2]) <= 0.01 and waits[2] == 0.02


def test_a_page_refused_for_good_is_dropped_at_once_with_its_reason(caplog):
    ingest = FakeIngest(Answer(401))
    courier = courier_for(ingest)
    courier.send({"message": "page 0", "tags": {"page": "revocation_failed"}})
    courier.send({"message": "page 1", "tags": {"page": "lookup_unauthorized"}})
    with caplog.at_level(logging.INFO, logger="service.alerting"):
        courier.close(timeout=5)
    assert ingest.pages() == ["page 0", "page 1"]
    (line,) = dropped(caplog)
    assert (line.page, line.status, line.attempts) == ("revocation_failed", 401, 1)
    assert line.levelno == logging.ERROR and "page 0" in line.getMessage()


def test_a_page_sentry_does_not_take_within_its_window_is_dropped(caplog):
    ingest = FakeIngest(*[Answer(503)] * 10, step=4.0)
    courier = courier_for(ingest, PageRetry(give_up_after=10.0, backoff_base=0.001, backoff_max=0.01))
    courier.send({"message": "page 0", "tags": {"page": "revocation_failed"}})
    with caplog.at_level(logging.INFO, logger="service.alerting"):
        posted(ingest, 3)
        courier.close(timeout=5)
    (line,) = dropped(caplog)
    # Posted at 4, 8 and 12 s after it was raised: the third answer came past the 10 s window.
    assert (line.status, line.attempts, line.waited) == (503, 3, 12.0)


def test_at_close_a_page_waiting_to_be_retried_gets_one_more_attempt_then_is_dropped(caplog):
    ingest = FakeIngest(*[Answer(503)] * 10)
    courier = courier_for(ingest, PageRetry(give_up_after=3600.0, backoff_base=600.0, backoff_max=600.0))
    courier.send({"message": "page 0", "tags": {"page": "revocation_failed"}})
    with caplog.at_level(logging.DEBUG, logger="service.alerting"):
        deadline = time.monotonic() + 5
        # Closed while the page waits out its backoff (600 s), not while its first post is out.
        while not any(getattr(r, "reason", None) == Reason.PAGE_DELAYED for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        courier.close(timeout=5)
    (line,) = dropped(caplog)
    assert line.attempts == 2 and len(ingest.bodies) == 2


def test_at_close_pages_still_in_flight_are_counted_as_dropped(caplog):
    held = threading.Event()

    def hanging(body: bytes) -> Answer:
        held.wait(5)
        return Answer(200)

    client = sentry_sdk.Client(
        dsn="http://publickey@127.0.0.1:9/1", transport=KeptEnvelopes(), default_integrations=False
    )
    courier = PageCourier(client, hanging, QUICK)
    for n in range(3):
        courier.send({"message": f"page {n}", "tags": {"page": "revocation_failed"}})
    with caplog.at_level(logging.INFO, logger="service.alerting"):
        courier.close(timeout=0.2)
    held.set()
    (line,) = dropped(caplog)
    assert line.count == 3


def test_the_wait_sentry_asks_for_is_the_longest_it_names():
    assert _wait_asked(httpx.Headers({"X-Sentry-Rate-Limits": "60:error:organization, 120::key"})) == 120.0
    assert _wait_asked(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert _wait_asked(httpx.Headers({})) is None


def test_an_incidents_page_raised_twice_is_one_sentry_event():
    """A step that ran twice (its lease lost, or the process gone before its commit) pages twice:
    the same event id each time, which Sentry keeps once; other incidents and codes, and pages
    about no incident, are events of their own."""
    ingest = FakeIngest()
    pager = SentryPager(store=None, runbook_url="https://runbook.example/", courier=courier_for(ingest))  # type: ignore[arg-type]
    for incident_id, code in [
        ("inc_1", Reason.REVOCATION_FAILED),
        ("inc_1", Reason.REVOCATION_FAILED),
        ("inc_2", Reason.REVOCATION_FAILED),
        ("inc_1", Reason.REVOCATION_UNCONFIRMED),
        ("", Reason.REVOCATION_FAILED),
        ("", Reason.REVOCATION_FAILED),
    ]:
        pager.page(code, "a page", {"incident_id": incident_id}, {})
    pager.courier.close(timeout=5)
    ids = [json.loads(body.split(b"\n")[0])["event_id"] for body in ingest.bodies]
    assert len(ids) == 6 and ids[0] == ids[1]
    assert len(set(ids)) == 5
