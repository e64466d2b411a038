"""The console's pictures, as geometry: templates turn these into inline SVG on the server.

Drawn on the server so that the pages need no charting library, no build step and no script to be
readable (a screen reader gets each picture's title, description and the table beside it). Only
numbers and names computed here go into the SVG; text is escaped by the templates like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.store import Event, Percentiles, State

# -- durations, as people read them ----------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """`840 ms`, `4.2 s`, `3 min 20 s`, `5 h 02 min`, `3 d 4 h`; an em dash for nothing yet."""
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    if seconds < 86400:
        hours, rest = divmod(int(seconds) // 60, 60)
        return f"{hours} h {rest:02d} min"
    days, rest = divmod(int(seconds) // 3600, 24)
    return f"{days} d {rest} h"


def clock(at: float | None) -> str:
    """A UTC time of day with milliseconds: stages of one incident are often milliseconds apart."""
    if at is None:
        return "—"
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S.%f")[:-3]


def stamp(at: float | None) -> str:
    if at is None:
        return "—"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- an incident's timeline -----------------------------------------------------------------------

_GOOD = {State.MATCHED, State.REVOKED, State.CONFIRMED, State.NOTIFIED, State.CLOSED}
_BAD = {State.UNCONFIRMED}


@dataclass(frozen=True, slots=True)
class Mark:
    x: float
    name: str
    at: str
    tone: str  # good, bad or plain: a class of the stylesheet, with a shape so colour is not alone


@dataclass(frozen=True, slots=True)
class Gap:
    x: float
    text: str


@dataclass(frozen=True, slots=True)
class Timeline:
    width: float
    marks: list[Mark]
    gaps: list[Gap]
    summary: str


_TL_PAD = 70.0
_TL_STEP = 130.0
_TL_MIN_WIDTH = 720.0


def timeline(events: Sequence[Event]) -> Timeline:
    """One mark per stage the incident entered (the events that changed its state, in order),
    evenly spaced, with the time between two stages written between their marks.

    Even spacing rather than a time axis: the stages of a healthy incident are milliseconds apart
    and a stuck one can wait hours, so on a time axis either the fast stages pile up or the picture
    is mostly empty. The times are written out instead.
    """
    stages = [e for e in events if e.state is not None]
    span = _TL_STEP * max(0, len(stages) - 1)
    width = max(_TL_MIN_WIDTH, span + 2 * _TL_PAD)
    left = (width - span) / 2
    marks = []
    gaps = []
    for i, event in enumerate(stages):
        assert event.state is not None
        tone = "good" if event.state in _GOOD else "bad" if event.state in _BAD else "plain"
        if event.kind == "false_positive":
            tone = "plain"
        marks.append(Mark(left + i * _TL_STEP, event.kind.replace("_", " "), clock(event.at), tone))
        if i:
            gaps.append(Gap(left + (i - 0.5) * _TL_STEP, f"+{duration(event.at - stages[i - 1].at)}"))
    steps = ", ".join(
        f"{m.name} at {m.at}" + (f" ({g.text})" if g else "")
        for m, g in zip(marks, [None, *gaps], strict=True)
    )
    return Timeline(width, marks, gaps, f"Stages in order: {steps}." if steps else "No stage yet.")


# -- percentiles over a window --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    x: float
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float  # the coordinate along its axis
    text: str


@dataclass
class Plot:
    """A p50 and a p95 line over time buckets, on a logarithmic time axis (durations range from
    milliseconds to hours). Lines break where a bucket had no incident."""

    title: str
    width: float
    height: float
    left: float
    right: float
    bottom: float
    p50: list[list[Point]] = field(default_factory=list)
    p95: list[list[Point]] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    rows: list[tuple[str, int, str, str]] = field(default_factory=list)
    overall: Percentiles | None = None

    @property
    def empty(self) -> bool:
        return not self.rows


_W, _H = 560.0, 200.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 64.0, 30.0, 12.0, 30.0


def percentile_plot(
    title: str,
    buckets: Sequence[Percentiles],
    overall: Percentiles | None,
    since: float,
    width: float,
    count: int,
    tick_every: int,
    tick_format: str,
) -> Plot:
    """`count` buckets of `width` seconds from `since`; an x tick every `tick_every` buckets."""
    plot = Plot(title, _W, _H, _LEFT, _W - _RIGHT, _H - _BOTTOM, overall=overall)
    inner_w, inner_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x_of(index: float) -> float:
        return _LEFT + inner_w * (index + 0.5) / count

    for i in range(0, count + 1, tick_every):
        at = min(i, count) - 0.5
        label = datetime.fromtimestamp(since + i * width, UTC).strftime(tick_format)
        plot.x_ticks.append(Tick(x_of(at), label))
    if not buckets:
        return plot
    low = min(b.p50 for b in buckets)
    high = max(b.p95 for b in buckets)
    bottom_decade = math.floor(math.log10(max(low, 0.001)))
    top_decade = max(bottom_decade + 1, math.ceil(math.log10(max(high, 0.001))))

    def y_of(seconds: float) -> float:
        scaled = (math.log10(max(seconds, 0.001)) - bottom_decade) / (top_decade - bottom_decade)
        return _TOP + inner_h * (1 - scaled)

    plot.y_ticks = [Tick(y_of(10.0**d), duration(10.0**d)) for d in range(bottom_decade, top_decade + 1)]
    line50: list[Point] = []
    line95: list[Point] = []
    previous = None
    for b in buckets:
        index = round((b.start - since) / width)
        if previous is not None and index != previous + 1:
            plot.p50.append(line50)
            plot.p95.append(line95)
            line50, line95 = [], []
        previous = index
        line50.append(Point(x_of(index), y_of(b.p50), duration(b.p50)))
        line95.append(Point(x_of(index), y_of(b.p95), duration(b.p95)))
        when = datetime.fromtimestamp(b.start, UTC).strftime("%Y-%m-%d %H:%M")
        plot.rows.append((when, b.count, duration(b.p50), duration(b.p95)))
    plot.p50.append(line50)
    plot.p95.append(line95)
    return plot


# -- incidents by state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    state: str
    count: int
    y: float
    length: float
    tone: str


@dataclass(frozen=True, slots=True)
class Bars:
    width: float
    height: float
    left: float
    bars: list[Bar]


_BAR_H, _BAR_GAP, _BAR_LEFT, _BAR_W = 22.0, 8.0, 120.0, 520.0


def state_bars(by_state: dict[str, int]) -> Bars:
    """A bar per state, in pipeline order, every state shown (a zero is an answer too)."""
    most = max([1, *by_state.values()])
    bars = []
    for i, state in enumerate(State):
        count = by_state.get(state.value, 0)
        tone = "good" if state in _GOOD else "bad" if state in _BAD else "plain"
        length = (_BAR_W - _BAR_LEFT - 60) * count / most
        bars.append(Bar(state.value.replace("_", " "), count, i * (_BAR_H + _BAR_GAP), length, tone))
    return Bars(_BAR_W, len(bars) * (_BAR_H + _BAR_GAP), _BAR_LEFT, bars)
