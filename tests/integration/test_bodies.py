"""Bodies over real sockets: a stranger is refused from its headers before its body is read, and the
bytes held for bodies being received are bounded across all requests."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from service.sandbox import build_alert
from tests.harness import metric, read_answer, stranger_signature, wait_until
from tests.integration.operator_helpers import TOKENS, operator_env

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def open_upload(service, headers: dict[str, str], length: int, sent: bytes = b"[") -> socket.socket:
    """A POST that declares `length` bytes of body and sends only `sent` of them, left open."""
    path = headers.pop(":path", "/v1/alerts/github")
    head = "".join(
        f"{k}: {v}\r\n" for k, v in {"Host": "x", "Content-Length": str(length), **headers}.items()
    )
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + sent)
    return sock


def signed_by_github(sandbox) -> dict[str, str]:
    """Headers that pass the check made before the body (a known key identifier); the signature
    itself is a stranger's, refused only once the body is read."""
    return {
        "Github-Public-Key-Identifier": sandbox.github.key_identifier,
        "Github-Public-Key-Signature": stranger_signature(),
    }


@contextlib.contextmanager
def budget_held(service, signed: dict[str, str], left: int) -> Iterator[None]:
    """Six uploads near the limit, their bodies never sent, hold the bodies' budget (6 x
    BODY_LIMIT) but `left` bytes, until the block ends."""
    held = [open_upload(service, dict(signed), 10 * MIB - left // 6) for _ in range(6)]
    try:
        wait_until(lambda: held_bytes(service) == 60 * MIB - left)
        yield
    finally:
        for sock in held:
            sock.close()


def held_bytes(service) -> float:
    return metric(httpx.get(f"{service.url}/metrics").text, "leak_responder_body_bytes_reserved")


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({}, 401, "signature_missing"),
        (
            {"Github-Public-Key-Identifier": "nope", "Github-Public-Key-Signature": stranger_signature()},
            401,
            "key_unknown",
        ),
        (
            {"Github-Public-Key-Signature": "%%%", "Github-Public-Key-Identifier": "x"},
            401,
            "signature_malformed",
        ),
    ],
)
def test_a_stranger_is_refused_before_its_body_is_read(service, headers, status, reason):
    with open_upload(service, headers, 10 * MIB) as sock:
        got, text = read_answer(sock)  # the other 10 MiB never come: a server waiting for them hangs
    assert (got, f'"error":"{reason}"' in text) == (status, True), text


def test_a_declared_length_past_the_limit_is_refused_at_once(sandbox, service):
    with open_upload(service, signed_by_github(sandbox), 10 * MIB + 1) as sock:
        got, text = read_answer(sock)
    assert got == 413 and '"error":"body_too_large"' in text


def test_bodies_in_flight_are_bounded_across_requests(sandbox, make_service):
    service = make_service(operator_env())
    signed = signed_by_github(sandbox)
    with budget_held(service, signed, left=6 * 1024):
        # Six bodies near the limit hold the budget (6 x BODY_LIMIT): a seventh waits for its retry,
        # and so does a report that declares more than the 6 KiB left.
        with open_upload(service, dict(signed), 10 * MIB) as sock:
            got, text = read_answer(sock)
        assert got == 503 and '"error":"body_budget_full"' in text and "retry-after: 1" in text.lower()
        report = {":path": "/v1/reports", "Authorization": f"Bearer {TOKENS['alice']}"}
        with open_upload(service, report, 8 * 1024) as sock:
            got, text = read_answer(sock)
        assert got == 503 and '"error":"body_budget_full"' in text
        # Anyone's report too: it counts against the same bytes, whoever sends it.
        public = {":path": "/v1/public/reports", "Content-Type": "text/plain"}
        with open_upload(service, public, 8 * 1024, sent=b"x") as sock:
            got, text = read_answer(sock)
        assert got == 503 and '"error":"body_budget_full"' in text and "retry-after: 1" in text.lower()
        # A small body still fits in what is left: the budget counts what each declared.
        body = build_alert([sandbox.tokens[0]], url=None)
        assert service.post_alert(sandbox.github, [], body=body).status_code == 200
    wait_until(lambda: held_bytes(service) == 0)
    # Given back when those requests ended: a body at the limit is read again.
    with open_upload(service, dict(signed), 10 * MIB) as sock:
        sock.sendall(b"]" + b" " * (10 * MIB - 2))
        got, text = read_answer(sock)
    assert got == 401 and '"error":"signature_invalid"' in text
    assert service.failures("inbound", "body_budget_full") == 1
    assert service.failures("public", "body_budget_full") == 1
    # Once the budget is free, the same report is read as any other and received.
    public = {":path": "/v1/public/reports", "Content-Type": "text/plain"}
    with open_upload(service, public, 8 * 1024, sent=b"x" * 8 * 1024) as sock:
        got, text = read_answer(sock)
    assert got == 202, text


def test_a_crowd_of_unsigned_uploads_costs_no_memory(service):
    before = service.peak_rss_kib()

    def upload() -> None:
        try:
            with open_upload(service, {}, 10 * MIB) as sock:
                chunk = b" " * MIB
                for _ in range(10):
                    sock.sendall(chunk)
                read_answer(sock)
        except OSError:
            pass  # refused and closed under our feet: what we want

    threads = [threading.Thread(target=upload) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert service.peak_rss_kib() - before < 60 * 1024
    assert len(service.logged("signature_missing")) == 40


def test_a_console_form_is_read_within_the_same_budget(sandbox, make_service):
    """The sign-in form is read before anyone is known: it reserves its bytes like an alert's body,
    and waits for its retry when the bodies in flight hold the budget."""
    service = make_service(operator_env())
    signin = {
        ":path": "/console/login",
        "Origin": "http://x",  # the Host that open_upload sends: a form of this site
        "Content-Type": "application/x-www-form-urlencoded",
    }
    with open_upload(service, dict(signin), 3000, sent=b"csrf=") as sock:
        wait_until(lambda: held_bytes(service) == 3000)
    wait_until(lambda: held_bytes(service) == 0)
    with budget_held(service, signed_by_github(sandbox), left=3 * 1024):
        # 3 KiB left: less than a sign-in form within its own 4 KiB limit may declare.
        with open_upload(service, dict(signin), 4000, sent=b"") as sock:
            got, text = read_answer(sock)
        assert got == 503 and "retry-after: 1" in text.lower(), text
        assert "too many bodies are being received at once" in text
    assert service.failures("console", "body_budget_full") == 1
