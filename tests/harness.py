"""Real parts for integration tests: the service as a uvicorn subprocess on loopback, the sandbox's
Supermemory and GitHub as real HTTP servers, and read-only looks into its database (SQLite or
PostgreSQL, through one query interface so that each helper is written once).

The service runs in its own process so that a test can kill it with SIGKILL mid-pipeline and start
it again on the same database, exactly as a crash in production would go.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.policy
import gzip
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import psycopg
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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


def stranger_signature() -> str:
    """A well-formed signature by a key no reporter publishes: it passes the header checks and
    fails only against a body, which is what a forger's request looks like."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    der = ec.generate_private_key(ec.SECP256R1()).sign(b"forged", ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


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


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics exposition, by name and labels in any order."""
    for line in text.splitlines():
        found = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? ([0-9.e+-]+)", line)
        if (
            found
            and found.group(1) == name
            and dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or "")) == labels
        ):
            return float(found.group(3))
    raise AssertionError(f"{name}{labels} not in metrics")


def read_answer(sock: socket.socket) -> tuple[int, str]:
    """The status and the head-and-body text of the server's answer, read to its Content-Length
    (the head and the body can arrive in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data.decode(errors="replace")


def _content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next(
        (int(line.split(":")[1]) for line in head.splitlines() if line.startswith("content-length:")), 0
    )


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


def postgres_env(sandbox: Sandbox, pg_url: str) -> dict[str, str]:
    """The sandbox's settings on PostgreSQL; replicas share the data key as they share the rows."""
    return {
        **sandbox.env(),
        "LEAK_RESPONDER_DATABASE_URL": pg_url,
        "LEAK_RESPONDER_DATA_KEY": base64.b64encode(os.urandom(32)).decode(),
        "LEAK_RESPONDER_LOG_LEVEL": "INFO",
    }


class PgRow:
    """A PostgreSQL row that reads like sqlite3.Row: by position, by column name, and into dict()."""

    def __init__(self, names: list[str], values: tuple[Any, ...]) -> None:
        self._names = names
        self._values = values

    def keys(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._names.index(key)]


class PgReader:
    """A PostgreSQL session (autocommit) with sqlite3's calling convention (`?` markers, Row-like rows)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> psycopg.Cursor[PgRow]:
        def rows(cursor: psycopg.Cursor[Any]) -> Callable[[tuple[Any, ...]], PgRow]:
            names = [c.name for c in cursor.description or []]
            return lambda values: PgRow(names, values)

        cursor = self.conn.cursor(row_factory=rows)
        return cursor.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]

    def close(self) -> None:
        self.conn.close()


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
            # Replicas on one host would share the host name: each work directory is one replica,
            # and a service restarted in it is that replica again.
            "LEAK_RESPONDER_REPLICA_ID": re.sub(r"[^A-Za-z0-9._-]", "-", workdir.name)[:63],
            **FAST,
            **env,
        }
        self.port = free_port()
        # (soft, hard) RLIMIT_NOFILE the process starts with, as a host's defaults would give it.
        self.nofile: tuple[int, int] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        # One client for the service's lifetime: a new httpx client per request costs ~20 ms of
        # TLS-context set-up, which a latency benchmark would charge to the service.
        self.http = httpx.Client(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.env["LEAK_RESPONDER_DATABASE_URL"]

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith(("postgresql://", "postgres://"))

    def _process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEAK_RESPONDER_", "SENTRY_"))}
        env.update(self.env)
        return env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A one-shot `leak-responder` command with this service's settings (e.g. `migrate`)."""
        return subprocess.run(
            [sys.executable, "-m", "service", *args],
            cwd=self.workdir,
            env=self._process_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, ready: bool = True) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
            cwd=self.workdir,
            env=self._process_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limits if self.nofile else None,
        )
        log.close()
        if ready:
            wait_until(self._ready, timeout=30)
        return self

    def _limits(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)

    def open_files_limit(self) -> tuple[int, int]:
        """The process's (soft, hard) open-file limit, from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise RuntimeError("no open-file limit in /proc")

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

    def logged(self, reason: str) -> list[dict[str, Any]]:
        """The log lines carrying `reason`: what an operator greps for after a page."""
        return [r for r in self.log_records() if r.get("reason") == reason]

    def failures(self, stage: str, reason: str) -> float:
        """`leak_responder_failures_total{stage,reason}` from /metrics: what a dashboard shows."""
        text = self.http.get(f"{self.url}/metrics").text
        return metric(text, "leak_responder_failures_total", stage=stage, reason=reason)

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
        return self.http.post(f"{self.url}/v1/alerts/github", content=raw, headers=headers, timeout=timeout)

    # -- looking at its database (read-only) -----------------------------------------------------

    @contextlib.contextmanager
    def db(self, writable: bool = False) -> Iterator[sqlite3.Connection | PgReader]:
        """Its database, queried with sqlite3's conventions whichever backend it runs on.

        Read-only unless `writable`: a write behind the service's back is how a test puts a row
        there that the code does not expect (a bug elsewhere, a careless operator), committed on exit.
        """
        conn: sqlite3.Connection | PgReader
        if self.postgres:
            conn = PgReader(self.database_url)
        else:
            mode = "rw" if writable else "ro"
            conn = sqlite3.connect(f"file:{self.db_path}?mode={mode}", uri=True, timeout=10)
            conn.row_factory = sqlite3.Row
        try:
            yield conn
            if isinstance(conn, sqlite3.Connection) and conn.in_transaction:
                conn.commit()
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
        if not self.postgres and not self.db_path.exists():
            return 0
        with self.db() as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def confirmed(self, token: str) -> dict[str, Any] | None:
        row = self.incident(token)
        return row if row and row["state"] == "confirmed" else None

    def count_state(self, state: str) -> int:
        with self.db() as conn:
            return conn.execute("SELECT count(*) FROM incidents WHERE state = ?", (state,)).fetchone()[0]

    def peak_rss_kib(self) -> int:
        """The process's high-water resident set (VmHWM), from /proc."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc status")

    def wait_state(self, token: str, *states: str, timeout: float = 20.0) -> str:
        return wait_until(lambda: self.state(token) in states and self.state(token), timeout=timeout)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on loopback that keeps every message it accepted.

    `refuse` holds addresses answered 550 at RCPT (refused for good); `reply` answers a whole command
    (`MAIL`, `RCPT` or `DATA`) with the given line instead, as a relay refusing our sender or
    deferring mail does; AUTH is offered without TLS and always refused (535), so credentials in the
    URL meet a relay that does not take them. `stop()` and `start()` take the server down and bring
    it back on the same port; `on_message` runs inside the server's DATA handler before it answers,
    with the message already received, which is where a test kills the service to open the window
    between a send and its commit.
    """

    def __init__(self, tls: bool = False) -> None:
        self.port = free_port()
        self.tls = tls
        # Every AUTH the server was sent, as (mechanism, over TLS): credentials that went in clear.
        self.auth_attempts: list[tuple[str, bool]] = []
        self.messages: list[Message] = []
        self.refuse: set[str] = set()
        self.reply: dict[str, str] = {}
        self.on_message: Callable[[Message], None] | None = None
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    def start(self) -> SmtpSink:
        def refuse(server, session, envelope, mechanism, data) -> AuthResult:
            self.auth_attempts.append((mechanism, session.ssl is not None))
            return AuthResult(success=False, handled=False)

        self._controller = Controller(
            _SmtpHandler(self),
            hostname="127.0.0.1",
            port=self.port,
            auth_require_tls=False,
            authenticator=refuse,
            tls_context=self._tls_context() if self.tls else None,
        )
        self._controller.start()
        return self

    def _tls_context(self) -> ssl.SSLContext:
        """STARTTLS with a certificate for 127.0.0.1, trusted by the service through `env()`."""
        if not hasattr(self, "cert_file"):
            self.cert_file, key_file = _self_signed()
            self._key_file = key_file
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self._key_file)
        return context

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, contact: str = "security@example.test", login: str = "") -> dict[str, str]:
        """Settings to send through this sink; `login` ("user:password") makes the service AUTH."""
        userinfo = f"{login}@" if login else ""
        env = {
            "LEAK_RESPONDER_SMTP_URL": f"smtp://{userinfo}127.0.0.1:{self.port}",
            "LEAK_RESPONDER_MAIL_FROM": "leak-responder@example.test",
            "LEAK_RESPONDER_SECURITY_CONTACT": contact,
        }
        if self.tls:
            env["SSL_CERT_FILE"] = self.cert_file  # OpenSSL's own variable: trust this server's certificate
        return env

    def received(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def to(self, address: str) -> list[Message]:
        return [m for m in self.received() if address in m.rcpt_tos]


def _self_signed() -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, in temporary files."""
    import datetime
    import ipaddress
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory = tempfile.mkdtemp(prefix="smtp-tls-")
    cert_file, key_file = f"{directory}/cert.pem", f"{directory}/key.pem"
    Path(cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_file).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@dataclasses.dataclass
class Message:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    email: EmailMessage
    received_at: float = dataclasses.field(default_factory=time.time)

    def part(self, subtype: str) -> str:
        body = self.email.get_body(preferencelist=(subtype,))
        assert body is not None, f"no text/{subtype} part"
        return body.get_content()


class _SmtpHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        if "MAIL" in self.sink.reply:
            return self.sink.reply["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if "RCPT" in self.sink.reply:
            return self.sink.reply["RCPT"]
        if address in self.sink.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if "DATA" in self.sink.reply:
            return self.sink.reply["DATA"]
        raw = bytes(envelope.original_content or envelope.content)
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
        message = Message(envelope.mail_from, list(envelope.rcpt_tos), raw, parsed)  # type: ignore[arg-type]
        with self.sink._lock:
            self.sink.messages.append(message)
        if self.sink.on_message is not None:
            self.sink.on_message(message)
        return "250 Message accepted for delivery"


class SentrySink:
    """Sentry's ingest endpoint, enough of it to receive envelopes: a DSN pointing here gets every
    event and cron check-in the SDK sends, decompressed and parsed.

    `status` answers every envelope with that status instead, keeping it only in `raw` (an ingest
    failing or refusing); `stop()` and `start()` take the endpoint down and bring it back on the same port."""

    def __init__(self) -> None:
        self.envelopes: list[list[tuple[dict[str, Any], bytes]]] = []
        self.raw: list[bytes] = []
        # Seconds each envelope takes to be accepted: a slow ingest, behind which the SDK's queue fills.
        self.delay = 0.0
        self.status: int | None = None
        self.refused = 0  # envelopes answered with `status`
        self._lock = threading.Lock()
        self._app = Starlette(routes=[Route("/api/{project}/envelope/", self._receive, methods=["POST"])])
        self._server = ServerThread(self._app)

    def __enter__(self) -> SentrySink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SentrySink:
        if self._server.port:
            self._server = ServerThread(self._app, port=self._server.port)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self._server.port}/1"

    def env(self, **extra: str) -> dict[str, str]:
        return {"SENTRY_DSN": self.dsn, "SENTRY_ENVIRONMENT": "test", **extra}

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        if self.status is not None:
            with self._lock:
                self.refused += 1
                self.raw.append(body)  # sent all the same: the canary tests search these bytes too
            return JSONResponse({"detail": "refused by the test"}, status_code=self.status)
        await asyncio.sleep(self.delay)
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        items = _envelope_items(body)
        with self._lock:
            self.raw.append(body)
            self.envelopes.append(items)
        return JSONResponse({})

    def items(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            envelopes = list(self.envelopes)
        return [
            json.loads(payload) for env in envelopes for header, payload in env if header.get("type") == kind
        ]

    def events(self) -> list[dict[str, Any]]:
        return self.items("event")

    def pages(self, code: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("tags", {}).get("page") == code]

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"\n".join(self.raw)


def _envelope_items(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """Sentry's envelope: a header line, then items of a header line and a payload, the payload's
    size given by the item header's `length` or else running to the end of the line."""
    items = []
    at = body.index(b"\n") + 1 if b"\n" in body else len(body)
    while at < len(body):
        end = body.find(b"\n", at)
        end = len(body) if end < 0 else end
        line = body[at:end].strip()
        at = end + 1
        if not line:
            continue
        header = json.loads(line)
        if "length" in header:
            payload, at = body[at : at + header["length"]], at + header["length"] + 1
        else:
            end = body.find(b"\n", at)
            end = len(body) if end < 0 else end
            payload, at = body[at:end], end + 1
        items.append((header, payload))
    return items
