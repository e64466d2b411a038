"""Head-of-line blocking (issue 13, item 8): how long a small alert waits while a 100,000-token alert
is being acknowledged, against the same small alert on the idle service in the same run.

On each backend (SQLite, PostgreSQL with one process) the service first answers small alerts (one
fresh key-shaped token each, sent one after the other) while idle; then one client sends the big
alert (12 MiB, every token looked up and committed before its 2xx) while another keeps sending the
same small alerts, one after the other, until the big one's answer is in. The figure is the small
alerts' worst latency while the big one was in flight, as a ratio to their median when idle. The
stand-ins run in a process of their own (bench/ack.py), so their work is not this process's.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.ack import postgres_services, service_env, stand_ins
from service.sandbox import GitHubSandbox, build_alert
from tests.harness import Service
from tests.pgserver import PostgresServer

IDLE_ALERTS = 30


def _post(client: httpx.Client, service: Service, github: GitHubSandbox, body: bytes) -> float:
    """Seconds from send to a 200 (anything else stops the benchmark)."""
    headers = {
        "Github-Public-Key-Identifier": github.key_identifier,
        "Github-Public-Key-Signature": github.sign(body),
        "Content-Type": "application/json",
    }
    started = time.perf_counter()
    response = client.post(f"{service.url}/v1/alerts/github", content=body, headers=headers, timeout=120)
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text[:200]
    return took


def _small() -> bytes:
    return build_alert([f"sm_small{secrets.token_hex(16)}"], url="https://x.test/small")


def measure(service: Service, github: GitHubSandbox, tokens: int) -> dict[str, Any]:
    big = build_alert(
        [f"sm_big{i:08d}{secrets.token_hex(12)}" for i in range(tokens)], url="https://x.test/b"
    )
    with httpx.Client() as small_client, httpx.Client() as big_client:
        for _ in range(5):
            _post(small_client, service, github, _small())
        idle = [_post(small_client, service, github, _small()) for _ in range(IDLE_ALERTS)]
        big_took: list[float] = []
        sender = threading.Thread(target=lambda: big_took.append(_post(big_client, service, github, big)))
        started = time.perf_counter()
        sender.start()
        during: list[float] = []
        sent_at: list[float] = []
        while sender.is_alive():
            sent_at.append(time.perf_counter() - started)
            during.append(_post(small_client, service, github, _small()))
        sender.join()
        total = time.perf_counter() - started
    assert big_took, "the big alert got no 200"
    idle_p50 = statistics.median(idle)
    return {
        "big_tokens": tokens,
        "big_ack_s": big_took[0],
        "idle_small_p50_ms": 1000 * idle_p50,
        "idle_small_max_ms": 1000 * max(idle),
        "small_alerts_during": len(during),
        "during_small_p50_ms": 1000 * statistics.median(during),
        "during_small_max_ms": 1000 * max(during),
        "worst_to_idle_p50": max(during) / idle_p50,
        # When the worst one was sent, in seconds after the big one: which phase of it held it up.
        "worst_sent_at_s": sent_at[during.index(max(during))],
        # The small alerts answered during the big one, per second of it: 0 when it held them all.
        "small_alerts_per_s_during": len(during) / total,
    }


def run(tokens: int = 100_000) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        github, _, sm_url, keys_url = stack.enter_context(stand_ins(root))
        # A 100,000-token alert is 12 MiB, over the default limit of 10 MiB.
        env = {**service_env(sm_url, keys_url), "LEAK_RESPONDER_BODY_LIMIT": str(32 * 2**20)}
        (root / "sqlite").mkdir()
        sqlite = Service(root / "sqlite", env).start()
        try:
            results["sqlite"] = measure(sqlite, github, tokens)
        finally:
            sqlite.stop()
        server = PostgresServer().start()
        stack.callback(server.stop)
        (postgres,) = postgres_services(root, env, server, "hol", 1)
        try:
            results["postgres"] = measure(postgres, github, tokens)
        finally:
            postgres.stop()
    return results
