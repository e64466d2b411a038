"""Benchmarks of the pipeline (issue 2), as ratios against baselines run in the same process on the
same machine, because these machines are shared and noisy (the ack benchmark is bench/ack.py).

- confirm: alert to confirmed revocation with the sandbox adding 20 ms to every call, for one
  token and for one 1,000-token alert, against the three calls' own 60 ms.
- big: ack time of one 10,000-token alert and the service's peak RSS while it handles it; then
  the ack time of one 100,000-token alert on PostgreSQL (one process, a throwaway local server,
  stand-ins in a process of their own as in bench/hol.py).
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ack import cpu_seconds, postgres_cpu_seconds, postgres_services, service_env, stand_ins
from service.sandbox import build_alert, seeded_keys
from tests.harness import Sandbox, Service, wait_until
from tests.pgserver import PostgresServer


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


def bench_big() -> dict[str, Any]:
    return {**big_sqlite(), "postgres": big_postgres()}


def big_sqlite(tokens: int = 10_000) -> dict[str, Any]:
    """Ack time of one alert of `tokens` fresh key-shaped tokens, none of them a key, on SQLite, and
    the service's peak RSS."""
    with Sandbox() as sandbox, tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), {**sandbox.env(), "LEAK_RESPONDER_LOG_LEVEL": "WARNING"}).start()
        try:
            rss_before = service.peak_rss_kib()
            body = build_alert(
                [f"sm_big{i:08d}{secrets.token_hex(12)}" for i in range(tokens)], url="https://x.test/a"
            )
            assert service.proc is not None
            cpu = cpu_seconds(service.proc.pid)
            started = time.perf_counter()
            response = service.post_alert(sandbox.github, [], body=body, timeout=60)
            ack = time.perf_counter() - started
            cpu = cpu_seconds(service.proc.pid) - cpu
            assert response.status_code == 200, response.text
            labelled = len(response.json())
            rss_peak = service.peak_rss_kib()
        finally:
            service.stop()
    return {
        "tokens": tokens,
        "body_mib": len(body) / 2**20,
        "ack_s": ack,
        # The service's CPU seconds for the alert: steadier than the ack time on a loaded machine.
        "service_cpu_s": cpu,
        "labelled": labelled,
        "rss_idle_mib": rss_before / 1024,
        "rss_peak_mib": rss_peak / 1024,
    }


def big_postgres(tokens: int = 100_000) -> dict[str, Any]:
    """Ack time of one alert of `tokens` fresh key-shaped tokens, none of them a key, on PostgreSQL."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        github, _, sm_url, keys_url = stack.enter_context(stand_ins(root))
        # 100,000 tokens are 12 MiB, over the default limit of 10 MiB.
        env = {**service_env(sm_url, keys_url), "LEAK_RESPONDER_BODY_LIMIT": str(32 * 2**20)}
        server = PostgresServer().start()
        stack.callback(server.stop)
        (service,) = postgres_services(root, env, server, "big", 1)
        stack.callback(service.stop)
        body = build_alert(
            [f"sm_big{i:08d}{secrets.token_hex(12)}" for i in range(tokens)], url="https://x.test/a"
        )
        assert service.proc is not None
        cpu = cpu_seconds(service.proc.pid), postgres_cpu_seconds(server)
        started = time.perf_counter()
        response = service.post_alert(github, [], body=body, timeout=180)
        ack = time.perf_counter() - started
        assert response.status_code == 200, response.text[:200]
        return {
            "tokens": tokens,
            "ack_s": ack,
            "service_cpu_s": cpu_seconds(service.proc.pid) - cpu[0],
            "postgres_server_cpu_s": postgres_cpu_seconds(server) - cpu[1],
            "labelled": len(response.json()),
        }
