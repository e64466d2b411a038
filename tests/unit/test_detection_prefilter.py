"""The detector's prefilters: which one is chosen, and that they agree on where to look.

test_detection.py runs the whole detector under each prefilter; these tests pin down the parts
that only one of them has (hyperscan's byte offsets, its scratch space, its prefilter mode) and
the choice made at import.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.detection import DEFAULT, DetectorConfig, scan_text, scanner
from service.detection import prefilter as prefilters

needs_hyperscan = pytest.mark.skipif(prefilters.hyperscan is None, reason="hyperscan is not installed")

# FAKE, shaped like a strict key and never issued.
KEY = "sm_FakeTestZq8Rk3Wm5Vn7Xp_" + "Ab3dEf6hJk9mNp2q" * 4
# A base64 marker followed by as much base64 as the shortest key body needs: 27 characters, the
# last one percent-encoded as in a URL.
MARKED = "c21f" + "Ab3/" * 6 + "xy%2B"


def lines(strategy: type[prefilters.Prefilter], text: str) -> list[tuple[int, int]]:
    return scanner._compile(DEFAULT, strategy).prefilter.lines(text).spans


def test_hyperscan_is_chosen_where_installed():
    expected = prefilters.RegexLines if prefilters.hyperscan is None else prefilters.HyperscanLines
    assert prefilters.PREFILTER is expected
    if platform.machine() == "x86_64":
        # pyproject.toml installs it on x86-64: anything else here is a broken environment.
        assert prefilters.PREFILTER is prefilters.HyperscanLines


def test_re_is_chosen_without_hyperscan():
    """In a fresh interpreter where `import hyperscan` fails, as on a machine it has no wheel for."""
    program = (
        "import sys\n"
        "sys.modules['hyperscan'] = None\n"
        "from service.detection import scan_text\n"
        "from service.detection.prefilter import PREFILTER\n"
        "print(PREFILTER.name, [(f.line, f.column) for f in scan_text(sys.stdin.read())])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        input=f"é\nx-api-key: {KEY}\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split(" ", 1) == ["re", "[(2, 12)]\n"]


@needs_hyperscan
@pytest.mark.parametrize("wide", ["é", "é中😀", "\ud800"], ids=["latin-1", "utf-8", "surrogate"])
def test_hyperscan_spans_are_characters(wide):
    text = f"{wide}\n{wide} {KEY} {wide}\nplain\n{wide} {MARKED}"
    second = len(wide) + 1
    expected = [(second, second + 2 * len(wide) + 2 + len(KEY)), (text.rindex(f"{wide} {MARKED}"), len(text))]
    assert lines(prefilters.HyperscanLines, text) == expected
    assert lines(prefilters.RegexLines, text) == expected


PIECES = [KEY, "sm_", "sm%5F", "sm%5f", "c21f", "NtX", "zbV", "\n", "_", "%5F", KEY[:40], KEY[30:]]
PIECES += ["Ab3/" * 7, "%2B"]
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())
TEXTS = st.lists(st.one_of(st.text(ANY_CHARACTER, max_size=20), st.sampled_from(PIECES)), max_size=15).map(
    "".join
)


@pytest.mark.parametrize(
    "strategy", [prefilters.RegexLines, pytest.param(prefilters.HyperscanLines, marks=needs_hyperscan)]
)
def test_a_marker_needs_as_much_base64_as_a_key_body(strategy):
    """`c21f` alone is common in hex digests; only followed by 27 base64 characters or %XX sequences
    (what the shortest key body takes after it) could it start a key's base64."""
    hexes = "trace=0123456789c21ff196893e1ba026\nsha=0123456789abcdef0123c21f0123456789abcdef"
    assert lines(strategy, hexes) == []
    assert lines(strategy, f"x\n{MARKED}\n") == [(2, 2 + len(MARKED))]
    assert lines(strategy, f"x\n{MARKED[:-1]}\n") == []
    assert lines(strategy, f"NtX{'a' * 27}") == [(0, 30)]
    assert lines(strategy, f"NtX{'a' * 26}") == []
    assert lines(strategy, f"NtX{'a-b_' * 7}") == [(0, 31)]  # base64url's alphabet
    # zbV's alignment leaves 28 characters to follow it, here half of them percent-encoded.
    assert lines(strategy, f"zbV{'a%2F' * 14}") == [(0, 59)]
    assert lines(strategy, f"zbV{'a%2F' * 13}a%2") == []


@needs_hyperscan
@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_prefilters_flag_the_same_lines(text):
    """For the default shapes hyperscan's prefilter mode is exact, so both flag exactly the same."""
    assert lines(prefilters.HyperscanLines, text) == lines(prefilters.RegexLines, text)


@needs_hyperscan
@pytest.mark.parametrize(
    "strict_org",
    [
        "(?>[1-9A-HJ-NP-Za-km-z]{22})",  # atomic group
        "(?=F)[1-9A-HJ-NP-Za-km-z]{22}",  # lookahead
        "[1-9A-HJ-NP-Za-km-z]{22}+",  # possessive
    ],
)
def test_hyperscan_runs_shapes_it_cannot_match_exactly(monkeypatch, strict_org):
    monkeypatch.setattr(prefilters, "PREFILTER", prefilters.HyperscanLines)
    (finding,) = scan_text(f"key={KEY}", DetectorConfig(strict_org=strict_org))
    assert (finding.token, finding.confidence, finding.column) == (KEY, "high", 5)


@needs_hyperscan
@pytest.mark.timeout(60)
def test_hyperscan_scans_from_many_threads_at_once():
    """The scan releases the GIL, so threads really do overlap inside one database."""
    # Near misses keep hyperscan busy far longer than encoding the text holds the GIL.
    text = ("sm_" + "a1" * 15 + "_" + "b2" * 10 + " ") * 30_000 + f"\n{KEY}\n"
    compiled = scanner._compile(DEFAULT, prefilters.HyperscanLines)
    start = threading.Barrier(8, timeout=20)

    def scan(_: int) -> list[list[tuple[int, int]]]:
        start.wait()
        return [compiled.prefilter.lines(text).spans for _ in range(4)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(scan, range(8)))
    assert results == [[[(len(text) - len(KEY) - 1, len(text) - 1)]] * 4] * 8
