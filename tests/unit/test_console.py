"""The console's pieces that need a clock or exact numbers: sessions (expiry, an operator's token
changed or removed), the sign-in limiter's window, and the geometry of its pictures."""

from __future__ import annotations

import itertools
import os

import pytest

from service.console import plots
from service.console.session import (
    SESSION_SECONDS,
    SIGNIN_FAILURES,
    SIGNIN_WINDOW,
    ConsoleError,
    Sessions,
    SigninLimiter,
)
from service.reasons import Reason
from service.store import Event, Percentiles, State


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


OPERATORS = {"alice": "a" * 64, "bob": "b" * 64}


def reason(call) -> Reason:
    with pytest.raises(ConsoleError) as caught:
        call()
    return caught.value.reason


def test_a_session_lasts_until_it_expires_and_no_longer():
    clock = Clock()
    sessions = Sessions(os.urandom(32), clock)
    cookie = sessions.encode(sessions.signed_in("alice", OPERATORS))
    clock.now += SESSION_SECONDS - 1
    session = sessions.decode(cookie, OPERATORS)
    assert session is not None and session.operator == "alice"
    clock.now += 2
    assert reason(lambda: sessions.decode(cookie, OPERATORS)) is Reason.SESSION_INVALID
    assert sessions.decode(None, OPERATORS) is None


def test_a_new_token_or_a_removed_operator_ends_the_session():
    sessions = Sessions(os.urandom(32), Clock())
    cookie = sessions.encode(sessions.signed_in("alice", OPERATORS))
    assert reason(lambda: sessions.decode(cookie, {**OPERATORS, "alice": "c" * 64})) is Reason.SESSION_INVALID
    assert reason(lambda: sessions.decode(cookie, {"bob": "b" * 64})) is Reason.SESSION_INVALID
    assert sessions.decode(cookie, OPERATORS) is not None


def test_a_session_signed_under_another_data_key_is_refused():
    clock = Clock()
    cookie = Sessions(os.urandom(32), clock).encode(
        Sessions(os.urandom(32), clock).signed_in("alice", OPERATORS)
    )
    assert reason(lambda: Sessions(os.urandom(32), clock).decode(cookie, OPERATORS)) is Reason.SESSION_INVALID


def test_each_sign_in_gets_a_fresh_csrf_token():
    sessions = Sessions(os.urandom(32), Clock())
    pre = sessions.anonymous()
    signed = sessions.signed_in("alice", OPERATORS)
    assert pre.operator is None and pre.csrf != signed.csrf


def test_the_limiter_holds_an_address_until_its_oldest_failure_leaves_the_window():
    clock = Clock()
    limiter = SigninLimiter(clock)
    for _ in range(SIGNIN_FAILURES - 1):
        limiter.failed("10.0.0.1")
        clock.now += 1
    limiter.check("10.0.0.1")
    limiter.failed("10.0.0.1")
    with pytest.raises(ConsoleError) as caught:
        limiter.check("10.0.0.1")
    assert caught.value.reason is Reason.SIGNIN_RATE_LIMITED
    assert int(caught.value.headers["Retry-After"]) == SIGNIN_WINDOW - (SIGNIN_FAILURES - 1) + 1
    limiter.check("10.0.0.2")
    clock.now += SIGNIN_WINDOW - (SIGNIN_FAILURES - 1)
    limiter.check("10.0.0.1")
    limiter.failed("10.0.0.3")
    limiter.succeeded("10.0.0.3")
    limiter.check("10.0.0.3")


def test_pastes_are_sealed_for_one_operator():
    sessions = Sessions(os.urandom(32), Clock())
    sealed = sessions.seal_paste(b'{"text": "k"}', "alice")
    assert sessions.open_paste(sealed, "alice") == b'{"text": "k"}'
    assert reason(lambda: sessions.open_paste(sealed, "bob")) is Reason.PASTE_INVALID
    assert reason(lambda: sessions.open_paste("!!", "alice")) is Reason.PASTE_INVALID


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "—"),
        (0.0123, "12 ms"),
        (4.25, "4.2 s"),
        (200, "3 min 20 s"),
        (18_120, "5 h 02 min"),
        (273_600, "3 d 4 h"),
    ],
)
def test_durations_read_as_people_read_them(seconds, shown):
    assert plots.duration(seconds) == shown


def test_the_timeline_has_a_mark_per_stage_and_the_time_between():
    events = [
        Event(100.0, "received", State.RECEIVED, {}),
        Event(100.008, "matched", State.MATCHED, {}),
        Event(100.5, "probe_alive", None, {}),
        Event(100.02, "revoked", State.REVOKED, {}),
        Event(160.02, "unconfirmed", State.UNCONFIRMED, {}),
    ]
    drawn = plots.timeline(events)
    assert [m.name for m in drawn.marks] == ["received", "matched", "revoked", "unconfirmed"]
    assert [m.tone for m in drawn.marks] == ["plain", "good", "good", "bad"]
    assert [g.text for g in drawn.gaps] == ["+8 ms", "+12 ms", "+1 min 00 s"]
    xs = [m.x for m in drawn.marks]
    assert all(b - a == xs[1] - xs[0] > 0 for a, b in itertools.pairwise(xs))
    assert [g.x for g in drawn.gaps] == [(a + b) / 2 for a, b in itertools.pairwise(xs)]
    assert "unconfirmed at 00:02:40.020 (+1 min 00 s)" in drawn.summary


def test_the_percentile_plot_breaks_its_lines_at_empty_buckets():
    since, width = 1_800_000_000.0, 3600.0
    buckets = [
        Percentiles(since, 3, 0.05, 0.5),
        Percentiles(since + width, 1, 0.1, 0.1),
        Percentiles(since + 5 * width, 2, 2.0, 40.0),
    ]
    plot = plots.percentile_plot("t", buckets, None, since, width, 24, 6, "%H:%M")
    assert [len(line) for line in plot.p50] == [2, 1] and [len(line) for line in plot.p95] == [2, 1]
    # Logarithmic: from the decade under the fastest p50 to the one over the slowest p95.
    assert [t.text for t in plot.y_ticks] == ["10 ms", "100 ms", "1.0 s", "10.0 s", "1 min 40 s"]
    assert plot.p50[0][0].y > plot.p95[0][0].y  # faster is lower
    assert [t.text for t in plot.x_ticks] == ["08:00", "14:00", "20:00", "02:00", "08:00"]
    assert plot.x_ticks[0].at == plot.left and plot.x_ticks[-1].at == plot.right
    assert plot.rows[2][1:] == (2, "2.0 s", "40.0 s")
    assert plots.percentile_plot("t", [], None, since, width, 24, 6, "%H:%M").empty


def test_every_state_gets_a_bar_even_at_zero():
    bars = plots.state_bars({"confirmed": 4, "unconfirmed": 1})
    assert [b.state for b in bars.bars] == [s.value.replace("_", " ") for s in State]
    by_state = {b.state: b for b in bars.bars}
    assert by_state["confirmed"].length == 4 * by_state["unconfirmed"].length > 0
    assert by_state["received"].length == 0 and by_state["unconfirmed"].tone == "bad"
