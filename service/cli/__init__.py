"""`leak-responder`: the command-line shell over the service, the sandbox and the store.

One module per job: `processes` runs things (the service, the sandbox, migrations), `scan` finds
keys offline, `operator` talks to a running service's operator API.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.cli import operator, processes, scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leak-responder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (processes, scan, operator):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
