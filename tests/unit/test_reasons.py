"""docs/reasons.md lists every reason code the code can report, so an operator who reads one in a
log line or a metric can look it up."""

from __future__ import annotations

import re
from pathlib import Path

from service.alerting import PageCode
from service.inbound.reasons import InboundReason
from service.inbound.reports import ReportReason
from service.notify.smtp import SendReason
from service.operators import OperatorReason
from service.supermemory import CallReason

ROOT = Path(__file__).resolve().parents[2]

# A reason passed to failure() as a literal, or written as a log line's or an event's reason.
LITERALS = [
    re.compile(r'failure\(\s*\w+,\s*"[a-z_]+",\s*"([a-z_]+)"'),
    re.compile(r'"reason":\s*"([a-z_]+)"'),
    re.compile(r'"last_reason":\s*"([a-z_]+)"'),
    re.compile(r'"(probe_[a-z_]+)"'),
    re.compile(r'error\(\s*\d+,\s*"([a-z_]+)"'),
    re.compile(r'_unconfirmed\(\s*\w+,\s*\w+,\s*"([a-z_]+)"'),
    re.compile(r'_retry\(\s*\w+,\s*\w+,\s*"[a-z_]+",\s*"([a-z_]+)"'),
]
NOT_REASONS = {"probe_alive", "probe_inconclusive", "probe_calls", "probe_path", "probe_schedule"}


ENUMS = (InboundReason, ReportReason, OperatorReason, CallReason, SendReason, PageCode)


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for enum in ENUMS:
        found |= {m.value for m in enum}
    found |= {
        f"probe_{r}" for r in (CallReason.TIMEOUT, CallReason.CONNECTION_ERROR, CallReason.BAD_RESPONSE)
    }
    for path in (ROOT / "service").rglob("*.py"):
        if "sandbox" in path.parts:
            continue
        text = path.read_text()
        for pattern in LITERALS:
            found |= set(pattern.findall(text))
    return found - NOT_REASONS - {"probe_inconclusive_window"}


def test_every_reason_is_documented():
    documented = set(re.findall(r"`([a-z0-9_]+)`", (ROOT / "docs" / "reasons.md").read_text()))
    missing = sorted(reasons_in_code() - documented)
    assert not missing, f"docs/reasons.md lacks {missing}"


def test_the_scan_finds_reasons_outside_enums():
    found = reasons_in_code()
    for literal in (
        "store_unavailable",
        "step_crashed",
        "shape_gate",
        "not_a_key",
        "resend_unknown_outcome",
        "reporter_disabled",
        "token_unavailable",
    ):
        assert literal in found


def test_every_reason_is_in_a_test():
    """A reason no test mentions is one nobody has seen the code produce: its log line, its metric
    or the failure itself may be broken without anyone noticing. A test names it as the word
    itself (a string, as the log and the metric carry it) or as its enum member."""
    tests = "\n".join(
        path.read_text() for path in (ROOT / "tests").rglob("*.py") if path != Path(__file__).resolve()
    )
    members = {m.value: f"{enum.__name__}.{m.name}" for enum in ENUMS for m in enum}
    missing = sorted(
        reason
        for reason in reasons_in_code()
        if not re.search(rf"\b{reason}\b", tests)
        and not (reason in members and re.search(rf"\b{re.escape(members[reason])}\b", tests))
    )
    assert not missing, f"no test mentions {missing}"
