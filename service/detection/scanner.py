"""Find Supermemory keys in arbitrary text, plain or hidden under percent- or base64-encoding.

Speed comes from never doing per-character work in Python, and from running only regexes that
start with a literal: for those CPython's engine scans for the first character in a tight C loop,
while a pattern that starts with a class or an alternation is tried at every position and runs ten
times slower. Hence:

- one regex for keys, plain or with their underscores percent-encoded (`sm%5F…`, the only key
  characters an encoder changes), starting with the literal `sm`;
- for base64, one literal search per alignment of `sm_` against base64's 3-byte groups: base64 of
  `sm_` must contain one of three fixed strings (`c21f`, `NtX`, `zbV`). Only the lines holding one
  are split into base64 runs, decoded and scanned again; percent-decoding (of base64 whose `+`, `/`
  and `=` were percent-encoded in a URL) is attempted on those lines too, when they contain `%XX`.

The cost of the decoding passes thus scales with the number of marker hits, not with the text.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from service.detection.config import DEFAULT, DetectorConfig
from service.detection.finding import Confidence, Encoding, Finding
from service.tokens import is_key_shaped

# A key must not be part of a longer word-ish run, or `foo_sm_…` and `sm_…_v2` would match.
_WORDISH = "A-Za-z0-9_-"
_HEX = "[0-9A-Fa-f]"
_SEPARATOR = "(?:_|%5[Ff])"
_PREFIX = b"sm_"

_PERCENT = re.compile(f"%{_HEX}{{2}}")
# The characters of a URL component that encoders leave alone (RFC 3986 unreserved, plus `+`,
# which base64 uses and form encoders may leave as is), and %XX sequences.
_PERCENT_RUN = re.compile(f"(?:[A-Za-z0-9._~+-]|%{_HEX}{{2}})+")
_PERCENT_GROUP = re.compile(f"((?:%{_HEX}{{2}})+)")
_ENCODED_SEPARATOR = re.compile("%5[Ff]")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")

# (hit offset in the scanned text, token, confidence, encoding)
_Hit = tuple[int, str, Confidence, Encoding]


def _base64_markers(needle: bytes) -> tuple[tuple[str, int], ...]:
    """The characters that base64 of `needle` always contains, for each of its 3 alignments.

    Returns (marker, offset of the marker modulo 4 from the start of the encoding). Only characters
    whose 6 bits all come from `needle` are kept, so the marker does not depend on neighbouring
    bytes. For `sm_` none of them is `+` or `/`, so the markers hold for both alphabets.
    """
    markers = []
    for align in range(3):
        encoded = base64.b64encode(bytes(align) + needle + bytes(2)).decode("ascii")
        first = -(-8 * align // 6)
        last = (8 * (align + len(needle))) // 6 - 1
        markers.append((encoded[first : last + 1], first % 4))
    return tuple(markers)


_MARKERS = _base64_markers(_PREFIX)
# Regexes rather than str.find: with a rare first character (`N`, `z`) the regex engine's
# literal-prefix loop is about twice as fast as str.find's.
_MARKER_SEARCHES = tuple(re.compile(re.escape(marker)) for marker, _ in _MARKERS)


@dataclass(frozen=True)
class _Compiled:
    key: re.Pattern[str]
    repeated: re.Pattern[str]
    standard_run: re.Pattern[str]
    urlsafe_run: re.Pattern[str]
    words: tuple[str, ...]
    max_depth: int


@lru_cache(maxsize=16)
def _compile(config: DetectorConfig) -> _Compiled:
    # The boundary lookbehinds sit after the literal `sm` and look back over it, instead of standing
    # in front, so that the pattern keeps its literal prefix. A key may follow a %XX sequence
    # (`%22sm_…%22` in a URL) even though the sequence ends in a letter or digit.
    key = re.compile(
        f"sm(?:(?<![{_WORDISH}]sm)|(?<=%{_HEX}{{2}}sm)){_SEPARATOR}"
        f"(?:(?P<high>(?:{config.strict_org}){_SEPARATOR}(?:{config.strict_secret}))"
        f"|(?P<candidate>(?:{config.loose_org}){_SEPARATOR}(?:{config.loose_secret})))"
        f"(?![{_WORDISH}])"
    )
    # The lookbehinds make every run start at a run boundary; without them each position inside a
    # short run would be retried, which is quadratic in the run's length.
    n = config.min_base64_run
    return _Compiled(
        key=key,
        repeated=re.compile(rf"(.)\1{{{config.placeholder_run - 1}}}"),
        standard_run=re.compile(rf"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{{{n},}}"),
        urlsafe_run=re.compile(rf"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{{{n},}}"),
        words=tuple(w.lower() for w in config.placeholder_words),
        max_depth=config.max_decode_depth,
    )


def _is_placeholder(token: str, compiled: _Compiled) -> bool:
    body = token[len(_PREFIX) :]
    if compiled.repeated.search(body):
        return True
    lowered = body.lower()
    return any(word in lowered for word in compiled.words)


def _plain(text: str, compiled: _Compiled) -> Iterator[_Hit]:
    for match in compiled.key.finditer(text):
        token = match.group()
        encoding: Encoding = "plain"
        if "%" in token:
            token = _ENCODED_SEPARATOR.sub("_", token)
            encoding = "percent"
        # is_key_shaped is the pipeline's own gate: a custom config must not hand it tokens it
        # would drop as false positives anyway.
        if _is_placeholder(token, compiled) or not is_key_shaped(token):
            continue
        confidence: Confidence = "high" if match.lastgroup == "high" else "candidate"
        yield match.start(), token, confidence, encoding


def _line_bounds(text: str, pos: int) -> tuple[int, int]:
    end = text.find("\n", pos)
    return text.rfind("\n", 0, pos) + 1, len(text) if end == -1 else end


def _percent_decode(run: str) -> tuple[str, list[int]]:
    """Decode %XX sequences, and map each decoded character back to its offset in `run`.

    The map lets what the decoding holds be reported at its own column, which also makes it coincide
    with the same hit found without decoding, so that the two are deduplicated.
    """
    parts: list[str] = []
    offsets: list[int] = []
    pos = 0
    for index, piece in enumerate(_PERCENT_GROUP.split(run)):
        if index % 2:
            raw = bytes.fromhex(piece.replace("%", ""))
            decoded = raw.decode("utf-8", "replace")
            if len(decoded) == len(raw):
                offsets.extend(range(pos, pos + len(piece), 3))
            else:
                # Multi-byte characters: no key character comes from here, so one offset will do.
                offsets.extend([pos] * len(decoded))
        else:
            decoded = piece
            offsets.extend(range(pos, pos + len(piece)))
        parts.append(decoded)
        pos += len(piece)
    return "".join(parts), offsets


def _percent(text: str, start: int, end: int, compiled: _Compiled, depth: int) -> Iterator[_Hit]:
    for run in _PERCENT_RUN.finditer(text, start, end):
        if "%" not in run.group():
            continue
        decoded, offsets = _percent_decode(run.group())
        for offset, token, confidence, encoding in _scan(decoded, compiled, depth + 1):
            layered: Encoding = "percent" if encoding == "plain" else encoding
            yield run.start() + offsets[offset], token, confidence, layered


def _base64_decode(run: str, urlsafe: bool) -> str | None:
    if urlsafe:
        run = run.translate(_URLSAFE_TO_STANDARD)
    if len(run) % 4 == 1:
        # Not a whole encoding: the last character carries no complete byte.
        run = run[:-1]
    try:
        return binascii.a2b_base64(run + "=" * (-len(run) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _holds_prefix(run: str) -> bool:
    """Whether decoding `run` from its start yields `sm_` somewhere, without decoding it."""
    for marker, remainder in _MARKERS:
        at = run.find(marker)
        while at != -1:
            if at % 4 == remainder:
                return True
            at = run.find(marker, at + 1)
    return False


def _base64(text: str, start: int, end: int, compiled: _Compiled, depth: int) -> Iterator[_Hit]:
    seen: set[tuple[int, int]] = set()
    for pattern, urlsafe in ((compiled.standard_run, False), (compiled.urlsafe_run, True)):
        for run in pattern.finditer(text, start, end):
            # A run of letters and digits only is found by both patterns: decode it once.
            if run.span() in seen or not _holds_prefix(run.group()):
                continue
            seen.add(run.span())
            decoded = _base64_decode(run.group(), urlsafe)
            if decoded is None:
                continue
            for _offset, token, confidence, _encoding in _scan(decoded, compiled, depth + 1):
                yield run.start(), token, confidence, "base64"


def _marker_lines(text: str) -> list[tuple[int, int]]:
    lines: set[tuple[int, int]] = set()
    for search in _MARKER_SEARCHES:
        match = search.search(text)
        while match:
            bounds = _line_bounds(text, match.start())
            lines.add(bounds)
            match = search.search(text, bounds[1])
    return sorted(lines)


def _scan(text: str, compiled: _Compiled, depth: int) -> list[_Hit]:
    hits = list(_plain(text, compiled))
    if depth < compiled.max_depth:
        for start, end in _marker_lines(text):
            hits.extend(_base64(text, start, end, compiled, depth))
            if _PERCENT.search(text, start, end):
                hits.extend(_percent(text, start, end, compiled, depth))
    return hits


def _findings(text: str, compiled: _Compiled, first_line: int) -> tuple[list[Finding], int]:
    """Scan `text`, whose first character starts line `first_line`, into deduplicated findings.

    Also returns the number of newlines in `text`, counted in the same walk: counting them is a
    full pass over the text, as costly as one of the scans.
    """
    unique: dict[tuple[int, str], _Hit] = {}
    for hit in _scan(text, compiled, 0):
        # Plain hits come first, so a key that is also found in a decoding of its own span keeps
        # the plainest description.
        unique.setdefault((hit[0], hit[1]), hit)
    findings = []
    newlines, counted_to = 0, 0
    for offset, token, confidence, encoding in sorted(unique.values(), key=lambda hit: hit[0]):
        newlines += text.count("\n", counted_to, offset)
        counted_to = offset
        column = offset - text.rfind("\n", 0, offset)
        findings.append(Finding.of(token, confidence, first_line + newlines, column, encoding))
    return findings, newlines + text.count("\n", counted_to)


def scan_text(text: str, config: DetectorConfig = DEFAULT) -> list[Finding]:
    """All keys in `text`, in order of position. Lines are separated by `\\n`."""
    findings, _ = _findings(text, _compile(config), 1)
    return findings


# Chunks are gathered into blocks of about this size: scanning per line would spend more time in
# Python call overhead than in the regex engine.
_BLOCK_CHARS = 1 << 20


def _byte_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def scan_stream(
    chunks: Iterable[str],
    config: DetectorConfig = DEFAULT,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Finding]:
    """`scan_text` over a text that arrives in pieces (a file read in chunks, a network stream).

    Blocks are cut only after a newline, so a key is never split; a single line longer than a block
    is held whole until it ends. `progress` receives the UTF-8 byte count scanned so far after each
    block.
    """
    compiled = _compile(config)
    pending: list[str] = []
    pending_chars = 0
    line = 1
    scanned = 0

    def block_done(block: str) -> list[Finding]:
        nonlocal line, scanned
        findings, newlines = _findings(block, compiled, line)
        line += newlines
        scanned += _byte_length(block)
        if progress is not None:
            progress(scanned)
        return findings

    for chunk in chunks:
        pending.append(chunk)
        pending_chars += len(chunk)
        if pending_chars < _BLOCK_CHARS:
            continue
        cut = chunk.rfind("\n") + 1
        if not cut:
            continue
        pending[-1] = chunk[:cut]
        block = "".join(pending)
        rest = chunk[cut:]
        pending, pending_chars = [rest], len(rest)
        yield from block_done(block)
    if pending_chars:
        yield from block_done("".join(pending))
