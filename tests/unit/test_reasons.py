"""Every reason code is a member of `service.reasons.Reason`, and docs/reasons.md lists exactly those,
so an operator who reads one in a log line, a metric or a page can look it up, and a code nobody can
produce does not linger on the page."""

from __future__ import annotations

import re
from pathlib import Path

from service.reasons import Reason

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reasons.md"

# A reason written as a bare string where a reason goes: the first argument after failure()'s stage,
# a log line's or an event's "reason", a transition's "last_reason".
BARE = [
    re.compile(r'failure\(\s*\w+,\s*"[a-z_]+",\s*"([a-z_]+)"'),
    re.compile(r'"(?:last_)?reason":\s*"([a-z_]+)"'),
]


def documented() -> set[str]:
    """The codes in the first column of the page's tables (a cell may name several)."""
    cells = re.findall(r"^\| ([^|]+)\|", DOC.read_text(), flags=re.M)
    return {code for cell in cells for code in re.findall(r"`([a-z0-9_]+)`", cell)}


def test_the_page_lists_every_reason_and_nothing_else():
    codes = {m.value for m in Reason}
    assert sorted(codes - documented()) == [], "docs/reasons.md lacks these"
    assert sorted(documented() - codes) == [], "docs/reasons.md lists codes the enum does not have"


def test_no_reason_is_a_bare_string_in_the_service():
    found = {}
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        for pattern in BARE:
            for literal in pattern.findall(text):
                found[literal] = path.relative_to(ROOT)
    assert found == {}, "use a Reason member instead"


def test_every_reason_is_in_a_test():
    """A reason no test mentions is one nobody has seen the code produce: its log line, its metric
    or the failure itself may be broken without anyone noticing. A test names it as the word
    itself (as the log and the metric carry it) or as its enum member."""
    tests = "\n".join(
        path.read_text() for path in (ROOT / "tests").rglob("*.py") if path != Path(__file__).resolve()
    )
    missing = sorted(
        m.value
        for m in Reason
        if not re.search(rf"\b{m.value}\b", tests) and not re.search(rf"\bReason\.{m.name}\b", tests)
    )
    assert not missing, f"no test mentions {missing}"
