"""`make run` (`leak-responder dev`) as a newcomer meets it: on ports of its choosing, the printed
command sends a first alert, the owner's email lands as a file, the demo operator sees the incident
closed; and a busy port is one clear line."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from tests.harness import free_port, wait_until

pytestmark = pytest.mark.integration


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LEAK_RESPONDER_", "SENTRY_"))}


def cli(args: list[str], cwd, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_make_run_shows_the_whole_story_on_moved_ports(tmp_path):
    ports = {"--port": free_port(), "--supermemory-port": free_port()}
    ports |= {"--github-port": free_port(), "--receiver-port": free_port(), "--smtp-port": free_port()}
    args = [str(a) for pair in ports.items() for a in pair]
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "dev", *args],
        cwd=tmp_path,
        env=clean_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed = wait_until(
            lambda: "incidents list" in (text := (tmp_path / "out.txt").read_text()) and text, timeout=60
        )
        send = re.search(r"simulate-github (.+)", printed)[1]
        sent = cli(["simulate-github", *shlex.split(send)], tmp_path, clean_env())
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert '"label": "true_positive"' in sent.stdout

        mail = tmp_path / "data" / "mail"
        wait_until(
            lambda: any(b"To: owner0@example.test" in m.read_bytes() for m in mail.glob("*.eml")), timeout=30
        )

        token = re.search(r"LEAK_RESPONDER_OPERATOR_TOKEN=(\S+)", printed)[1]
        listing = re.search(r"(incidents list.*)", printed)[1]
        env = {**clean_env(), "LEAK_RESPONDER_OPERATOR_TOKEN": token}
        closed = wait_until(
            lambda: "closed" in (r := cli(shlex.split(listing), tmp_path, env)).stdout and r, timeout=30
        )
        assert closed.returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        out.close()


def test_a_busy_port_is_one_clear_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        others = ["--port", "--supermemory-port", "--github-port", "--receiver-port"]
        moved = [a for option in others for a in (option, str(free_port()))]
        done = cli(["dev", *moved, "--smtp-port", str(port)], tmp_path, clean_env())
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"port {port} (smtp) is not free" in done.stderr and "--smtp-port N" in done.stderr
