"""`make bench` (`python -m bench [NAME ...]`): every benchmark, or the named ones, as JSON.

Each figure comes with its baseline from the same run; BENCHMARKS.md keeps the latest.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import ack, channels, console, core, hol, notify, pg, public, scan

BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "ack": ack.run,
    "confirm": core.bench_confirm,
    "big": core.bench_big,
    "hol": hol.run,
    "scan": scan.run,
    "notify": notify.run,
    "pg": pg.run,
    "console": console.run,
    "public": public.run,
    "channels": channels.run,
}


def main(names: list[str]) -> int:
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have {', '.join(BENCHMARKS)}")
        return 2
    for name in names or list(BENCHMARKS):
        started = time.perf_counter()
        result = BENCHMARKS[name]()
        result["bench_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: result}, indent=2, default=lambda v: round(v, 3)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
