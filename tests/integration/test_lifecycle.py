"""Start-up refuses a bad configuration in one line; SIGTERM stops cleanly and hands work back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration


def run_cli(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEAK_RESPONDER_", "SENTRY_"))}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LEAK_RESPONDER_MODE": "sometimes"}, "LEAK_RESPONDER_MODE"),
        ({"LEAK_RESPONDER_DATA_KEY": "c2hvcnQ="}, "LEAK_RESPONDER_DATA_KEY"),
        ({"LEAK_RESPONDER_OPERATOR_TOKENS": "alice:nothex"}, "LEAK_RESPONDER_OPERATOR_TOKENS"),
        (
            {
                "LEAK_RESPONDER_SUPERMEMORY_ADMIN_URL": "https://admin.example",
                "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "",
            },
            "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN",
        ),
        ({"LEAK_RESPONDER_DATABASE_URL": "mysql://x"}, "LEAK_RESPONDER_DATABASE_URL"),
        ({"LEAK_RESPONDER_PROBE_SCHEDULE": "5,2"}, "LEAK_RESPONDER_PROBE_SCHEDULE"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(sandbox, tmp_path, env, named):
    result = run_cli(["serve", "--port", "9"], {**sandbox.env(), **env}, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the configuration holds"


def test_check_config_masks_secrets(sandbox, tmp_path):
    env = {**sandbox.env(), "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "very-secret-admin-token"}
    result = run_cli(["check-config"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "very-secret-admin-token" not in result.stdout
    assert "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN" in result.stdout and "(set, masked)" in result.stdout


def test_sigterm_exits_cleanly_and_releases_leases(sandbox, make_service, tmp_path):
    # Leases long enough that a restart could only pick the work up at once if it was handed back.
    env = {"LEAK_RESPONDER_LEASE_SECONDS": "120"}
    service = make_service(env)
    sandbox.supermemory.set_knobs(hang_ms={"revoke": 60_000})
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    wait_until(lambda: sandbox.supermemory.stats()["calls"]["revoke"] >= 1)
    started = time.monotonic()
    assert service.stop() == 0
    assert time.monotonic() - started < 30
    assert service.incident(token)["lease_owner"] is None

    sandbox.supermemory.set_knobs(hang_ms={})
    restarted = make_service(env, workdir=tmp_path)
    restarted.wait_state(token, "confirmed", timeout=15)
