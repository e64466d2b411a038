"""Connections over real sockets: idle ones are closed, a crowd of them past the file limit does not
make the service deaf, and the soft file limit is raised at start."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.harness import Service, read_answer

pytestmark = pytest.mark.integration


@pytest.fixture
def limited(sandbox, tmp_path, request):
    """The service started with a small file limit (soft 128, hard 256), as a host might give it;
    the idle timeout is 1 s unless the test asks for another (`indirect` parameter)."""
    idle = getattr(request, "param", "1")
    service = Service(tmp_path, {**sandbox.env(), "LEAK_RESPONDER_CONNECTION_IDLE_TIMEOUT": idle})
    service.nofile = (128, 256)
    yield service.start()
    service.stop()


def test_the_soft_file_limit_is_raised_to_the_hard_one(limited):
    assert limited.open_files_limit() == (256, 256)


def test_a_connection_that_sends_nothing_is_closed(limited):
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, not timed out by us
        assert time.monotonic() - started < 8
    # So is one that never finishes its request head (a slow-headers client).
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(1) == b""


@pytest.mark.parametrize("limited", ["60"], indirect=True)  # the cap, not the timeout, must do it
def test_more_idle_connections_than_the_file_limit_do_not_make_it_deaf(limited):
    crowd = []
    try:
        for _ in range(400):  # past the hard limit of 256
            crowd.append(socket.create_connection(("127.0.0.1", limited.port), timeout=10))
        assert httpx.get(f"{limited.url}/livez", timeout=5).status_code == 200
        assert httpx.get(f"{limited.url}/readyz", timeout=5).status_code == 200
    finally:
        for sock in crowd:
            sock.close()
    assert limited.proc.poll() is None


def test_a_request_whose_head_arrived_is_not_cut_by_the_idle_timeout(sandbox, limited):
    # The timeout is for connections that never send a request head; once one has arrived, a body
    # slower than the timeout (a partner on a poor link) is still read and answered: here a signed
    # empty alert, refused only once its body is read.
    signature = sandbox.github.sign(b"[]")
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/alerts/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Github-Public-Key-Identifier: {sandbox.github.key_identifier}\r\n".encode()
            + f"Github-Public-Key-Signature: {signature}\r\nContent-Length: 2\r\n\r\n".encode()
        )
        time.sleep(2)  # twice the idle timeout
        sock.sendall(b"[]")
        status, answer = read_answer(sock)
    assert status == 400, answer[:200]
    assert "body_empty" in answer
