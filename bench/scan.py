"""Throughput of the key detector against Python's `re` running the strict key pattern alone.

The baseline runs in the same process over the same text, so the ratio means the same on any
machine; the target is a ratio of at least 0.8 while the detector also finds encoded keys. The
figures are those of the prefilter the detector chose on this machine (hyperscan where it is
installed, `re` elsewhere), which the report names. The corpus is generated from a fixed seed; the
keys in it are fake and exist only in memory.

Each ratio comes twice: from wall-clock time, and from the process's CPU time, which a shared
machine disturbs less (time spent waiting for a core is not counted, cache contention still is).
"""

from __future__ import annotations

import base64
import random
import re
import time
import urllib.parse
from collections.abc import Callable

from service.detection import DEFAULT, scan_stream, scan_text
from service.detection.prefilter import PREFILTER

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_WORDS = (
    "request user config client session item cache index value result error handler token "
    "buffer stream window offset payload header status memory vector embedding document query"
).split()
_CHUNK = 1 << 16


def _fake_key(rng: random.Random) -> str:
    return "sm_" + "".join(rng.choices(_BASE58, k=22)) + "_" + "".join(rng.choices(_ALNUM, k=64))


def _code_line(rng: random.Random) -> str:
    a, b, c = rng.choices(_WORDS, k=3)
    return rng.choice(
        (
            f"    def {a}_{b}(self, {c}: int, {b}_id: str | None = None) -> dict[str, {b.title()}]:",
            f"        {a}_{b} = self.{c}.get('{a}', {rng.randint(0, 9999)})",
            f"    if not {a} or len({b}_{c}) > {rng.randint(1, 512)}: raise ValueError('{a} {b}')",
            f"import {a}.{b} as {c}; {c}.{a}_{b}_{c}_configuration_settings_default_value = True",
            f"    # The {a} is kept in {b} so that each {c} can reuse it without another round trip.",
            f'    nvcc_flags = ["-arch=sm_80", "-arch=sm_90a"]  # {a} kernels for {b}',
        )
    )


def _log_line(rng: random.Random) -> str:
    a, b = rng.choices(_WORDS, k=2)
    return (
        f"2025-01-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        f":07.{rng.randint(0, 999):03d}Z"
        f" INFO [worker-{rng.randint(1, 16)}] GET /v3/{a}?q={b}%20{a}&page={rng.randint(1, 99)} 200"
        f" {rng.randint(1, 900)}ms trace={rng.getrandbits(128):032x}"
    )


def _json_line(rng: random.Random) -> str:
    a, b, c = rng.choices(_WORDS, k=3)
    return (
        f'{{"id": {rng.randint(1, 10**9)}, "{a}": "{b} {c}", "tags": ["{c}", "{a}"], '
        f'"score": {rng.random():.6f}, "sha": "{rng.getrandbits(160):040x}"}}'
    )


def _blob_line(rng: random.Random) -> str:
    return "  blob: " + base64.b64encode(rng.randbytes(rng.randint(48, 600))).decode("ascii")


def _key_line(rng: random.Random) -> str:
    key = _fake_key(rng)
    as_json = base64.urlsafe_b64encode(b'{"apiKey": "%s"}' % key.encode()).decode("ascii").rstrip("=")
    return rng.choice(
        (
            f'curl -H "Authorization: Bearer {key}" https://api.supermemory.ai/v3/session',
            f"SUPERMEMORY_API_KEY={key}",
            f"  SUPERMEMORY_API_KEY: {base64.b64encode(key.encode()).decode('ascii')}",
            f"GET /import?keys={as_json}",
            f"GET /v3/search?apikey={urllib.parse.quote(key, safe='').replace('_', '%5F')}",
        )
    )


def build_corpus(size_mb: int, seed: int = 20250101) -> str:
    """A deterministic mix of code, logs, JSON and base64 blobs, with about one key per 5,000 lines."""
    rng = random.Random(seed)
    makers: tuple[Callable[[random.Random], str], ...] = (_code_line, _log_line, _json_line)
    target = size_mb * 1_000_000
    lines: list[str] = []
    size = 0
    while size < target:
        roll = rng.random()
        if roll < 0.0002:
            line = _key_line(rng)
        elif roll < 0.03:
            line = _blob_line(rng)
        else:
            line = rng.choice(makers)(rng)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def _best_seconds(actions: tuple[Callable[[], object], ...], repeats: int) -> tuple[list[float], list[float]]:
    """The best wall-clock and the best CPU time of each action, running them in turn in every
    round: a change in the machine's load (another process starting) then slows the baseline and
    the detector alike instead of skewing their ratio."""
    wall = [float("inf")] * len(actions)
    cpu = [float("inf")] * len(actions)
    for _ in range(repeats):
        for index, action in enumerate(actions):
            started, cpu_started = time.perf_counter(), time.process_time()
            action()
            wall[index] = min(wall[index], time.perf_counter() - started)
            cpu[index] = min(cpu[index], time.process_time() - cpu_started)
    return wall, cpu


def run(size_mb: int = 50, repeats: int = 5) -> dict[str, float | str]:
    text = build_corpus(size_mb)
    megabytes = len(text.encode("utf-8")) / 1_000_000
    strict = re.compile(DEFAULT.strict_pattern)
    chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)]

    (baseline, whole, streamed), (baseline_cpu, whole_cpu, streamed_cpu) = _best_seconds(
        (
            lambda: sum(1 for _ in strict.finditer(text)),
            lambda: scan_text(text),
            lambda: sum(1 for _ in scan_stream(chunks)),
        ),
        repeats,
    )
    findings = scan_text(text)
    return {
        "prefilter": PREFILTER.name,
        "megabytes": round(megabytes, 1),
        "findings": len(findings),
        "findings_encoded": sum(1 for f in findings if f.encoding != "plain"),
        "re_strict_mb_s": round(megabytes / baseline, 1),
        "scan_text_mb_s": round(megabytes / whole, 1),
        "scan_stream_mb_s": round(megabytes / streamed, 1),
        "scan_text_ratio": round(baseline / whole, 3),
        "scan_stream_ratio": round(baseline / streamed, 3),
        "scan_text_cpu_ratio": round(baseline_cpu / whole_cpu, 3),
        "scan_stream_cpu_ratio": round(baseline_cpu / streamed_cpu, 3),
    }


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name:>20}: {value}")
