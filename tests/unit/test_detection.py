"""Table-driven tests of the key detector over tests/data/detection/corpus.toml, plus properties.

Every test runs once per prefilter (see `prefilter` below), so that the `re` fallback stays tested
on machines that use hyperscan, and hyperscan wherever it is installed.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import re
import tomllib
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.detection import DetectorConfig, Finding, scan_stream, scan_text, scanner
from service.detection import prefilter as prefilters
from service.tokens import redact, token_hash

PREFILTERS = [
    pytest.param(prefilters.RegexLines, id="re"),
    pytest.param(
        prefilters.HyperscanLines,
        id="hyperscan",
        marks=pytest.mark.skipif(prefilters.hyperscan is None, reason="hyperscan is not installed"),
    ),
]


@pytest.fixture(autouse=True, scope="module", params=PREFILTERS)
def prefilter(request):
    """Module-scoped, so that hypothesis's tests run under it too and each prefilter's set is whole."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefilters, "PREFILTER", request.param)
        yield request.param


CORPUS = tomllib.loads((Path(__file__).parents[1] / "data" / "detection" / "corpus.toml").read_text())
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# (org alphabet, org length, secret length); the org part always starts with "FakeTest".
KINDS = {
    "strict": (BASE58, 22, 64),
    "candidate": (ALNUM, 30, 40),
    "too_short": (ALNUM, 12, 20),
    "too_long": (BASE58, 22, 140),
}


def fake_key(name: str, kind: str) -> str:
    """A deterministic FAKE key: never issued, only shaped like one."""
    alphabet, org_length, secret_length = KINDS[kind]
    rng = random.Random(hashlib.sha256(f"leak-responder fake test key {name}".encode()).digest())
    org = "FakeTest" + "".join(rng.choices(alphabet, k=org_length - 8))
    return f"sm_{org}_{''.join(rng.choices(ALNUM, k=secret_length))}"


KEYS = {name: fake_key(name, kind) for name, kind in CORPUS["keys"].items()}

FILTERS = {
    "b64": lambda s: base64.b64encode(s.encode()).decode(),
    "b64url": lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
    "nl": lambda s: s + "\n",
    "json": lambda s: json.dumps({"apiKey": s}),
    "pct": lambda s: s.replace("_", "%5F"),
    "urlquote": lambda s: urllib.parse.quote(s, safe=""),
    "upper": lambda s: "SM_" + s[3:],
}


def render(template: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, *filters = match.group(1).split("|")
        value = KEYS[name]
        for f in filters:
            value = FILTERS[f](value)
        return value

    return re.sub(r"\{\{([^}]+)\}\}", substitute, template)


def expected(case: dict) -> list[tuple]:
    return [(KEYS[e["key"]], e["confidence"], e["line"], e["column"], e["encoding"]) for e in case["expect"]]


def observed(findings: list[Finding]) -> list[tuple]:
    return [(f.token, f.confidence, f.line, f.column, f.encoding) for f in findings]


CASES = [pytest.param(case, id=case["id"]) for case in CORPUS["case"]]


@pytest.mark.parametrize("case", CASES)
def test_corpus_scan_text(case):
    assert observed(scan_text(render(case["text"]))) == expected(case)


@pytest.mark.parametrize("case", CASES)
def test_corpus_scan_stream_one_character_chunks(case):
    """The smallest chunks there are: keys must still not be split, nor lines miscounted."""
    assert observed(scan_stream(render(case["text"]))) == expected(case)


def test_finding_never_renders_the_token():
    key = KEYS["k1"]
    (finding,) = scan_text(f"x={key}")
    assert finding.token == key
    assert finding.token_hash == token_hash(key)
    assert finding.redacted == redact(key)
    for rendered in (repr(finding), str(finding), f"{finding}", f"{finding!r}"):
        assert key not in rendered
        assert key[3:20] not in rendered


def test_findings_compare_without_the_token():
    a, b = scan_text(f"{KEYS['k1']}\n{KEYS['k1']}")
    assert (a.line, b.line) == (1, 2)
    assert a == Finding(a.token_hash, a.redacted, "high", 1, 1, "plain", token="not compared")


def test_stream_spans_chunks_and_reports_progress():
    filler = "log line with nothing in it, just words and numbers 12345\n" * 40_000
    text = filler + f"SUPERMEMORY_API_KEY={KEYS['k2']}\n" + filler + f"{KEYS['k1']}é\n"
    chunks = [text[i : i + 4093] for i in range(0, len(text), 4093)]
    seen: list[int] = []
    findings = list(scan_stream(chunks, progress=seen.append))
    assert observed(findings) == [
        (KEYS["k2"], "high", 40_001, 21, "plain"),
        (KEYS["k1"], "high", 80_002, 1, "plain"),
    ]
    assert seen == sorted(seen)
    assert seen[-1] == len(text.encode())


# Latin-1 (which hyperscan scans one byte per character), characters of 3 and of 2 and 4 UTF-8 bytes,
# and a lone surrogate (which a str may hold and UTF-8 may not): in UTF-8, byte offsets run ahead of
# character offsets by different amounts for each.
WIDE = ["é", "中文", "é😀", "\ud800"]


@pytest.mark.parametrize("wide", WIDE)
def test_columns_count_characters_not_bytes(wide):
    lines = [
        f"{wide} nothing here {wide}",
        f"{wide}{wide} x-api-key: {KEYS['k1']} {wide}",
        f"{wide}  data: {FILTERS['b64'](KEYS['k2'])}",
        f"GET /{wide}?apikey={FILTERS['pct'](KEYS['k1'])}&{wide}",
        f"{wide * 50} {KEYS['c1']}",
    ]
    text = "\n".join(lines)
    want = [
        (KEYS["k1"], "high", 2, len(f"{wide}{wide} x-api-key: ") + 1, "plain"),
        (KEYS["k2"], "high", 3, len(f"{wide}  data: ") + 1, "base64"),
        (KEYS["k1"], "high", 4, len(f"GET /{wide}?apikey=") + 1, "percent"),
        (KEYS["c1"], "candidate", 5, len(wide) * 50 + 2, "plain"),
    ]
    assert observed(scan_text(text)) == want
    assert observed(scan_stream(text)) == want


def stream_case() -> tuple[str, list[tuple]]:
    """A text of keys among filler, wide characters and lines longer than a small block."""
    filler = ["", "plain words", "é中😀 " * 9, "x" * 130, "blob: " + FILTERS["b64"]("nothing to see " * 8)]
    rng = random.Random(5)
    lines: list[str] = []
    want: list[tuple] = []
    for n in range(40):
        lines.append(rng.choice(filler))
        lead = rng.choice(["", "é ", "中文 = ", "😀" * 70 + " "])
        name = rng.choice(["k1", "k2", "c1"])
        confidence = "candidate" if name == "c1" else "high"
        encoded, encoding = rng.choice([(KEYS[name], "plain"), (FILTERS["b64"](KEYS[name]), "base64")])
        lines.append(f"{lead}{encoded}")
        want.append((KEYS[name], confidence, 2 * n + 2, len(lead) + 1, encoding))
    return "\n".join(lines) + "\n", want


STREAM_TEXT, STREAM_WANT = stream_case()


@pytest.mark.parametrize("size", [1, 2, 3, 61, 97, 98, 1000, len(STREAM_TEXT)])
def test_stream_chunk_and_block_boundaries(monkeypatch, size):
    """Chunks cut keys, lines and runs of wide characters anywhere; blocks far smaller than many lines."""
    monkeypatch.setattr(scanner, "_BLOCK_CHARS", 97)
    chunks = [STREAM_TEXT[i : i + size] for i in range(0, len(STREAM_TEXT), size)]
    seen: list[int] = []
    assert observed(scan_stream(chunks, progress=seen.append)) == STREAM_WANT
    assert seen[-1] == len(STREAM_TEXT.encode())
    assert observed(scan_text(STREAM_TEXT)) == STREAM_WANT


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STREAM_TEXT)), max_size=30), block=st.integers(1, 400))
def test_stream_finds_the_same_wherever_it_is_cut(cuts, block):
    bounds = [0, *sorted(cuts), len(STREAM_TEXT)]
    chunks = [STREAM_TEXT[a:b] for a, b in itertools.pairwise(bounds)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scanner, "_BLOCK_CHARS", block)
        assert observed(scan_stream(chunks)) == STREAM_WANT


@pytest.mark.parametrize("size", [1, 7, 100, 10_000])
def test_blocks_end_after_a_newline_once_big_enough(monkeypatch, size):
    monkeypatch.setattr(scanner, "_BLOCK_CHARS", 50)
    chunks = [STREAM_TEXT[i : i + size] for i in range(0, len(STREAM_TEXT), size)]
    blocks = list(scanner._blocks(chunks))
    assert "".join(blocks) == STREAM_TEXT
    for block in blocks[:-1]:
        assert block.endswith("\n")
        # Cut at the first newline that brings the block to its size, not later.
        assert len(block) >= 50
        assert "\n" not in block[49:-1]


# --- line numbers ------------------------------------------------------------------------------
#
# The scanner counts newlines only from one line holding a key to the next, and counts the rest of
# a block only once another block follows. These pin the line numbers wherever that counting could
# slip: at block edges, across blocks holding no key, over CRLF, in a stream cut anywhere.


def two_layers(key: str) -> str:
    """base64 of JSON holding the key, then percent-encoded; "?中" puts a `+` in the base64."""
    return "GET /import?keys=" + FILTERS["urlquote"](FILTERS["b64"]("?中" + FILTERS["json"](key)))


LINE_FORMS = {
    "plain": lambda key: f"SUPERMEMORY_API_KEY={key}",
    "base64": lambda key: f"  data: {FILTERS['b64'](key)}",
    "percent": lambda key: f"GET /v3/search?apikey={FILTERS['pct'](key)}&page=2",
    "two_layers": two_layers,
}
ENCODING = {"plain": "plain", "base64": "base64", "percent": "percent", "two_layers": "base64"}
COLUMN = {"plain": 21, "base64": 9, "percent": 23, "two_layers": 18}
FILLER = ["", "plain words and numbers 12345", "\tindented = True", "trace=0c21ff196893e1ba", "é"]
# Small enough that the text below spans many blocks, some of which hold no key.
LINE_BLOCK = 300


def line_case() -> tuple[str, list[tuple]]:
    """About 400 lines, `\n` or `\r\n`, with keys in every form on lines chosen at random and on
    the first and last lines of the text; the last line has no newline."""
    rng = random.Random(11)
    lines: list[str] = []
    want: list[tuple] = []
    for number in range(1, 401):
        if number in (1, 400) or rng.random() < 0.05:
            name = rng.choice(["k1", "k2"])
            form = rng.choice(list(LINE_FORMS))
            lines.append(LINE_FORMS[form](KEYS[name]))
            want.append((KEYS[name], "high", number, COLUMN[form], ENCODING[form]))
        else:
            lines.append(rng.choice(FILLER))
    ends = [rng.choice(["\n", "\r\n"]) for _ in lines[:-1]]
    return "".join(line + end for line, end in zip(lines, [*ends, ""], strict=True)), want


LINE_TEXT, LINE_WANT = line_case()


def test_line_case_covers_the_block_edges(monkeypatch):
    """The case below is only worth its name if blocks start and end with a key and some hold none."""
    monkeypatch.setattr(scanner, "_BLOCK_CHARS", LINE_BLOCK)
    blocks = list(scanner._blocks([LINE_TEXT]))
    holding = [[key for key in KEYS.values() if key in "".join(decodings(block))] for block in blocks]
    first_lines = [block.split("\n", 1)[0] for block in blocks]
    last_lines = [block.rstrip("\r\n").rsplit("\n", 1)[-1] for block in blocks]
    assert len(blocks) > 20
    # Blocks holding no key, followed by one that does: their newlines still count.
    assert sum(1 for keys in holding[1:-1] if not keys) >= 3
    assert sum(1 for line in first_lines[1:] if "sm" in "".join(decodings(line))) >= 2
    assert sum(1 for line in last_lines[:-1] if "sm" in "".join(decodings(line))) >= 2
    assert "\r\n" in LINE_TEXT and "\n" in LINE_TEXT.replace("\r\n", "")


@pytest.mark.parametrize("size", [1, 2, 7, 61, 300, 4096, len(LINE_TEXT)])
def test_line_numbers_across_blocks_crlf_and_chunks(monkeypatch, size):
    monkeypatch.setattr(scanner, "_BLOCK_CHARS", LINE_BLOCK)
    chunks = [LINE_TEXT[i : i + size] for i in range(0, len(LINE_TEXT), size)]
    assert observed(scan_stream(chunks)) == LINE_WANT
    assert observed(scan_text(LINE_TEXT)) == LINE_WANT


@pytest.mark.parametrize("wide", ["", "中"], ids=["latin-1", "utf-8"])
def test_line_numbers_with_blocks_of_the_default_size(wide):
    """The same text repeated past several blocks of the real size, all of it in one call: blocks
    this size have their newlines counted another way than small ones, and so do blocks with a
    character outside Latin-1, which `wide` puts on a line of its own in every copy."""
    copies = -(-3 * scanner._BLOCK_CHARS // len(LINE_TEXT)) + 1
    lines_per_copy = LINE_TEXT.count("\n") + 2
    text = "\n".join([f"{wide}\n{LINE_TEXT}"] * copies)
    want = [
        (token, confidence, line + 1 + copy * lines_per_copy, column, encoding)
        for copy in range(copies)
        for token, confidence, line, column, encoding in LINE_WANT
    ]
    assert observed(scan_text(text)) == want


@pytest.mark.parametrize("cut", ["mid-key", "mid-base64", "between-cr-and-lf", "after-lf"])
def test_stream_cut_mid_line_mid_token_and_mid_crlf(monkeypatch, cut):
    """Two chunks, cut at one chosen place, with blocks small enough that the cut lands in one."""
    monkeypatch.setattr(scanner, "_BLOCK_CHARS", 40)
    text = (
        f"one\r\ntwo {KEYS['k1']}\r\n\r\n{LINE_FORMS['base64'](KEYS['k2'])}\r\n"
        f"é\r\nlast {LINE_FORMS['percent'](KEYS['k1'])}"
    )
    at = {
        "mid-key": text.index(KEYS["k1"]) + 40,
        "mid-base64": text.index(FILTERS["b64"](KEYS["k2"])) + 50,
        "between-cr-and-lf": text.index("\r\n\r\n") + 1,
        "after-lf": text.index("\né\r\n") + 1,
    }[cut]
    want = [
        (KEYS["k1"], "high", 2, 5, "plain"),
        (KEYS["k2"], "high", 4, 9, "base64"),
        (KEYS["k1"], "high", 6, len("last ") + COLUMN["percent"], "percent"),
    ]
    assert observed(scan_stream([text[:at], text[at:]])) == want
    assert observed(scan_text(text)) == want


def test_a_lone_carriage_return_does_not_end_a_line():
    """Only `\n` ends a line, as the docstring of `scan_text` says: `\r` is a character like any."""
    text = f"a\rb\r{KEYS['k1']}\nc\r\n{KEYS['k2']}"
    want = [(KEYS["k1"], "high", 1, 5, "plain"), (KEYS["k2"], "high", 3, 1, "plain")]
    assert observed(scan_text(text)) == want


def test_config_shapes_are_configurable():
    key = KEYS["c1"]
    assert scan_text(key, DetectorConfig(loose_org="[A-Za-z0-9]{16,20}")) == []
    (finding,) = scan_text(key, DetectorConfig(strict_org="[A-Za-z0-9]{30}", strict_secret="[A-Za-z0-9]{40}"))
    assert finding.confidence == "high"


def test_decode_depth_is_bounded():
    """Percent-encoded base64 takes two layers; base64 whose decoding lacks `sm_` is not opened."""
    # "?中" puts a `+` in the second character, so no base64 run is aligned until `%2B` is decoded.
    two_layers = "keys=" + FILTERS["urlquote"](FILTERS["b64"]("?中" + FILTERS["json"](KEYS["k1"])))
    assert [(f.encoding, f.column) for f in scan_text(two_layers)] == [("base64", 6)]
    assert scan_text(two_layers, DetectorConfig(max_decode_depth=1)) == []
    assert scan_text(KEYS["k1"], DetectorConfig(max_decode_depth=0)) != []
    base64_of_base64 = FILTERS["b64"](f"blob: {FILTERS['b64'](KEYS['k1'])}")
    assert scan_text(base64_of_base64) == []


@pytest.mark.parametrize("lead", [b"", b"{", b'{"'], ids=["c21f", "NtX", "zbV"])
def test_base64_of_the_shortest_key_body_is_found_at_every_alignment(lead):
    """The prefilter asks a base64 marker for as many characters after it as the shortest body that
    `is_key_shaped` accepts takes (20): a key that short, whose base64 ends with it, must still be
    found, whichever of the three markers its alignment gives."""
    config = DetectorConfig(loose_org="[A-Za-z0-9]{8}", loose_secret="[A-Za-z0-9]{11}", min_base64_run=8)
    key = "sm_FakeTst9_Qw3Er5Ty7Ui"
    blob = base64.b64encode(lead + key.encode()).decode().rstrip("=")
    assert observed(scan_text(f"blob: {blob}", config)) == [(key, "candidate", 1, 7, "base64")]


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="strict_org"):
        DetectorConfig(strict_org="[")


# --- properties --------------------------------------------------------------------------------


def decodings(text: str, depth: int = 2) -> set[str]:
    """Every text the detector could legitimately find a key in: the input and its decodings."""
    found = {text}
    frontier = {text}
    for _ in range(depth):
        produced = set()
        for s in frontier:
            produced.add(urllib.parse.unquote(s))
            for run in re.findall(r"[A-Za-z0-9+/]+", s) + re.findall(r"[A-Za-z0-9_-]+", s):
                std = run.translate(str.maketrans("-_", "+/"))
                std = std[: len(std) - (len(std) % 4 == 1)]
                try:
                    produced.add(base64.b64decode(std + "=" * (-len(std) % 4)).decode("utf-8", "replace"))
                except ValueError:
                    pass
        frontier = produced - found
        found |= produced
    return found


KEY_PIECES = [
    KEYS["k1"],
    KEYS["c1"],
    FILTERS["b64"](KEYS["k1"]),
    FILTERS["b64url"](FILTERS["json"](KEYS["k2"])),
    FILTERS["pct"](KEYS["k2"]),
    "sm_",
    "sm%5F",
    "c21f",
    "NtX",
    "zbV",
    "%",
    "_",
    "=",
]
texts = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(KEY_PIECES)), max_size=12).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
def test_never_crashes_and_never_invents_a_token(text):
    sources = decodings(text)
    for finding in scan_text(text):
        assert any(finding.token in s for s in sources)
        assert 1 <= finding.line <= text.count("\n") + 1
        assert finding.column >= 1


SEPARATORS = [" ", "\n", "\t", '"', "'", "=", ":", ",", "(", ")", "<", ">", "`", ";", "[", "]"]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**64),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    left=st.sampled_from(SEPARATORS),
    right=st.sampled_from(SEPARATORS),
)
def test_embedded_key_is_found(seed, before, after, left, right):
    rng = random.Random(seed)
    key = "sm_" + "".join(rng.choices(BASE58, k=22)) + "_" + "".join(rng.choices(ALNUM, k=64))
    prefix = before + left
    text = prefix + key + right + after
    line = prefix.count("\n") + 1
    column = len(prefix) - prefix.rfind("\n")
    assert (key, "high", line, column, "plain") in observed(scan_text(text))
