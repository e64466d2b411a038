"""How a report body is recognised: by its shape, with the media type only to break ties."""

from __future__ import annotations

import json

import pytest

from service.inbound.reports import ReportError, parse_report

KEY = "sm_5KpQ2wXz9RtYbN3mHvJcLd_" + "q7Wm2Zr8Kx4Nf6Hd1Jt3Vb9Lc5Gp0Ys" + "e2Ra8Tu4Oi6Pa1Sd3Fg5Hj7Kl9Zx0CvMn"
GITLEAKS = [
    {"RuleID": "generic-api-key", "File": "x.env", "StartLine": 3, "Secret": "cut", "Match": f"K={KEY}"}
]
TRUFFLEHOG = {"SourceMetadata": {"Data": {"Filesystem": {"file": "y.txt", "line": 9}}}, "Raw": KEY}


@pytest.mark.parametrize(
    ("body", "content_type", "kind", "where"),
    [
        (f"a\nb={KEY}", "text/plain", "text", (None, 2, 3)),
        (f"a\nb={KEY}", None, "text", (None, 2, 3)),
        # text/plain wins over a body that happens to be JSON.
        (json.dumps({"tokens": [KEY]}), "text/plain", "text", (None, 1, 14)),
        (json.dumps({"text": f"b={KEY}"}), None, "text", (None, 1, 3)),
        (json.dumps({"tokens": [KEY]}), "application/json", "tokens", (None, None, None)),
        # gitleaks' Secret holds no key here, so its Match is scanned.
        (json.dumps(GITLEAKS), None, "gitleaks", ("x.env", 3, None)),
        (json.dumps(TRUFFLEHOG), None, "trufflehog", ("y.txt", 9, None)),
        (json.dumps(TRUFFLEHOG) + "\n\n" + json.dumps(TRUFFLEHOG), None, "trufflehog", ("y.txt", 9, None)),
        # JSON of no known shape, sent without a JSON media type, is still text to scan.
        (json.dumps({"config": {"key": KEY}}), None, "text", (None, 1, 21)),
    ],
)
def test_recognised(body, content_type, kind, where):
    report = parse_report(body.encode(), content_type)
    assert report.kind == kind
    assert {(i.file, i.line, i.column) for i in report.items} == {where}
    assert KEY not in repr(report)


def test_empty_gitleaks_report_is_a_report():
    assert parse_report(b"[]", "application/json").items == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff", "report_not_utf8"),
        (b"[1, 2]", "report_unrecognised"),
        (b'{"tokens": []}', "report_bad_field"),
        (b'{"tokens": [1]}', "report_bad_field"),
        (b'{"text": "x", "url": 5}', "report_bad_field"),
        (json.dumps({"text": "x", "note": "n" * 2001}).encode(), "report_bad_field"),
        (json.dumps({"tokens": ["x"], "note": f"it was {KEY}"}).encode(), "report_note_holds_key"),
    ],
)
def test_refused(body, reason):
    with pytest.raises(ReportError) as caught:
        parse_report(body, "application/json")
    assert caught.value.reason == reason
    assert KEY not in str(caught.value)
