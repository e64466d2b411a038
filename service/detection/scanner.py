"""Find Supermemory keys in arbitrary text, plain or hidden under percent- or base64-encoding.

Speed comes from never doing per-character work in Python. A prefilter (see `prefilter`:
hyperscan where it is installed, `re` elsewhere) makes the one pass over the whole text and flags
the lines that hold

- the shape of a key, plain or with its underscores percent-encoded (`sm%5F…`, the only key
  characters an encoder changes), without the boundary and placeholder checks;
- one of the three fixed strings that base64 of `sm_` must contain, one per alignment of `sm_`
  against base64's 3-byte groups (`c21f`, `NtX`, `zbV`), followed by enough base64 characters
  (or %XX sequences) to encode the shortest body a key may have.

Only those lines reach the precise logic below: the key regex with its boundaries, and, on lines
holding a base64 marker, splitting into base64 runs, decoding and scanning again; percent-decoding
(of base64 whose `+`, `/` and `=` were percent-encoded in a URL) is attempted on those lines too,
when they contain `%XX`. The cost of that logic thus scales with the number of hits, not with the
text.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial

from service.detection import prefilter
from service.detection.config import DEFAULT, DetectorConfig
from service.detection.finding import Confidence, Encoding, Finding
from service.detection.prefilter import Flagged, Prefilter, RegexLines
from service.tokens import KEY_BODY_MIN, is_key_shaped

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


def _base64_markers(needle: bytes, following: int) -> tuple[tuple[str, int, int], ...]:
    """The characters that base64 of `needle` always contains, for each of its 3 alignments.

    Returns (marker, offset of the marker modulo 4 from the start of the encoding, how many
    characters at least follow the marker when `following` bytes follow `needle`). Only characters
    whose 6 bits all come from `needle` are kept, so the marker does not depend on neighbouring
    bytes. For `sm_` none of them is `+` or `/`, so the markers hold for both alphabets.
    """
    markers = []
    for align in range(3):
        encoded = base64.b64encode(bytes(align) + needle + bytes(following)).decode("ascii").rstrip("=")
        first = -(-8 * align // 6)
        last = (8 * (align + len(needle))) // 6 - 1
        markers.append((encoded[first : last + 1], first % 4, len(encoded) - last - 1))
    return tuple(markers)


# Every hit must pass is_key_shaped, so `sm_` is followed by at least KEY_BODY_MIN characters, and
# in base64 the marker by at least 27 or 28 characters of the encoding, depending on its alignment
# (each may be percent-encoded: the second layer). Requiring them keeps the marker's chance hits
# in hex digests and random identifiers (`c21f` is hex) from sending about half the flagged lines
# through the precise logic for nothing.
_MARKERS = _base64_markers(_PREFIX, KEY_BODY_MIN)
_MARKER_PATTERNS = tuple(
    f"{re.escape(marker)}(?:[A-Za-z0-9+/_-]|%{_HEX}{{2}}){{{following}}}" for marker, _, following in _MARKERS
)
# Within one line or one decoding `re` is the cheaper finder: hyperscan would add an encoding and a
# scratch allocation to every call.
_MARKER_LINES = RegexLines(_MARKER_PATTERNS)


@dataclass(frozen=True)
class _Compiled:
    prefilter: Prefilter
    key: re.Pattern[str]
    repeated: re.Pattern[str]
    standard_run: re.Pattern[str]
    urlsafe_run: re.Pattern[str]
    words: tuple[str, ...]
    max_depth: int


@lru_cache(maxsize=16)
def _compile(config: DetectorConfig, strategy: type[Prefilter]) -> _Compiled:
    high = f"(?:{config.strict_org}){_SEPARATOR}(?:{config.strict_secret})"
    candidate = f"(?:{config.loose_org}){_SEPARATOR}(?:{config.loose_secret})"
    # The boundary lookbehinds sit after the literal `sm` and look back over it, instead of standing
    # in front, so that the pattern keeps its literal prefix. A key may follow a %XX sequence
    # (`%22sm_…%22` in a URL) even though the sequence ends in a letter or digit.
    key = re.compile(
        f"sm(?:(?<![{_WORDISH}]sm)|(?<=%{_HEX}{{2}}sm)){_SEPARATOR}"
        f"(?:(?P<high>{high})|(?P<candidate>{candidate}))(?![{_WORDISH}])"
    )
    # The lookbehinds make every run start at a run boundary; without them each position inside a
    # short run would be retried, which is quadratic in the run's length.
    n = config.min_base64_run
    return _Compiled(
        # The key without its boundaries: a superset of `key` that hyperscan can run.
        prefilter=strategy((f"sm{_SEPARATOR}(?:{high}|{candidate})", *_MARKER_PATTERNS)),
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
    for marker, remainder, _following in _MARKERS:
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


def _scan(text: str, compiled: _Compiled, depth: int) -> list[_Hit]:
    hits = list(_plain(text, compiled))
    if depth < compiled.max_depth:
        for start, end in _MARKER_LINES.lines(text).spans:
            hits.extend(_base64(text, start, end, compiled, depth))
            if _PERCENT.search(text, start, end):
                hits.extend(_percent(text, start, end, compiled, depth))
    return hits


def _findings(block: str, flagged: Flagged, compiled: _Compiled, line: int) -> tuple[list[Finding], int, int]:
    """The keys on the lines of `block` that the prefilter flagged; `block` starts line `line`.

    Newlines are counted from one line that holds a key to the next, and no further: counting is a
    pass over the block, and most flagged lines hold no key.
    Returns the findings, the offset up to which newlines were counted, and the line number there.
    """
    findings: list[Finding] = []
    counted = 0
    for start, end in flagged.spans:
        hits = _scan(block[start:end], compiled, 0)
        if not hits:
            continue
        line += flagged.newlines(counted, start)
        counted = start
        unique: dict[tuple[int, str], _Hit] = {}
        for hit in hits:
            # Plain hits come first, so a key that is also found in a decoding of its own span keeps
            # the plainest description.
            unique.setdefault((hit[0], hit[1]), hit)
        for offset, token, confidence, encoding in sorted(unique.values(), key=lambda hit: hit[0]):
            findings.append(Finding.of(token, confidence, line, offset + 1, encoding))
    return findings, counted, line


def scan_text(text: str, config: DetectorConfig = DEFAULT) -> list[Finding]:
    """All keys in `text`, in order of position. Lines are separated by `\\n`.

    A long text goes through `scan_stream` too, so that it is scanned in cache-sized blocks.
    """
    return list(scan_stream((text,), config))


# Text is scanned in blocks of about this size: scanning per line would spend more time in Python
# call overhead than in the prefilter, and a block this size stays in the CPU's own (L2) cache with
# its Latin-1 copy and numpy's comparison array while it is encoded, prefiltered and has its
# newlines counted (see `prefilter._newline_counter`). Blocks of 1 MB made the detector about a
# quarter slower on a machine with 2 MB of L2 per core; 128 to 512 KB did about as well as each
# other.
_BLOCK_CHARS = 1 << 18


def _blocks(chunks: Iterable[str]) -> Iterator[str]:
    """Regroup `chunks` into blocks of at least `_BLOCK_CHARS` (bar the last), each ending just
    after a newline: small chunks are gathered, large ones split."""
    pending: list[str] = []
    pending_chars = 0
    for chunk in chunks:
        start = 0
        while pending_chars + len(chunk) - start >= _BLOCK_CHARS:
            # The first newline at which the block reaches its size.
            cut = chunk.find("\n", start + max(_BLOCK_CHARS - pending_chars, 1) - 1) + 1
            if not cut:
                break
            pending.append(chunk[start:cut])
            yield "".join(pending)
            pending, pending_chars, start = [], 0, cut
        if start < len(chunk):
            pending.append(chunk[start:])
            pending_chars += len(chunk) - start
    if pending_chars:
        yield "".join(pending)


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
    compiled = _compile(config, prefilter.PREFILTER)
    line, scanned = 1, 0
    # The newlines of the previous block after its last key, owed only if another block follows.
    uncounted: Callable[[], int] | None = None
    for block in _blocks(chunks):
        if uncounted is not None:
            line += uncounted()
        flagged = compiled.prefilter.lines(block)
        findings, counted, line = _findings(block, flagged, compiled, line)
        uncounted = partial(flagged.newlines, counted, len(block))
        if progress is not None:
            scanned += _byte_length(block)
            progress(scanned)
        yield from findings
