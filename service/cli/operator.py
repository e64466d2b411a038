"""`report` and `incidents`: clients of a running service's operator API."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.cli._common import DEV_PORTS
from service.settings import environment

TOKEN_ENV = "LEAK_RESPONDER_OPERATOR_TOKEN"  # noqa: S105 (the variable's name, not a token)
URL_ENV = "LEAK_RESPONDER_URL"


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
        token = environment().get(TOKEN_ENV, "").strip()
    if not token:
        raise _ApiError(f"no operator token: set {TOKEN_ENV} (or put it in .env) or pass --token-file", 2)
    return token


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


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
        body = {"error": "bad_response", "detail": response.text[:200]}
    if response.status_code >= 300:
        raise _ApiError(
            f"the service answered {response.status_code} {body.get('error')}: {body.get('detail')}", 1
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
    if args.json:
        _print_json(result)
        return
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
    if args.json:
        _print_json(page)
        return
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


def _print_incident(args: argparse.Namespace, i: dict[str, Any]) -> None:
    """An incident as `show` and `retry` print it: the API's JSON with --json, else `_show`'s text."""
    if args.json:
        _print_json(i)
    else:
        _show(i)


def _show(i: dict[str, Any]) -> None:
    print(f"{i['id']}  {i['state']}  {i['label'] or '-'}  {i['redacted']}  sha256={i['token_hash']}")
    print(f"key {i['key_id'] or '-'} ({i['key_name'] or '-'}) org {i['org_id'] or '-'}")
    print(f"time to revoke {_seconds(i['time_to_revoke'])}, to confirm {_seconds(i['time_to_confirm'])}")
    if i["unconfirmed_at"]:
        print(f"answered after its revoke from {i['unconfirmed_at']}, last probed {i['probed_at']}")
    print(f"waiting for: {i['waiting_for'] or 'nothing (final)'}")
    print(f"pages: {', '.join(i['pages']) or '-'}")
    print("deliveries:" if i["emails"] else "deliveries: -")
    for d in i["emails"]:
        detail = f"  ({d['detail']})" if d["detail"] else ""
        print(
            f"  {d['recipient']}  {d['purpose']}  {d['status']}  attempts={d['attempts']}"
            f"  message-id={d['message_id'] or '-'}{detail}"
        )
    print("sightings:")
    for s in i["sightings"]:
        who = s["reporter"] + (f" ({s['operator']})" if s["operator"] else "")
        print(f"  {s['seen_at']}  {who}  {s['source'] or '-'}  {s['url'] or '-'}")
    print("recipients:")
    sent = {(e["recipient"], e["purpose"]): e["status"] for e in i["emails"]}
    for r in i["recipients"]:
        status = sent.get((r["email"].lower(), "owner"), "-")
        print(f"  {r['role']:<7} {r['email']}  {status}")
    if i["channels"]:
        print("channels:")
    for c in i["channels"]:
        why = f" {c['reason']}" if c["reason"] else ""
        what = f"{c['channel_id']} ({c['type']})"
        print(f"  {what}  {c['event_state']:<11} {c['status']:<8} x{c['attempts']}{why}")
    print("timeline:")
    for e in i["events"]:
        detail = " ".join(f"{k}={v}" for k, v in e["detail"].items())
        print(f"  {e['at']}  {e['kind']:<18} {e['state'] or '':<14} {detail}".rstrip())


@_client
def cmd_incidents_show(args: argparse.Namespace) -> None:
    _print_incident(args, _api(args, "GET", f"/v1/incidents/{args.id}"))


@_client
def cmd_incidents_retry(args: argparse.Namespace) -> None:
    """Run a stuck incident's step again now (the service answers 409 when it is not stuck)."""
    _print_incident(args, _api(args, "POST", f"/v1/incidents/{args.id}/retry"))


@_client
def cmd_incidents_resolve(args: argparse.Namespace) -> None:
    """Close an open incident by hand (an `unconfirmed` key checked by other means); the note is
    kept on its timeline."""
    i = _api(args, "POST", f"/v1/incidents/{args.id}/resolve", json={"note": args.note})
    if args.json:
        _print_json(i)
        return
    print(f"{i['id']}  {i['state']}  resolved by hand")


def cmd_operator_token(args: argparse.Namespace) -> int:
    """A new operator token, and the entry that makes the service accept it. Only the hash goes
    into the service's settings; the token itself is shown once, here."""
    name = args.name
    if not name or any(c in name for c in ":, \t\n"):
        print("leak-responder: an operator name has no ':', ',' or spaces", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    entry = f"{name}:{hashlib.sha256(token.encode()).hexdigest()}"
    print(f"operator token for {name} (shown once; give it to {name}, keep it out of logs):")
    print(f"  {TOKEN_ENV}={token}")
    print("add this entry to the service's setting (comma-separated with the others):")
    print(f"  LEAK_RESPONDER_OPERATOR_TOKENS={entry}")
    return 0


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    default = f"http://127.0.0.1:{DEV_PORTS['service']}"
    parser.add_argument(
        "--url",
        default=environment().get(URL_ENV) or default,
        help=f"the service (default: ${URL_ENV}, else {default}; .env is read too)",
    )
    parser.add_argument(
        "--token-file", help=f"file holding the operator token (default: ${TOKEN_ENV}; .env is read too)"
    )
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer as it is")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    retry = which.add_parser("retry", help="run a stuck incident's step again now")
    retry.add_argument("id")
    _add_client_options(retry)
    retry.set_defaults(func=cmd_incidents_retry)
    resolve = which.add_parser("resolve", help="close an open incident by hand, with a note")
    resolve.add_argument("id")
    resolve.add_argument("--note", required=True, help="why it is resolved (kept on the timeline)")
    _add_client_options(resolve)
    resolve.set_defaults(func=cmd_incidents_resolve)

    token = sub.add_parser(
        "operator-token",
        help="make a new operator token and print the entry for LEAK_RESPONDER_OPERATOR_TOKENS",
    )
    token.add_argument("name", help="the operator's name, as logs and the audit trail will show it")
    token.set_defaults(func=cmd_operator_token)
