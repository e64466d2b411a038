"""Benchmarks of the pipeline (issue 2), as ratios against baselines run in the same process on the
same machine, because these machines are shared and noisy (the ack benchmark is bench/ack.py).

- confirm: alert to confirmed revocation with the sandbox adding 20 ms to every call, for one
  token and for one 1,000-token alert, against the three calls' own 60 ms.
- big: ack time of one 10,000-token alert and the service's peak RSS while it handles it.
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from service.sandbox import build_alert, seeded_keys
from tests.harness import Sandbox, Service, wait_until


def bench_confirm(runs: int = 15) -> dict[str, Any]:
    with Sandbox(keys=0) as sandbox, tempfile.TemporaryDirectory() as tmp:
        sandbox.supermemory.set_knobs(latency_ms={"all": 20})
        service = Service(
            Path(tmp),
            {
                **sandbox.env(),
                "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
                "LEAK_RESPONDER_PROBE_SCHEDULE": "0,2,5,15",
            },
        ).start()
        try:
            # Timed from the send to the `confirmed_at` the service recorded, so the poll that
            # notices it adds nothing to the figure.
            singles = []
            for key in seeded_keys(runs, seed="bench-single"):
                sandbox.supermemory.add_keys([key])
                sent = time.time()
                service.post_alert(sandbox.github, [key.token])
                row = wait_until(lambda k=key: service.confirmed(k.token), interval=0.01)
                singles.append(row["confirmed_at"] - sent)
            many = seeded_keys(1000, seed="bench-many")
            sandbox.supermemory.add_keys(many)
            sent = time.time()
            service.post_alert(sandbox.github, [k.token for k in many])
            wait_until(
                lambda: service.count_state("confirmed") >= runs + len(many), timeout=120, interval=0.02
            )
            with service.db() as conn:
                thousand = conn.execute("SELECT max(confirmed_at) FROM incidents").fetchone()[0] - sent
        finally:
            service.stop()
    p50 = statistics.median(singles)
    return {
        "single_p50_ms": 1000 * p50,
        "single_overhead_ms": 1000 * p50 - 60,
        "thousand_all_confirmed_s": thousand,
    }


def bench_big(tokens: int = 10_000) -> dict[str, Any]:
    with Sandbox() as sandbox, tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), {**sandbox.env(), "LEAK_RESPONDER_LOG_LEVEL": "WARNING"}).start()
        try:
            rss_before = service.peak_rss_kib()
            body = build_alert(
                [f"sm_big{i:08d}{secrets.token_hex(12)}" for i in range(tokens)], url="https://x.test/a"
            )
            started = time.perf_counter()
            response = service.post_alert(sandbox.github, [], body=body, timeout=60)
            ack = time.perf_counter() - started
            assert response.status_code == 200, response.text
            labelled = len(response.json())
            rss_peak = service.peak_rss_kib()
        finally:
            service.stop()
    return {
        "tokens": tokens,
        "body_mib": len(body) / 2**20,
        "ack_s": ack,
        "labelled": labelled,
        "rss_idle_mib": rss_before / 1024,
        "rss_peak_mib": rss_peak / 1024,
    }
