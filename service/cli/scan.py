"""`leak-responder scan`: detection only, offline (also the pre-commit hook).

Directories are walked (VCS metadata skipped, symlinked directories not followed, so a loop cannot
hang a hook). A file that cannot be read is reported and the scan goes on, so one unreadable file
never hides the keys in the others nor the summary. Known findings can be allowed: on their line,
with a `leak-responder:allow` comment, or by hash in an allowlist file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from service.detection import Finding, scan_stream

_CHUNK = 1 << 16
ALLOW_MARKER = "leak-responder:allow"
ALLOWLIST = ".leak-responder-allow"
_SKIPPED_DIRS = frozenset({".git", ".hg", ".svn"})
# An allowlist line: a finding's SHA-256 as `scan` prints it (16 hex digits) or whole, then anything.
_HASH = re.compile(r"([0-9a-f]{16,64})\b")


def _chunks(stream: TextIO) -> Iterator[str]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _progress(name: str, total: int | None, show: bool) -> Callable[[int], None] | None:
    if not show:
        return None

    def report(scanned: int) -> None:
        of = f" of {total / 2**20:.1f}" if total else ""
        print(f"\r{name}: {scanned / 2**20:.1f}{of} MiB scanned", end="", file=sys.stderr, flush=True)

    return report


@dataclass
class _Marked:
    """The numbers of the lines holding the allow marker, noted while the chunks go by."""

    lines: set[int] = field(default_factory=set)

    def watch(self, chunks: Iterable[str]) -> Iterator[str]:
        line, tail = 1, ""
        for chunk in chunks:
            text = tail + chunk
            first = line - tail.count("\n")
            for match in re.finditer(re.escape(ALLOW_MARKER), text):
                self.lines.add(first + text.count("\n", 0, match.start()))
            line += chunk.count("\n")
            tail = text[-(len(ALLOW_MARKER) - 1) :]
            yield chunk


@dataclass
class _Tally:
    files: int = 0
    found: int = 0
    allowed: int = 0
    unreadable: int = 0


def _allowed_hashes(path: Path | None) -> set[str]:
    if path is None:
        return set()
    hashes = set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        match = _HASH.match(raw.strip())
        if match:
            hashes.add(match[1])
    return hashes


def _is_allowed(finding: Finding, marked: _Marked, hashes: set[str]) -> bool:
    return finding.line in marked.lines or any(finding.token_hash.startswith(h) for h in hashes)


def _scan_one(
    name: str, stream: TextIO, total: int | None, show: bool, hashes: set[str], tally: _Tally
) -> None:
    progress = _progress(name, total, show)
    marked = _Marked()
    # Collected first: the marker may come after the key on its line, in a later chunk.
    findings = list(scan_stream(marked.watch(_chunks(stream)), progress=progress))
    if progress is not None:
        print(file=sys.stderr)
    tally.files += 1
    for finding in findings:
        if _is_allowed(finding, marked, hashes):
            tally.allowed += 1
            continue
        tally.found += 1
        print(
            f"{name}:{finding.line}:{finding.column}: {finding.redacted}"
            f" confidence={finding.confidence} encoding={finding.encoding}"
            f" sha256={finding.token_hash[:16]}"
        )


def _files(name: str, tally: _Tally) -> Iterator[Path]:
    """`name` if it is a file; every file under it, in order, if it is a directory."""
    path = Path(name)
    if not path.is_dir():
        yield path
        return

    def unreadable(exc: OSError) -> None:
        tally.unreadable += 1
        print(f"leak-responder: cannot read {exc.filename}: {exc.strerror or exc}", file=sys.stderr)

    for root, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for file in sorted(files):
            yield Path(root) / file


def cmd_scan(args: argparse.Namespace) -> int:
    """Exit 1 when any key is found (a pre-commit hook or a CI step fails on a leak), else 2 when
    some file could not be read (the scan was incomplete), else 0."""
    show = args.progress or sys.stderr.isatty()
    allowlist = Path(args.allowlist) if args.allowlist else Path(ALLOWLIST)
    try:
        hashes = _allowed_hashes(allowlist if args.allowlist or allowlist.is_file() else None)
    except OSError as exc:
        print(f"leak-responder: cannot read {allowlist}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    tally = _Tally()
    for name in args.paths:
        if name == "-":
            _scan_one(name, sys.stdin, None, show, hashes, tally)
            continue
        for path in _files(name, tally):
            try:
                # Undecodable bytes become U+FFFD: a key is ASCII, and a binary file must not stop a hook.
                with path.open(encoding="utf-8", errors="replace") as stream:
                    _scan_one(str(path), stream, path.stat().st_size, show, hashes, tally)
            except BrokenPipeError:
                raise  # our reader went away, not the file: the entry point ends quietly
            except OSError as exc:
                tally.unreadable += 1
                print(f"leak-responder: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
    print(
        f"leak-responder: {tally.files} file(s) scanned, {tally.found} Supermemory key(s) found"
        f", {tally.allowed} allowed, {tally.unreadable} unreadable"
        + ("; revoke them before sharing" if tally.found else ""),
        file=sys.stderr,
    )
    if tally.found:
        return 1
    return 2 if tally.unreadable else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scan = sub.add_parser(
        "scan",
        help="find Supermemory keys in files and directories, offline (exit 1 when any is found)",
        description=(
            "Find Supermemory API keys, plain or encoded, offline. Directories are walked (.git, .hg and"
            " .svn skipped). Placeholder-looking keys (a run of one character, or words such as"
            " 'example', 'placeholder', 'yourkey', 'redacted', 'changeme') are not reported."
            f" A finding is allowed by a '{ALLOW_MARKER}' comment on its line, or by its sha256 (as"
            f" printed, or whole) on a line of the allowlist file ({ALLOWLIST} in the working"
            " directory, or --allowlist). Exit 1 when a key is found, 2 when a file could not be"
            " read (the others are still scanned), else 0."
        ),
    )
    scan.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or directories to scan, or - for standard input"
    )
    scan.add_argument("--progress", action="store_true", help="show progress even when stderr is no terminal")
    scan.add_argument(
        "--allowlist", metavar="FILE", help=f"allowed findings' sha256, one a line (default: {ALLOWLIST})"
    )
    scan.set_defaults(func=cmd_scan)
