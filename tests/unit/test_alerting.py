"""What leaves for Sentry: the scrubber over events and breadcrumbs."""

from __future__ import annotations

from service.alerting import FILTERED, EventBudget, PageCourier, Pager, scrub_event
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


class FakeTransport:
    """The SDK's transport as the courier sees it: full for a while, then with room."""

    def __init__(self, full_for: int) -> None:
        self.full_for = full_for

    def is_healthy(self) -> bool:
        self.full_for -= 1
        return self.full_for < 0


class FakeClient:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.captured: list[dict] = []
        self.closed = False

    def capture_event(self, event: dict) -> None:
        if event.get("explode"):
            raise RuntimeError("the SDK failed")
        assert self.transport.is_healthy(), "handed over while the transport was full"
        self.captured.append(event)

    def close(self, timeout: float) -> None:
        self.closed = True


def test_the_courier_waits_for_room_and_no_page_stops_the_next():
    client = FakeClient(FakeTransport(full_for=5))
    courier = PageCourier(client, poll=0.001)  # type: ignore[arg-type]
    pages = [{"message": f"page {n}"} for n in range(3)]
    courier.send(pages[0])
    courier.send({"explode": True})
    for page in pages[1:]:
        courier.send(page)
    courier.close(timeout=5)
    assert client.captured == pages and client.closed
