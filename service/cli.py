"""`leak-responder`: the command-line shell over the service, the sandbox and the store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvicorn

from service.detection import scan_stream
from service.settings import Settings, SettingsError

DEV_PORTS = {"service": 8000, "supermemory": 8101, "github": 8102}
# Seconds a SIGTERM gives in-flight requests; the worker then gets as long again for its steps.
SHUTDOWN_GRACE = 10


def _settings() -> Settings:
    try:
        return Settings.load()
    except SettingsError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _store_or_exit(settings: Settings) -> None:
    """Refuse to serve, with one line, on a store that cannot be opened: unreachable, or a
    PostgreSQL database with migrations pending (the service never migrates it by itself)."""
    from service.store import StoreError, check_store

    try:
        asyncio.run(check_store(settings))
    except StoreError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


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


def _uvicorn_config(app: object, host: str, port: int) -> uvicorn.Config:
    """Our own logging stays in charge (uvicorn's access log would add nothing we need), and a
    SIGTERM gives in-flight requests a bounded time before the worker hands back its leases."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.observability import configure_logging

    settings = _settings()
    _store_or_exit(settings)
    configure_logging(settings.log_level, settings.log_format)
    server = _Server(_uvicorn_config(create_app(settings), args.host, args.port))
    server.run()
    return 0 if server.started else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings()
    width = max(len(name) for name, _ in settings.describe())
    for name, value in settings.describe():
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the database's schema to this release's; safe to run again, and from several replicas
    at once (they serialise on an advisory lock)."""
    from service.store import StoreError, migrate

    settings = _settings()
    try:
        applied = asyncio.run(migrate(settings))
    except StoreError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        return 1
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    elif settings.sqlite_path is not None:
        print("SQLite schema is current (SQLite is migrated whenever it is opened)")
    else:
        print("database schema is current: no migration pending")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from service.sandbox import serve_sandbox

    asyncio.run(serve_sandbox(args.host, args.supermemory_port, args.github_port, args.keys))
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


def cmd_dev(args: argparse.Namespace) -> int:
    """`make run`: the sandbox and the service in one process, wired together, with a first alert to paste."""
    from service.app import create_app
    from service.observability import configure_logging
    from service.sandbox import GitHubSandbox, SupermemorySandbox, seeded_keys

    supermemory = SupermemorySandbox(seeded_keys(args.keys))
    github = GitHubSandbox()
    host = "127.0.0.1"
    sm_url = f"http://{host}:{DEV_PORTS['supermemory']}"
    gh_url = f"http://{host}:{DEV_PORTS['github']}"
    defaults = {
        "LEAK_RESPONDER_GITHUB_KEYS_URL": f"{gh_url}/meta/public_keys/secret_scanning",
        "LEAK_RESPONDER_DEPSDEV_KEYS_URL": "",
        "LEAK_RESPONDER_SUPERMEMORY_API_URL": sm_url,
        "LEAK_RESPONDER_SUPERMEMORY_ADMIN_URL": sm_url,
        "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": supermemory.knobs.admin_token,
        "LEAK_RESPONDER_LOG_FORMAT": "text",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    settings = _settings()
    _store_or_exit(settings)
    configure_logging(settings.log_level, settings.log_format)
    exe = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else "leak-responder"
    service = _Server(_uvicorn_config(create_app(settings), host, args.port))
    stand_ins = [
        _SilentServer(_uvicorn_config(supermemory.app(), host, DEV_PORTS["supermemory"])),
        _SilentServer(_uvicorn_config(github.app(), host, DEV_PORTS["github"])),
    ]
    servers = [*stand_ins, service]

    async def announce() -> None:
        while not all(s.started for s in servers):
            if any(s.should_exit for s in servers):
                return
            await asyncio.sleep(0.05)
        key = supermemory.keys[0]
        print(
            f"\nleak-responder is running on http://127.0.0.1:{args.port}, wired to the sandbox"
            f" (Supermemory {sm_url}, GitHub {gh_url}).\n"
            "Send it a first alert (a seeded sandbox key) with:\n\n"
            f"  {exe} simulate-github --token {key.token} --url https://github.com/octocat/demo/blob/main/.env\n",
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
        await asyncio.gather(announce(), run_service(), *(s.serve() for s in stand_ins))

    asyncio.run(main())
    return 0


# -- scan: detection only, offline (also the pre-commit hook) -----------------------------------------

_CHUNK = 1 << 16


def _chunks(stream: TextIO) -> Iterator[str]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _progress(name: str, total: int | None, show: bool) -> Callable[[int], None] | None:
    if not show:
        return None

    def report(scanned: int) -> None:
        of = f" of {total / 2**20:.1f}" if total else ""
        print(f"\r{name}: {scanned / 2**20:.1f}{of} MiB scanned", end="", file=sys.stderr, flush=True)

    return report


def _scan_one(name: str, stream: TextIO, total: int | None, show: bool) -> int:
    progress = _progress(name, total, show)
    found = 0
    for finding in scan_stream(_chunks(stream), progress=progress):
        found += 1
        if progress is not None:
            print(file=sys.stderr)
        print(
            f"{name}:{finding.line}:{finding.column}: {finding.redacted}"
            f" confidence={finding.confidence} encoding={finding.encoding}"
            f" sha256={finding.token_hash[:16]}"
        )
    if progress is not None:
        print(file=sys.stderr)
    return found


def cmd_scan(args: argparse.Namespace) -> int:
    """Exit 1 when any key is found, so that a pre-commit hook or a CI step fails on a leak."""
    show = args.progress or sys.stderr.isatty()
    found = 0
    for name in args.paths:
        try:
            if name == "-":
                found += _scan_one(name, sys.stdin, None, show)
                continue
            path = Path(name)
            # Undecodable bytes become U+FFFD: a key is ASCII, and a binary file must not stop a hook.
            with path.open(encoding="utf-8", errors="replace") as stream:
                found += _scan_one(name, stream, path.stat().st_size, show)
        except OSError as exc:
            print(f"leak-responder: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    if found:
        print(
            f"leak-responder: {found} Supermemory key(s) found; revoke them before sharing", file=sys.stderr
        )
    return 1 if found else 0


# -- report and incidents: clients of a running service ----------------------------------------------

TOKEN_ENV = "LEAK_RESPONDER_OPERATOR_TOKEN"  # noqa: S105 (the variable's name, not a token)


class _ApiError(Exception):
    """Ends a client command with exit 1 (the service refused) or 2 (we could not ask it)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _operator_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _ApiError(f"cannot read {args.token_file}: {exc.strerror or exc}", 2) from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise _ApiError(f"no operator token: set {TOKEN_ENV} or pass --token-file", 2)
    return token


def _api(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {_operator_token(args)}", **kwargs.pop("headers", {})}
    try:
        response = httpx.request(
            method, f"{args.url.rstrip('/')}{path}", headers=headers, timeout=60, **kwargs
        )
    except httpx.HTTPError as exc:
        raise _ApiError(f"cannot reach the service at {args.url}: {exc}", 2) from None
    try:
        body = response.json()
    except ValueError:
        body = {"error": "bad_response", "message": response.text[:200]}
    if response.status_code >= 300:
        raise _ApiError(
            f"the service answered {response.status_code} {body.get('error')}: {body.get('message')}", 1
        )
    return body


def _client(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except _ApiError as exc:
            print(f"leak-responder: {exc}", file=sys.stderr)
            return exc.code
        return 0

    return run


def _place(finding: dict[str, Any]) -> str:
    where = ":".join(str(finding[k]) for k in ("file", "line", "column") if finding.get(k) is not None)
    return where or "-"


@_client
def cmd_report(args: argparse.Namespace) -> None:
    """The body goes as is and the service recognises its shape; the Idempotency-Key is the content's
    hash, so re-running the command after a timeout replays the answer instead of reporting twice."""
    try:
        body = sys.stdin.buffer.read() if args.path == "-" else Path(args.path).read_bytes()
    except OSError as exc:
        raise _ApiError(f"cannot read {args.path}: {exc.strerror or exc}", 2) from None
    headers = {"Idempotency-Key": f"sha256-{hashlib.sha256(body).hexdigest()}"}
    if args.content_type:
        headers["Content-Type"] = args.content_type
    result = _api(args, "POST", "/v1/reports", content=body, headers=headers)
    findings = result["findings"]
    print(f"{result['kind']} report: {len(findings)} finding(s)")
    for f in findings:
        print(
            f"{_place(f)}: {f['redacted']} {f['confidence'] or 'listed'} -> {f['incident_id']}"
            f" {f['state']} {f['label'] or 'unlabelled'}"
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


@_client
def cmd_incidents_list(args: argparse.Namespace) -> None:
    query = {
        "state": args.state,
        "reporter": args.reporter,
        "org": args.org,
        "since": args.since,
        "until": args.until,
        "limit": args.limit,
        "next": args.next,
    }
    page = _api(args, "GET", "/v1/incidents", params={k: v for k, v in query.items() if v is not None})
    rows = [("ID", "STATE", "LABEL", "KEY", "ORG", "RECEIVED", "TTR", "TTC")]
    for i in page["incidents"]:
        rows.append(
            (
                i["id"],
                i["state"],
                i["label"] or "-",
                i["redacted"],
                i["org_id"] or "-",
                i["created_at"],
                _seconds(i["time_to_revoke"]),
                _seconds(i["time_to_confirm"]),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if page["next"]:
        print(f"more: --next {page['next']}")


@_client
def cmd_incidents_show(args: argparse.Namespace) -> None:
    i = _api(args, "GET", f"/v1/incidents/{args.id}")
    print(f"{i['id']}  {i['state']}  {i['label'] or '-'}  {i['redacted']}  sha256={i['token_hash']}")
    print(f"key {i['key_id'] or '-'} ({i['key_name'] or '-'}) org {i['org_id'] or '-'}")
    print(f"time to revoke {_seconds(i['time_to_revoke'])}, to confirm {_seconds(i['time_to_confirm'])}")
    print("sightings:")
    for s in i["sightings"]:
        who = s["reporter"] + (f" ({s['operator']})" if s["operator"] else "")
        print(f"  {s['seen_at']}  {who}  {s['source'] or '-'}  {s['url'] or '-'}")
    print("timeline:")
    for e in i["events"]:
        detail = " ".join(f"{k}={v}" for k, v in e["detail"].items())
        print(f"  {e['at']}  {e['kind']:<18} {e['state'] or '':<14} {detail}".rstrip())


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=f"http://127.0.0.1:{DEV_PORTS['service']}", help="the service")
    parser.add_argument("--token-file", help=f"file holding the operator token (default: ${TOKEN_ENV})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leak-responder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="print the effective settings, secrets masked")
    check.set_defaults(func=cmd_check_config)

    migrate = sub.add_parser("migrate", help="apply pending database migrations (PostgreSQL; safe to re-run)")
    migrate.set_defaults(func=cmd_migrate)

    sandbox = sub.add_parser("sandbox", help="run the Supermemory and GitHub stand-ins on loopback")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--supermemory-port", type=int, default=DEV_PORTS["supermemory"])
    sandbox.add_argument("--github-port", type=int, default=DEV_PORTS["github"])
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
    dev.add_argument("--port", type=int, default=DEV_PORTS["service"])
    dev.add_argument("--keys", type=int, default=5)
    dev.set_defaults(func=cmd_dev)

    scan = sub.add_parser(
        "scan", help="find Supermemory keys in files, offline (exit 1 when any is found; a pre-commit hook)"
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="files to scan, or - for standard input")
    scan.add_argument("--progress", action="store_true", help="show progress even when stderr is no terminal")
    scan.set_defaults(func=cmd_scan)

    report = sub.add_parser("report", help="send a file (text, gitleaks or trufflehog report) to the service")
    report.add_argument("path", metavar="PATH", help="the file, or - for standard input")
    report.add_argument("--content-type", help="force a media type (default: the service recognises it)")
    _add_client_options(report)
    report.set_defaults(func=cmd_report)

    incidents = sub.add_parser("incidents", help="read incidents from the service")
    which = incidents.add_subparsers(dest="incidents_command", required=True)
    listing = which.add_parser("list", help="incidents, newest first")
    for option in ("state", "reporter", "org", "since", "until", "next"):
        listing.add_argument(f"--{option}")
    listing.add_argument("--limit", type=int)
    _add_client_options(listing)
    listing.set_defaults(func=cmd_incidents_list)
    show = which.add_parser("show", help="one incident with its timeline")
    show.add_argument("id")
    _add_client_options(show)
    show.set_defaults(func=cmd_incidents_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
