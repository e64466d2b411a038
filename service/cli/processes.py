"""Commands that run processes or act on the store: the service, its checks and migrations, and the
sandbox that stands in for Supermemory and GitHub."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from service.cli._common import DEV_PORTS, settings_or_exit
from service.connections import bounded_protocol, connection_cap, raise_file_limit
from service.settings import Settings, SettingsError, env_name, environment, one_setting
from service.tokens import mask_url

T = TypeVar("T")

# Seconds a SIGTERM gives in-flight requests; the worker then gets as long again for its steps.
SHUTDOWN_GRACE = 10
# Seconds a thread may hold the interpreter lock while another waits for it (Python's default: 0.005).
SWITCH_INTERVAL = 0.001


def _on_store(work: Coroutine[Any, Any, T], code: int) -> T:
    """Run `work` against the store. A store that cannot be used ends the command with one line
    (credentials masked) and exit `code`: unreachable, owned by another process (SQLite), behind on
    migrations (PostgreSQL), or holding tokens sealed under a data key this process does not have."""
    from service.store import SealingError, StoreError

    try:
        return asyncio.run(work)
    except StoreError as exc:
        message = mask_url(str(exc))
    except SealingError as exc:
        message = str(SettingsError(env_name("data_key"), str(exc)))
    print(f"leak-responder: {message}", file=sys.stderr)
    raise SystemExit(code) from None


def _store_or_exit(settings: Settings) -> None:
    """Refuse to serve, with one line, on a store that cannot be opened (see `_on_store`): the
    service never migrates PostgreSQL by itself."""
    from service.runtime import check_store

    _on_store(check_store(settings), 2)


class _Server(uvicorn.Server):
    """SIGTERM and SIGINT stop it gracefully and the process then exits 0.

    uvicorn re-raises the signal once it has shut down, so a clean stop would be reported as death
    by signal; an orchestrator (and our tests) should see a clean stop as one.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _SilentServer(uvicorn.Server):
    """A server that leaves the process's signals to the one that owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn_config(app: object, host: str, port: int, settings: Settings | None = None) -> uvicorn.Config:
    """Our own logging stays in charge (uvicorn's access log would add nothing we need), and a
    SIGTERM gives in-flight requests a bounded time before the worker hands back its leases. The
    service's own server (given its settings) bounds its connections (see service.connections)."""
    http: type[asyncio.Protocol] | str = "h11"
    if settings is not None:
        cap = connection_cap(raise_file_limit())
        http = bounded_protocol(settings.connection_idle_timeout, cap)
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        http=http,
        log_config=None,
        access_log=False,
        # Which proxy's X-Forwarded-For to believe is the app's call (LEAK_RESPONDER_TRUSTED_PROXIES):
        # uvicorn's own handling would trust any local peer's header and hide the real peer.
        proxy_headers=False,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.observability import configure_logging

    settings = settings_or_exit()
    _store_or_exit(settings)
    configure_logging(settings.log_level, settings.log_format)
    # The SQLite writer thread takes the interpreter lock back after every statement; with the
    # default 5 ms switch interval it waited up to that long each time the event loop was busy,
    # which under load was most of an intake's wait (BENCHMARKS.md, ack section).
    sys.setswitchinterval(SWITCH_INTERVAL)
    server = _Server(_uvicorn_config(create_app(settings), args.host, args.port, settings))
    server.run()
    return 0 if server.started else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the database's schema to this release's; safe to run again, and from several replicas
    at once (they serialise on an advisory lock)."""
    from service.runtime import migrate

    try:
        url = one_setting("database_url", environment())
    except SettingsError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        return 2
    applied = _on_store(migrate(url, settings_or_exit), 1)
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        print("database schema is current: no migration pending")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """An online copy of the SQLite database, consistent while the service runs: SQLite's backup API
    through a connection of its own (the service keeps serving), never a bare copy of a WAL database,
    which can miss the commits still in the -wal file. PostgreSQL has pg_dump for this."""
    import sqlite3

    from service.store.sqlite import SQLITE_BUSY_MS

    try:
        url = one_setting("database_url", environment())
    except SettingsError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        return 2
    if not url.startswith("sqlite:///"):
        print("leak-responder: backup copies a SQLite database; for PostgreSQL use pg_dump", file=sys.stderr)
        return 2
    source, target = Path(url.removeprefix("sqlite:///")), Path(args.path)
    if target.exists():
        print(f"leak-responder: {target} exists; a backup never overwrites", file=sys.stderr)
        return 2
    try:
        with contextlib.closing(sqlite3.connect(source)) as src:
            src.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
            with contextlib.closing(sqlite3.connect(target)) as dst:
                src.backup(dst)
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.Error as exc:
        print(f"leak-responder: backup of {source} failed: {exc}", file=sys.stderr)
        return 1
    if check != "ok":
        print(f"leak-responder: the copy fails its integrity check: {check}", file=sys.stderr)
        return 1
    os.chmod(target, 0o600)
    print(f"backed up {source} to {target} (integrity ok)")
    key = Path(f"{source}.key")
    if key.exists():
        print(f"the data key is not in it: back up {key} apart (without it, open incidents cannot be probed)")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    """Reseal every stored token under the current data key, so that the fallbacks can be retired.

    Idempotent and resumable: each batch commits, and rows already under the current key are not
    touched again. Exit 1 if any row opens with none of the keys (named by incident id)."""
    from service.runtime import rewrap, sealer_for

    settings = settings_or_exit()
    report = _on_store(rewrap(settings, args.batch), 1)
    print(
        f"resealed {report.resealed} value(s) (tokens, channel URLs and secrets) under data key"
        f" {sealer_for(settings).current}"
    )
    if report.unopenable:
        print(
            f"leak-responder: {len(report.unopenable)} token(s) open with none of the configured keys:"
            f" {', '.join(report.unopenable)}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from service.sandbox import serve_sandbox

    asyncio.run(
        serve_sandbox(args.host, args.supermemory_port, args.github_port, args.receiver_port, args.keys)
    )
    return 0


def cmd_simulate_github(args: argparse.Namespace) -> int:
    """Ask the GitHub stand-in to sign and send an alert, as GitHub's scanner would, and show the labels."""
    payload = {
        "target": args.target,
        "tokens": args.token,
        "url": args.url,
        "type": args.type,
        "source": args.source,
    }
    try:
        response = httpx.post(f"{args.github.rstrip('/')}/_sandbox/send-alert", json=payload, timeout=30)
    except httpx.HTTPError as exc:
        print(f"leak-responder: cannot reach the GitHub sandbox at {args.github}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(
            f"leak-responder: the GitHub sandbox answered {response.status_code}: {response.text}",
            file=sys.stderr,
        )
        return 1
    result = response.json()
    print(f"leak-responder answered HTTP {result['status']}")
    print(json.dumps(result["body"], indent=2))
    return 0 if 200 <= result["status"] < 300 else 1


def _busy(host: str, ports: dict[str, int]) -> str | None:
    """The first port that cannot be bound, named, as the one line to show; None when all are free."""
    for name, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                option = "--port" if name == "service" else f"--{name}-port"
                return (
                    f"port {port} ({name}) is not free ({exc.strerror}): stop what holds it, or move it"
                    f' with `make run ARGS="{option} N"` (leak-responder dev {option} N)'
                )
    return None


def cmd_dev(args: argparse.Namespace) -> int:
    """`make run`: the sandbox (Supermemory, GitHub, the channels' receiver and a mail server keeping
    messages in ./data/mail) and the service in one process, wired together, with a first alert to
    paste."""
    from service.app import create_app
    from service.observability import configure_logging
    from service.sandbox import GitHubSandbox, dev_stand_ins
    from service.sandbox.mail import MailSandbox

    host = "127.0.0.1"
    ports = {"service": args.port, "supermemory": args.supermemory_port, "github": args.github_port}
    ports |= {"receiver": args.receiver_port, "smtp": args.smtp_port}
    busy = _busy(host, ports)
    if busy is not None:
        print(f"leak-responder: {busy}", file=sys.stderr)
        return 2
    supermemory, receiver = dev_stand_ins(host, args.receiver_port, args.keys)
    github = GitHubSandbox()
    mail = MailSandbox(Path("data") / "mail")
    sm_url = f"http://{host}:{args.supermemory_port}"
    gh_url = f"http://{host}:{args.github_port}"
    defaults = {
        "LEAK_RESPONDER_GITHUB_KEYS_URL": f"{gh_url}/meta/public_keys/secret_scanning",
        "LEAK_RESPONDER_DEPSDEV_KEYS_URL": "",
        "LEAK_RESPONDER_SUPERMEMORY_API_URL": sm_url,
        "LEAK_RESPONDER_SUPERMEMORY_ADMIN_URL": sm_url,
        "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": supermemory.knobs.admin_token,
        "LEAK_RESPONDER_SMTP_URL": f"smtp://{host}:{args.smtp_port}",
        "LEAK_RESPONDER_MAIL_FROM": "leak-responder@sandbox.test",
        "LEAK_RESPONDER_SECURITY_CONTACT": "security@sandbox.test",
        "LEAK_RESPONDER_LOG_FORMAT": "text",
        # The seeded orgs' channels point at the receiver on loopback.
        "LEAK_RESPONDER_CHANNEL_ALLOWED_NETWORKS": f"{host}/32",
    }
    # A demo operator, so that `report` and `incidents` work at once; a new token each run.
    demo_token = secrets.token_urlsafe(24)
    demo = "LEAK_RESPONDER_OPERATOR_TOKENS" not in environment()
    if demo:
        defaults["LEAK_RESPONDER_OPERATOR_TOKENS"] = f"demo:{hashlib.sha256(demo_token.encode()).hexdigest()}"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    settings = settings_or_exit()
    _store_or_exit(settings)
    configure_logging(settings.log_level, settings.log_format)
    exe = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else "leak-responder"
    service = _Server(_uvicorn_config(create_app(settings), host, args.port, settings))
    stand_ins = [
        _SilentServer(_uvicorn_config(supermemory.app(), host, args.supermemory_port)),
        _SilentServer(_uvicorn_config(github.app(), host, args.github_port)),
        _SilentServer(_uvicorn_config(receiver.app(), host, args.receiver_port)),
    ]
    servers = [*stand_ins, service]
    moved = (
        "" if args.port == DEV_PORTS["service"] else f" --target http://{host}:{args.port}/v1/alerts/github"
    )
    moved += "" if args.github_port == DEV_PORTS["github"] else f" --github {gh_url}"
    url = "" if args.port == DEV_PORTS["service"] else f" --url http://{host}:{args.port}"

    async def announce() -> None:
        while not all(s.started for s in servers):
            if any(s.should_exit for s in servers):
                return
            await asyncio.sleep(0.05)
        key = supermemory.keys[0]
        print(
            f"\nleak-responder is running on http://{host}:{args.port}, wired to the sandbox"
            f" (Supermemory {sm_url}, GitHub {gh_url}, SMTP {host}:{args.smtp_port}; the orgs' webhooks"
            f" and Slack go to the receiver on http://{host}:{args.receiver_port}, which prints what"
            " arrives).\n"
            "Send it a first alert (a seeded sandbox key) with:\n\n"
            f"  {exe} simulate-github --token {key.token} --url https://github.com/octocat/demo/blob/main/.env"
            f"{moved}\n\n"
            f"The owner's email lands in {mail.folder}/ (one .eml file per message) once the key is\n"
            "revoked and the revocation proved; the incident then goes on to notified and closed.\n",
            flush=True,
        )
        if demo:
            print(
                "Then look at the incident as an operator (a demo token, new each run):\n\n"
                f"  export LEAK_RESPONDER_OPERATOR_TOKEN={demo_token}\n"
                f"  {exe} incidents list{url}\n",
                flush=True,
            )

    async def run_service() -> None:
        # The service owns the signals; once it has stopped, the stand-ins follow.
        try:
            await service.serve()
        finally:
            for stand_in in stand_ins:
                stand_in.should_exit = True

    async def main() -> None:
        await mail.start(host, args.smtp_port)
        try:
            await asyncio.gather(announce(), run_service(), *(s.serve() for s in stand_ins))
        finally:
            await mail.stop()

    asyncio.run(main())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the service under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="print the effective settings, secrets masked")
    check.set_defaults(func=cmd_check_config)

    migrate = sub.add_parser("migrate", help="apply pending database migrations (safe to re-run)")
    migrate.set_defaults(func=cmd_migrate)

    backup = sub.add_parser(
        "backup", help="an online, consistent copy of the SQLite database (safe while serving)"
    )
    backup.add_argument("path", metavar="PATH", help="where to write the copy (must not exist)")
    backup.set_defaults(func=cmd_backup)

    rewrap = sub.add_parser(
        "rewrap", help="reseal every stored token under the current data key (after a key rotation)"
    )
    rewrap.add_argument("--batch", type=int, default=500, help="rows per transaction")
    rewrap.set_defaults(func=cmd_rewrap)

    sandbox = sub.add_parser("sandbox", help="run the Supermemory and GitHub stand-ins on loopback")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--supermemory-port", type=int, default=DEV_PORTS["supermemory"])
    sandbox.add_argument("--github-port", type=int, default=DEV_PORTS["github"])
    sandbox.add_argument("--receiver-port", type=int, default=DEV_PORTS["receiver"])
    sandbox.add_argument("--keys", type=int, default=5, help="how many keys to seed")
    sandbox.set_defaults(func=cmd_sandbox)

    simulate = sub.add_parser("simulate-github", help="sign and send an alert through the GitHub stand-in")
    simulate.add_argument("--token", action="append", required=True, help="a token to report (repeatable)")
    simulate.add_argument("--url", default="https://github.com/octocat/Hello-World/blob/main/.env")
    simulate.add_argument("--type", default="supermemory_api_key")
    simulate.add_argument("--source", default="content")
    simulate.add_argument("--github", default=f"http://127.0.0.1:{DEV_PORTS['github']}")
    simulate.add_argument("--target", default=f"http://127.0.0.1:{DEV_PORTS['service']}/v1/alerts/github")
    simulate.set_defaults(func=cmd_simulate_github)

    dev = sub.add_parser("dev", help="the sandbox and the service together (what `make run` starts)")
    dev.add_argument("--port", type=int, default=DEV_PORTS["service"], help="the service's port")
    dev.add_argument("--supermemory-port", type=int, default=DEV_PORTS["supermemory"])
    dev.add_argument("--github-port", type=int, default=DEV_PORTS["github"])
    dev.add_argument(
        "--receiver-port", type=int, default=DEV_PORTS["receiver"], help="the channels' receiver"
    )
    dev.add_argument("--smtp-port", type=int, default=DEV_PORTS["smtp"], help="the mail sandbox's port")
    dev.add_argument("--keys", type=int, default=5)
    dev.set_defaults(func=cmd_dev)
