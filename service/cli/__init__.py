"""`leak-responder`: the command-line shell over the service, the sandbox and the store.

One module per job: `processes` runs things (the service, the sandbox, migrations), `scan` finds
keys offline, `operator` talks to a running service's operator API.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from service.cli import operator, processes, scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leak-responder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (processes, scan, operator):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; when the reader of our output goes away (`incidents list | head`), stop
    quietly with the status of a tool ended by SIGPIPE rather than a BrokenPipeError traceback."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered would fail again, loudly, at the interpreter's own exit flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code
