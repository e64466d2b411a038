"""Manual reports in: whatever an operator pastes or a scanner wrote, turned into keys to handle.

Operators send what they have at hand, so the body is recognised by its shape rather than by a
declared format: a paste of text, a small JSON envelope, a gitleaks report or a trufflehog one.
Every candidate goes through the detector, even the secrets a scanner already isolated, because a
scanner's "secret" for another rule (an AWS key, a password) must not become one of our incidents,
and only explicitly listed tokens skip it (those are routed by shape, as partner alerts are).

This module only parses: it knows nothing of the store, the pipeline or HTTP, so that the CLI's
offline `scan` and the service read reports the same way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

from service.detection import Finding, scan_text
from service.inbound.body import BodyBudget
from service.reasons import Reason
from service.refusal import Refusal
from service.tokens import KEY_SHAPE, redact, token_hash

# Room for a large paste or a scanner's report, small enough that one request cannot hog the
# detector: a report is scanned inside the request, not in the background.
REPORT_LIMIT = 1024 * 1024
NOTE_LIMIT = 2000


STATUS: dict[Reason, int] = {
    Reason.REPORT_TOO_LARGE: 413,
    Reason.BODY_BUDGET_FULL: 503,
    Reason.REPORT_NOT_UTF8: 400,
    Reason.REPORT_UNRECOGNISED: 400,
    Reason.REPORT_BAD_FIELD: 400,
    Reason.REPORT_NOTE_HOLDS_KEY: 400,
}


class ReportError(Refusal):
    STATUS = STATUS


@dataclass(frozen=True, slots=True, repr=False)
class ReportItem:
    """One key (or listed token) of a report, and where the report says it was.

    `line`/`column` are the finding's own for pasted text and the scanner's for scanner reports;
    `confidence` is None for listed tokens, which did not go through the detector.
    """

    token: str
    token_type: str
    confidence: str | None
    line: int | None
    column: int | None
    encoding: str | None
    file: str | None
    url: str | None

    @property
    def token_hash(self) -> str:
        return token_hash(self.token)

    @property
    def redacted(self) -> str:
        return redact(self.token)

    def __repr__(self) -> str:
        return f"ReportItem(token={self.redacted!r}, file={self.file!r}, line={self.line!r})"


@dataclass(frozen=True, slots=True)
class Report:
    kind: str  # text, tokens, gitleaks or trufflehog
    items: list[ReportItem]
    note: str | None = None


DETECTED = "supermemory_api_key"
LISTED = "listed"

_JSON_TYPES = ("application/json", "application/x-ndjson", "application/jsonl", "application/json-seq")


async def read_report(
    chunks: AsyncIterator[bytes], headers: Mapping[str, str], budget: BodyBudget, limit: int = REPORT_LIMIT
) -> bytes:
    """The body under the report limit and within the bodies' shared budget (see `BodyBudget`)."""
    too_large = ReportError(Reason.REPORT_TOO_LARGE, f"report exceeds the limit of {limit} bytes")
    return await budget.read_as(chunks, headers, limit, too_large)


def parse_report(body: bytes, content_type: str | None) -> Report:
    """Recognise and parse a report body.

    `text/plain` is always text. A JSON media type promises one of the JSON shapes, so a body that
    is none of them is refused rather than scanned as text, which could silently find nothing.
    Anything else is sniffed: a known JSON shape if it is one, text otherwise.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError(Reason.REPORT_NOT_UTF8, "report is not UTF-8") from None
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "text/plain":
        return _text(text, None, None)
    report = _structured(text)
    if report is not None:
        return report
    if media in _JSON_TYPES or media.endswith("+json"):
        raise ReportError(
            Reason.REPORT_UNRECOGNISED,
            'expected {"text": …}, {"tokens": […]}, a gitleaks JSON report or trufflehog JSON lines',
        )
    return _text(text, None, None)


def _structured(text: str) -> Report | None:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return _trufflehog_lines(text)
    if isinstance(document, dict) and "text" in document:
        return _text(
            _string(document, "text", required=True),
            _string(document, "url"),
            check_note(_string(document, "note")),
        )
    if isinstance(document, dict) and "tokens" in document:
        return _tokens(document)
    if isinstance(document, list) and all(_is_gitleaks(entry) for entry in document):
        return Report("gitleaks", [item for entry in document for item in _gitleaks(entry)])
    if _is_trufflehog(document):
        return Report("trufflehog", list(_trufflehog(document)))
    return None


def _text(text: str, url: str | None, note: str | None) -> Report:
    return Report("text", [_detected(f, None, url, f.line, f.column) for f in scan_text(text)], note)


def _tokens(document: dict[str, Any]) -> Report:
    tokens = document["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ReportError(Reason.REPORT_BAD_FIELD, "field 'tokens' must be a non-empty array of strings")
    url, note = _string(document, "url"), check_note(_string(document, "note"))
    items = [ReportItem(t, LISTED, None, None, None, None, None, url) for t in tokens]
    return Report("tokens", items, note)


def _is_gitleaks(entry: object) -> bool:
    return isinstance(entry, dict) and ("Secret" in entry or "Match" in entry) and "RuleID" in entry


def _gitleaks(entry: dict[str, Any]) -> list[ReportItem]:
    """Gitleaks' `Secret` is the rule's capture, `Match` the whole match around it; the capture of
    a generic rule can cut a key short, so the match is the fallback."""
    file = entry.get("File") if isinstance(entry.get("File"), str) else None
    url = entry.get("Link") if isinstance(entry.get("Link"), str) and entry.get("Link") else None
    line, column = _int(entry.get("StartLine")), _int(entry.get("StartColumn"))
    for field in ("Secret", "Match"):
        value = entry.get(field)
        findings = scan_text(value) if isinstance(value, str) else []
        if findings:
            return [_detected(f, file, url, line, column) for f in findings]
    return []


def _is_trufflehog(entry: object) -> bool:
    return isinstance(entry, dict) and "SourceMetadata" in entry and ("Raw" in entry or "RawV2" in entry)


def _trufflehog_lines(text: str) -> Report | None:
    entries = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not _is_trufflehog(entry):
            return None
        entries.append(entry)
    if not entries:
        return None
    return Report("trufflehog", [item for entry in entries for item in _trufflehog(entry)])


def _trufflehog(entry: dict[str, Any]) -> Iterator[ReportItem]:
    """`Raw` is the secret, `RawV2` the secret with its context (for keys that come in parts); where
    it was lives under `SourceMetadata.Data.<source>` with a shape per source."""
    meta = entry["SourceMetadata"]
    data = meta.get("Data") if isinstance(meta, dict) else None
    where: dict[str, Any] = {}
    if isinstance(data, dict):
        where = next((v for v in data.values() if isinstance(v, dict)), {})
    file = where.get("file") if isinstance(where.get("file"), str) else None
    url = where.get("link") or where.get("repository") or where.get("url")
    url = url if isinstance(url, str) and url else None
    line = _int(where.get("line"))
    seen: set[str] = set()
    for field in ("Raw", "RawV2"):
        value = entry.get(field)
        for finding in scan_text(value) if isinstance(value, str) else []:
            if finding.token_hash not in seen:
                seen.add(finding.token_hash)
                yield _detected(finding, file, url, line, None)


def _detected(
    finding: Finding, file: str | None, url: str | None, line: int | None, column: int | None
) -> ReportItem:
    return ReportItem(finding.token, DETECTED, finding.confidence, line, column, finding.encoding, file, url)


@overload
def _string(document: dict[str, Any], field: str, *, required: Literal[True]) -> str: ...
@overload
def _string(document: dict[str, Any], field: str, *, required: Literal[False] = False) -> str | None: ...
def _string(document: dict[str, Any], field: str, *, required: bool = False) -> str | None:
    """The field's string; other JSON types are refused by name only, as the value may be a key."""
    value = document.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ReportError(Reason.REPORT_BAD_FIELD, f"field {field!r} must be a string")
    return value if required else value or None


def check_note(note: str | None) -> str | None:
    """Notes (a report's, an operator's resolution) are stored and shown as they are, so one
    holding a key is refused, not redacted: the key belongs where it gets handled (a report's `text`
    or `tokens`)."""
    if note is None:
        return None
    if len(note) > NOTE_LIMIT:
        raise ReportError(Reason.REPORT_BAD_FIELD, f"field 'note' is longer than {NOTE_LIMIT} characters")
    if scan_text(note) or KEY_SHAPE.search(note):
        raise ReportError(
            Reason.REPORT_NOTE_HOLDS_KEY, "the note holds a key; send keys in 'text' or 'tokens'"
        )
    return note


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
