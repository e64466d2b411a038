"""The ack benchmark under wrk: `POST /v1/alerts/github` on SQLite and on PostgreSQL (one process)
against a bare Starlette endpoint that only verifies the signature, all under the same uvicorn with
uvloop and httptools.

The load generator is wrk (C, one thread, 32 connections): an earlier Python load generator topped
out near 800 requests/s and so measured itself rather than the endpoints. Every request is the next
alert of a pool signed beforehand (bench/alerts.lua), each of one fresh key-shaped token, so every
request to the service commits a new incident and waits for a real lookup: the full ack path.

Rounds alternate bare → SQLite → PostgreSQL and each side keeps its best round, so a burst of load
from elsewhere on this shared machine lands on all sides rather than on their ratios; the ratio of
every round is reported too. Per run it also reports the CPU seconds of each process (service,
bare endpoint, the stand-ins, PostgreSQL's server processes, wrk) and the lookup calls per alert
that the Supermemory stand-in counted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.sandbox import GitHubSandbox, build_alert
from tests.harness import Service, free_port, wait_until
from tests.pgserver import PostgresServer

LUA = Path(__file__).with_name("alerts.lua")
CONNECTIONS = 32
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def postgres_cpu_seconds(server: PostgresServer) -> float:
    """The postmaster and every server process under it (the service's connections among them)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for pid in [postmaster, *_children(postmaster)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def write_pool(path: Path, github: GitHubSandbox, count: int) -> None:
    """`count` alerts of one fresh key-shaped token each, as "<signature>\\t<body>" lines."""
    with path.open("w") as out:
        for _ in range(count):
            body = build_alert([f"sm_bench{secrets.token_hex(16)}"], url="https://x.test/a")
            out.write(f"{github.sign(body)}\t{body.decode()}\n")


class Process:
    """A server subprocess, up once `probe_url` answers 200."""

    def __init__(self, args: list[str], probe_url: str) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._up(probe_url), timeout=30)

    def _up(self, url: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def wrk(
    url: str,
    pool: Path,
    identifier: str,
    count: int,
    cpu: dict[str, Callable[[], float]],
    connections: int = CONNECTIONS,
) -> dict[str, Any]:
    """One wrk run of `count` alerts; its figures, and the CPU seconds each process spent in it."""
    before = {name: read() for name, read in cpu.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", "-d120s", "--timeout", "30s", "-s", str(LUA), url, "--",
         str(pool), identifier, str(count)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = re.search(r"^RESULT (\{.*\})$", done.stdout, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(found.group(1))
    if result["non_200"] or result["socket_errors"] or result["pool_wrapped"]:
        raise RuntimeError(f"{url}: {result}")
    result["rps"] = result["requests"] / result["seconds"]
    result["cpu_s"] = {name: read() - before[name] for name, read in cpu.items()}
    result["cpu_s"]["wrk"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return result


@contextlib.contextmanager
def stand_ins(root: Path) -> Iterator[tuple[GitHubSandbox, Process, str, str]]:
    """The stand-ins in their own process; GitHub's signs with a key this process holds too."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = root / "github-key.pem"
    pem.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    sm_port, gh_port = free_port(), free_port()
    sm_url, keys_url = (
        f"http://127.0.0.1:{sm_port}",
        f"http://127.0.0.1:{gh_port}/meta/public_keys/secret_scanning",
    )
    proc = Process([sys.executable, "-m", "bench.stand_ins", str(pem), str(sm_port), str(gh_port)], keys_url)
    try:
        yield GitHubSandbox(private_key=private_key), proc, sm_url, keys_url
    finally:
        proc.stop()


def service_env(sm_url: str, keys_url: str) -> dict[str, str]:
    """The service's settings against the stand-ins, logging at WARNING as in production."""
    return {
        "LEAK_RESPONDER_GITHUB_KEYS_URL": keys_url,
        "LEAK_RESPONDER_DEPSDEV_KEYS_URL": "",
        "LEAK_RESPONDER_SUPERMEMORY_API_URL": sm_url,
        "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "sandbox-admin-token",
        "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
    }


def postgres_services(
    root: Path, env: dict[str, str], server: PostgresServer, name: str, count: int
) -> list[Service]:
    """`count` service processes on one new database of `server`, migrated first, as replicas."""
    env = {
        **env,
        "LEAK_RESPONDER_DATABASE_URL": server.create_database(name),
        "LEAK_RESPONDER_DATA_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    services = []
    for i in range(count):
        (root / f"{name}-{i}").mkdir()
        service = Service(root / f"{name}-{i}", env)
        if i == 0:
            migrated = service.cli("migrate")
            assert migrated.returncode == 0, migrated.stderr
        services.append(service.start())
    return services


def lookups(sm_url: str) -> int:
    return int(httpx.get(f"{sm_url}/_sandbox/stats").json()["calls"]["lookup"])


def run(
    rounds: int = 3, service_alerts: int = 20_000, bare_alerts: int = 40_000, postgres: bool = True
) -> dict[str, Any]:
    sides = ["bare", "sqlite"] + (["postgres"] if postgres else [])
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        github, sandbox, sm_url, keys_url = stack.enter_context(stand_ins(root))
        env = service_env(sm_url, keys_url)
        bare_port = free_port()
        bare = Process(
            [sys.executable, "-m", "bench.bare", keys_url, str(bare_port)],
            f"http://127.0.0.1:{bare_port}/livez",
        )
        stack.callback(bare.stop)
        targets: dict[str, tuple[str, dict[str, Callable[[], float]]]] = {}
        stand_in_cpu = {"stand_ins": lambda: cpu_seconds(sandbox.pid)}
        targets["bare"] = (
            f"http://127.0.0.1:{bare_port}/alert",
            {"bare": lambda: cpu_seconds(bare.pid), **stand_in_cpu},
        )
        (root / "sqlite").mkdir()
        sqlite = Service(root / "sqlite", env).start()
        stack.callback(sqlite.stop)
        targets["sqlite"] = (
            f"{sqlite.url}/v1/alerts/github",
            {"service": lambda: cpu_seconds(sqlite.proc.pid), **stand_in_cpu},
        )
        if postgres:
            server = PostgresServer().start()
            stack.callback(server.stop)
            (pg,) = postgres_services(root, env, server, "bench", 1)
            stack.callback(pg.stop)
            targets["postgres"] = (
                f"{pg.url}/v1/alerts/github",
                {
                    "service": lambda: cpu_seconds(pg.proc.pid),
                    "postgres_server": lambda: postgres_cpu_seconds(server),
                    **stand_in_cpu,
                },
            )
        # Pools: the bare endpoint's can be reused round after round (it stores nothing); each
        # service run gets alerts no service has seen, so none is a redelivery.
        started = time.perf_counter()
        pools: dict[str, list[Path]] = {"bare": [root / "bare.pool"]}
        write_pool(pools["bare"][0], github, bare_alerts + CONNECTIONS)
        for side in sides[1:]:
            pools[side] = []
            for i in range(rounds + 1):
                pools[side].append(root / f"{side}-{i}.pool")
                write_pool(pools[side][-1], github, (service_alerts if i else 1000) + CONNECTIONS)
        signing_s = time.perf_counter() - started
        # Warm-up: connections, key caches, the page cache of each database.
        for side in sides[1:]:
            url, cpu = targets[side]
            wrk(url, pools[side][0], github.key_identifier, 1000, cpu)
        results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for i in range(1, rounds + 1):
            for side in sides:
                url, cpu = targets[side]
                count = bare_alerts if side == "bare" else service_alerts
                calls = lookups(sm_url)
                result = wrk(url, pools[side][0 if side == "bare" else i], github.key_identifier, count, cpu)
                result["lookup_calls_per_alert"] = (lookups(sm_url) - calls) / result["requests"]
                results[side].append(result)
    best = {side: max(runs, key=lambda r: r["rps"]) for side, runs in results.items()}
    summary: dict[str, Any] = {
        "wrk": f"-t1 -c{CONNECTIONS}",
        "loop": _server_stack(),
        "load_average_1m": os.getloadavg()[0],
        "signing_s": signing_s,
        "best": best,
    }
    for side in sides[1:]:
        summary[f"{side}_vs_bare"] = best[side]["rps"] / best["bare"]["rps"]
        summary[f"{side}_vs_bare_per_round"] = [
            round(s["rps"] / b["rps"], 3) for s, b in zip(results[side], results["bare"], strict=True)
        ]
    summary["rounds"] = results
    return summary


def _server_stack() -> str:
    """What uvicorn's "auto" picks in these processes (the same interpreter and packages)."""
    found = []
    for name in ("uvloop", "httptools"):
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            found.append(f"no {name}")
    return ", ".join(found)


if __name__ == "__main__":
    print(
        json.dumps(
            run(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=2, default=lambda v: round(v, 3)
        )
    )
