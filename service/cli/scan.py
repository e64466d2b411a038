"""`leak-responder scan`: detection only, offline (also the pre-commit hook)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from service.detection import scan_stream

_CHUNK = 1 << 16


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


def _scan_one(name: str, stream: TextIO, total: int | None, show: bool) -> int:
    progress = _progress(name, total, show)
    found = 0
    for finding in scan_stream(_chunks(stream), progress=progress):
        found += 1
        if progress is not None:
            print(file=sys.stderr)
        print(
            f"{name}:{finding.line}:{finding.column}: {finding.redacted}"
            f" confidence={finding.confidence} encoding={finding.encoding}"
            f" sha256={finding.token_hash[:16]}"
        )
    if progress is not None:
        print(file=sys.stderr)
    return found


def cmd_scan(args: argparse.Namespace) -> int:
    """Exit 1 when any key is found, so that a pre-commit hook or a CI step fails on a leak."""
    show = args.progress or sys.stderr.isatty()
    found = 0
    for name in args.paths:
        try:
            if name == "-":
                found += _scan_one(name, sys.stdin, None, show)
                continue
            path = Path(name)
            # Undecodable bytes become U+FFFD: a key is ASCII, and a binary file must not stop a hook.
            with path.open(encoding="utf-8", errors="replace") as stream:
                found += _scan_one(name, stream, path.stat().st_size, show)
        except OSError as exc:
            print(f"leak-responder: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if found:
        print(
            f"leak-responder: {found} Supermemory key(s) found; revoke them before sharing", file=sys.stderr
        )
    return 1 if found else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scan = sub.add_parser(
        "scan", help="find Supermemory keys in files, offline (exit 1 when any is found; a pre-commit hook)"
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="files to scan, or - for standard input")
    scan.add_argument("--progress", action="store_true", help="show progress even when stderr is no terminal")
    scan.set_defaults(func=cmd_scan)
