"""Where in a text a key could be: the lines that hold a match of any of a few patterns.

The scanner's precise logic (boundaries, placeholders, decoding) is Python and costs per line it
looks at, so it looks only at the lines a prefilter flags. Two interchangeable strategies, chosen
once at import:

- `HyperscanLines` runs every pattern in one pass over the text's bytes (hyperscan is a C library
  with wheels for x86-64 only), in about half the time one `re` search takes over the same text;
- `RegexLines` is the pure-`re` fallback for every other machine: one search per pattern, about six
  times slower in all.

Patterns are given in Python `re` syntax and must match ASCII characters only and never `\\n`, so
that a byte match and a character match agree and a match always lies within one line; they
should start with a literal, which is what keeps `re` fast. A prefilter may flag more lines than
hold a real match (hyperscan compiles in prefilter mode, approximating what it cannot run), never
fewer.

Each prefilter also says how to count the text's newlines, for line numbers, over whichever copy
of the text it holds that counts fastest: counting is a pass over the whole text, which with
`str.count` costs twice hyperscan's.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar, NamedTuple, Protocol

try:
    import hyperscan
except ImportError:  # Not installed on this machine: see the platform marker in pyproject.toml.
    hyperscan = None  # type: ignore[assignment]

Span = tuple[int, int]


class Flagged(NamedTuple):
    """The lines of a text that hold a match, and how to count the text's newlines.

    `spans` come as sorted, distinct (start, end) character offsets, `end` excluding the `\\n`;
    `newlines(start, end)` is the number of `\\n` in `text[start:end]`.
    """

    spans: list[Span]
    newlines: Callable[[int, int], int]


class Prefilter(Protocol):
    """Compiles `patterns` once; `lines` then finds the lines of a text that hold a match."""

    name: ClassVar[str]

    def __init__(self, patterns: Sequence[str]) -> None: ...

    def lines(self, text: str) -> Flagged: ...


def _line_bounds(text: str, pos: int) -> Span:
    """The line of `text` that holds offset `pos`."""
    end = text.find("\n", pos)
    return text.rfind("\n", 0, pos) + 1, len(text) if end == -1 else end


class RegexLines:
    """One `re` search per pattern, each resumed after the line it hit.

    Separate searches rather than one alternation: an alternation has no literal prefix, and CPython
    then tries it at every position, ten times slower than its literal scan.
    """

    name: ClassVar[str] = "re"

    def __init__(self, patterns: Sequence[str]) -> None:
        self._searches = tuple(re.compile(pattern) for pattern in patterns)

    def lines(self, text: str) -> Flagged:
        found: set[Span] = set()
        for search in self._searches:
            match = search.search(text)
            while match:
                bounds = _line_bounds(text, match.start())
                found.add(bounds)
                match = search.search(text, bounds[1])
        return Flagged(sorted(found), partial(text.count, "\n"))


def _collect_end(_id: int, _start: int, end: int, _flags: int, ends: object) -> None:
    assert isinstance(ends, list)
    ends.append(end)


class HyperscanLines:
    """All patterns in one hyperscan block-mode pass over the text's bytes (see `_encode`).

    Block mode even for streams: the scanner hands over blocks cut after a newline, so no match
    spans two of them, and it needs whole lines in hand anyway.
    """

    name: ClassVar[str] = "hyperscan"

    def __init__(self, patterns: Sequence[str]) -> None:
        self._scratch = threading.local()
        self._database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        # Prefilter mode accepts what hyperscan cannot run exactly (lookarounds, backreferences,
        # atomic groups in a configured shape) by matching a superset, which is all a prefilter owes.
        self._database.compile(
            expressions=[pattern.encode("utf-8") for pattern in patterns],
            flags=hyperscan.HS_FLAG_PREFILTER,
        )

    def lines(self, text: str) -> Flagged:
        data, by_character = _encode(text)
        ends: list[int] = []
        # A scratch per thread: the scan releases the GIL, and two threads sharing the database's
        # own scratch would fail with ScratchInUseError, while allocating one per call costs about
        # a fifth of the scan of a 1 MB block.
        scratch = getattr(self._scratch, "scratch", None)
        if scratch is None:
            scratch = self._scratch.scratch = hyperscan.Scratch(self._database)
        self._database.scan(data, match_event_handler=_collect_end, context=ends, scratch=scratch)
        spans: list[Span] = []
        for end in sorted(ends):
            if spans and end <= spans[-1][1]:
                continue
            last = end - 1
            line_end = data.find(b"\n", last)
            spans.append((data.rfind(b"\n", 0, last) + 1, len(data) if line_end == -1 else line_end))
        if by_character:
            return Flagged(spans, _newline_counter(data))
        return Flagged(_character_spans(data, spans), partial(text.count, "\n"))


# Below this many bytes `bytes.count` takes under 25 µs, and importing numpy (about 0.1 s and 12 MB
# of memory, for the life of the process) would not pay: the service's reports and a pre-commit
# hook's files mostly stay below it, a log of megabytes does not.
_NUMPY_FROM = 1 << 16
_NEWLINE = ord("\n")


def _newline_counter(data: bytes) -> Callable[[int, int], int]:
    """Counts newlines in `data` where offsets are characters (its Latin-1 case).

    `bytes.count` looks at one byte per CPU cycle, which made counting the largest cost of the
    detector, above hyperscan's; numpy compares a vector register's worth of bytes at a time and
    counts a 256 KB block about four times faster, while it is still in the cache from hyperscan's
    pass.
    """
    if len(data) < _NUMPY_FROM:
        return partial(data.count, b"\n")
    import numpy  # Only here: see _NUMPY_FROM.

    codes = numpy.frombuffer(data, numpy.uint8)
    return lambda start, end: int(numpy.count_nonzero(codes[start:end] == _NEWLINE))


def _encode(text: str) -> tuple[bytes, bool]:
    """The bytes to scan, and whether their offsets are character offsets.

    CPython stores a text whose characters all fit in a byte (ASCII, and Latin-1 such as accented
    Western European text) one byte per character, so its Latin-1 encoding is a plain copy, several
    times faster than encoding it in UTF-8, and needs no offset conversion. ASCII patterns match
    those bytes exactly where they match the characters. Wider text fails at its first wide
    character and is encoded in UTF-8, with surrogatepass as everywhere a token is encoded: any str
    must scan.
    """
    try:
        return text.encode("latin-1"), True
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass"), False


def _character_spans(data: bytes, spans: list[Span]) -> list[Span]:
    """Turn byte spans of whole lines into character spans, in one walk over the bytes before them.

    Spans start after a `\\n` and end before one, so every slice falls on a character boundary.
    """
    converted: list[Span] = []
    chars = done = 0
    for start, end in spans:
        chars += len(data[done:start].decode("utf-8", "surrogatepass"))
        width = len(data[start:end].decode("utf-8", "surrogatepass"))
        converted.append((chars, chars + width))
        chars += width
        done = end
    return converted


PREFILTER: type[Prefilter] = RegexLines if hyperscan is None else HyperscanLines
"""The strategy the scanner uses: hyperscan wherever it is installed."""
