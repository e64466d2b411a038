"""Real parts for integration tests: the service as a uvicorn subprocess on loopback, the sandbox's
Supermemory and GitHub as real HTTP servers, and read-only looks into the SQLite file.

The service runs in its own process so that a test can kill it with SIGKILL mid-pipeline and start
it again on the same database, exactly as a crash in production would go.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service.sandbox import GitHubSandbox, ServerThread, SupermemorySandbox, build_alert, seeded_keys
from service.tokens import token_hash

ROOT = Path(__file__).resolve().parent.parent

# Fast but faithful: the same schedule shape as production (0, 2, 5, … s) compressed in time.
FAST = {
    "LEAK_RESPONDER_PROBE_SCHEDULE": "0,0.3,0.6,1.2",
    "LEAK_RESPONDER_LEASE_SECONDS": "2",
    "LEAK_RESPONDER_BACKOFF_BASE": "0.05",
    "LEAK_RESPONDER_BACKOFF_MAX": "0.5",
    "LEAK_RESPONDER_HTTP_TIMEOUT": "1",
    "LEAK_RESPONDER_REQUEST_BUDGET": "2",
    "LEAK_RESPONDER_PROBE_INCONCLUSIVE_WINDOW": "3",
    "LEAK_RESPONDER_REVOKE_RETRY_WINDOW": "60",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class Sandbox:
    """Both stand-ins, served for one test."""

    def __init__(self, keys: int = 6) -> None:
        self.supermemory = SupermemorySandbox(seeded_keys(keys))
        self.github = GitHubSandbox()
        self._servers = [ServerThread(self.supermemory.app()), ServerThread(self.github.app())]

    def __enter__(self) -> Sandbox:
        for server in self._servers:
            server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.stop()

    @property
    def supermemory_url(self) -> str:
        return self._servers[0].url

    @property
    def keys_url(self) -> str:
        return f"{self._servers[1].url}/meta/public_keys/secret_scanning"

    @property
    def tokens(self) -> list[str]:
        return [k.token for k in self.supermemory.keys]

    def env(self) -> dict[str, str]:
        return {
            "LEAK_RESPONDER_GITHUB_KEYS_URL": self.keys_url,
            "LEAK_RESPONDER_DEPSDEV_KEYS_URL": "",
            "LEAK_RESPONDER_SUPERMEMORY_API_URL": self.supermemory_url,
            "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": self.supermemory.knobs.admin_token,
        }


class Service:
    """`leak-responder serve` in a subprocess, its JSON log captured to a file for the canary test."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.db_path = workdir / "leak-responder.db"
        self.log_path = workdir / "service.log"
        self.env = {
            "LEAK_RESPONDER_DATABASE_URL": f"sqlite:///{self.db_path}",
            "LEAK_RESPONDER_LOG_FORMAT": "json",
            "LEAK_RESPONDER_LOG_LEVEL": "DEBUG",
            **FAST,
            **env,
        }
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: bool = True) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEAK_RESPONDER_", "SENTRY_"))}
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if ready:
            wait_until(self._ready, timeout=30)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    # -- talking to it ---------------------------------------------------------------------------

    def post_alert(
        self,
        github: GitHubSandbox,
        tokens: list[str],
        *,
        url: str | None = "https://github.com/octocat/demo/blob/main/.env",
        body: bytes | None = None,
        timeout: float = 30,
    ) -> httpx.Response:
        raw = body if body is not None else build_alert(tokens, url=url)
        headers = {
            "Github-Public-Key-Identifier": github.key_identifier,
            "Github-Public-Key-Signature": github.sign(raw),
            "Content-Type": "application/json",
        }
        return httpx.post(f"{self.url}/v1/alerts/github", content=raw, headers=headers, timeout=timeout)

    # -- looking at its database (read-only) -----------------------------------------------------

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def incident(self, token: str) -> dict[str, Any] | None:
        with self.db() as conn:
            row = conn.execute(
                "SELECT * FROM incidents WHERE token_hash = ?", (token_hash(token),)
            ).fetchone()
            return dict(row) if row else None

    def state(self, token: str) -> str | None:
        row = self.incident(token)
        return row["state"] if row else None

    def events(self, token: str) -> list[str]:
        with self.db() as conn:
            return [
                r["kind"]
                for r in conn.execute(
                    "SELECT e.kind FROM events e JOIN incidents i ON i.id = e.incident_id"
                    " WHERE i.token_hash = ? ORDER BY e.id",
                    (token_hash(token),),
                )
            ]

    def count(self, table: str) -> int:
        if not self.db_path.exists():
            return 0
        with self.db() as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def wait_state(self, token: str, *states: str, timeout: float = 20.0) -> str:
        return wait_until(lambda: self.state(token) in states and self.state(token), timeout=timeout)
