"""Ack throughput of `POST /v1/alerts/github` on PostgreSQL, with one and with two service processes,
against the same load on SQLite in the same run (issue 5).

The load and the alerts are core's (`_load`, `fresh_alerts`): one fresh key-shaped token per
alert, so each request commits a new incident and waits for a real lookup. With two processes the
same total concurrency is split between them, each half from a load process of its own, and their
throughputs add up. PostgreSQL is a throwaway local cluster (tests/pgserver.py) with its default
durability (`synchronous_commit = on`), on the same machine as everything else.
"""

from __future__ import annotations

import base64
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.core import _load, fresh_alerts
from tests.harness import Sandbox, Service
from tests.pgserver import PostgresServer


def _run(services: list[Service], sandbox: Sandbox, requests: int, concurrency: int) -> dict[str, Any]:
    """Warm every process up, then load them all at once; the combined rate and each one's latency."""
    share = concurrency // len(services)

    def load(service: Service, count: int) -> dict[str, float]:
        return _load(f"{service.url}/v1/alerts/github", sandbox.github, fresh_alerts(count), share)

    with ThreadPoolExecutor(len(services)) as pool:
        list(pool.map(lambda s: load(s, 100), services))
        each = list(pool.map(lambda s: load(s, requests // len(services)), services))
    return {"rps": sum(e["rps"] for e in each), "processes": each}


def run(requests: int = 2000, concurrency: int = 16) -> dict[str, Any]:
    quiet = {"LEAK_RESPONDER_LOG_LEVEL": "WARNING"}
    results: dict[str, Any] = {"requests": requests, "concurrency": concurrency}
    server = PostgresServer().start()
    try:
        with Sandbox() as sandbox, tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data_key = base64.b64encode(os.urandom(32)).decode()
            configurations = {"sqlite": (None, 1), "postgres_1": ("one", 1), "postgres_2": ("two", 2)}
            for name, (database, processes) in configurations.items():
                env = {**sandbox.env(), **quiet}
                if database is not None:
                    env |= {
                        "LEAK_RESPONDER_DATABASE_URL": server.create_database(database),
                        "LEAK_RESPONDER_DATA_KEY": data_key,
                    }
                services = []
                for i in range(processes):
                    workdir = root / f"{name}-{i}"
                    workdir.mkdir()
                    service = Service(workdir, env)
                    if database is not None and i == 0:
                        migrated = service.cli("migrate")
                        assert migrated.returncode == 0, migrated.stderr
                    services.append(service.start())
                try:
                    results[name] = _run(services, sandbox, requests, concurrency)
                finally:
                    for service in services:
                        service.stop()
    finally:
        server.stop()
    sqlite = results["sqlite"]["rps"]
    results["postgres_1_vs_sqlite"] = results["postgres_1"]["rps"] / sqlite
    results["postgres_2_vs_sqlite"] = results["postgres_2"]["rps"] / sqlite
    results["postgres_2_vs_1"] = results["postgres_2"]["rps"] / results["postgres_1"]["rps"]
    return results
