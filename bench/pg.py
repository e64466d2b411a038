"""Ack throughput on PostgreSQL with one and with two service processes on one database, against one
process on SQLite, in the same run (issue 5), with wrk as the load generator (see bench/ack.py).

Every request is a pre-signed alert of one fresh key-shaped token. With two processes the same 32
connections are split between them, 16 each from a wrk of its own running at the same time, and
their throughputs add up. PostgreSQL is a throwaway local cluster (tests/pgserver.py) with its
default durability (`synchronous_commit = on`), on the same machine as everything else.
"""

from __future__ import annotations

import contextlib
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.ack import CONNECTIONS, cpu_seconds, postgres_services, service_env, stand_ins, write_pool, wrk
from tests.harness import Service
from tests.pgserver import PostgresServer


def run(alerts: int = 10_000) -> dict[str, Any]:
    results: dict[str, Any] = {"alerts": alerts, "wrk": f"-t1 -c{CONNECTIONS} in all"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        github, _, sm_url, keys_url = stack.enter_context(stand_ins(root))
        env = service_env(sm_url, keys_url)
        server = PostgresServer().start()
        stack.callback(server.stop)
        (root / "sqlite").mkdir()
        configurations = {
            "sqlite": [Service(root / "sqlite", env).start()],
            "postgres_1": postgres_services(root, env, server, "one", 1),
            "postgres_2": postgres_services(root, env, server, "two", 2),
        }
        for services in configurations.values():
            for service in services:
                stack.callback(service.stop)
        for name, services in configurations.items():
            share = alerts // len(services)
            pools = []
            for i, _ in enumerate(services):
                warm, pool = root / f"{name}-{i}-warm.pool", root / f"{name}-{i}.pool"
                write_pool(warm, github, 500 + CONNECTIONS)
                write_pool(pool, github, share + CONNECTIONS)
                pools.append((warm, pool))

            def load(i: int, count: int, services: list[Service] = services, pools: list = pools) -> dict:
                service = services[i]
                url = f"{service.url}/v1/alerts/github"
                cpu = {"service": lambda: cpu_seconds(service.proc.pid)}
                pool = pools[i][0 if count == 500 else 1]
                return wrk(url, pool, github.key_identifier, count, cpu, CONNECTIONS // len(services))

            with ThreadPoolExecutor(len(services)) as runner:
                list(runner.map(lambda i: load(i, 500), range(len(services))))
                each = list(runner.map(lambda i, share=share: load(i, share), range(len(services))))
            results[name] = {"rps": sum(e["rps"] for e in each), "processes": each}
    sqlite = results["sqlite"]["rps"]
    results["postgres_1_vs_sqlite"] = results["postgres_1"]["rps"] / sqlite
    results["postgres_2_vs_sqlite"] = results["postgres_2"]["rps"] / sqlite
    results["postgres_2_vs_1"] = results["postgres_2"]["rps"] / results["postgres_1"]["rps"]
    return results
