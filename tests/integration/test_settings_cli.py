"""Bad settings as an operator meets them, through the real command line: one line naming the
setting and exit 2, before anything starts; warnings that do not stop it; no password shown."""

from __future__ import annotations

import pytest

from tests.harness import Service

pytestmark = pytest.mark.integration


def run(tmp_path, env, *args):
    return Service(tmp_path, env).cli(*args)


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SENTRY_DSN": "https://sentry.example/1"}, "SENTRY_DSN"),
        ({"LEAK_RESPONDER_BODY_LIMIT": "10 MB please"}, "LEAK_RESPONDER_BODY_LIMIT"),
    ],
)
def test_a_bad_setting_stops_every_command_with_one_line(sandbox, tmp_path, command, env, named):
    done = run(tmp_path, {**sandbox.env(), **env}, command)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"leak-responder: setting {named}: ")
    assert "Traceback" not in done.stderr + done.stdout


def test_check_config_warns_and_masks(sandbox, tmp_path):
    env = {
        **sandbox.env(),
        "LEAK_RESPONDER_BODY_LIMIT": "10MB",
        "LEAK_RESPONDER_RETENTION_DAYS": "45",
        "LEAK_RESPONDER_MAIL_FRM": "x@example.test",  # sic
        "LEAK_RESPONDER_DATABASE_URL": "postgresql://leak:pg-s3cret@db.internal/leak",
        "LEAK_RESPONDER_DATA_KEY": "A" * 43 + "=",
        "LEAK_RESPONDER_SMTP_URL": "smtp://mailer:smtp-s3cret@mail.example:587",
        "LEAK_RESPONDER_MAIL_FROM": "x@example.test",
    }
    done = run(tmp_path, env, "check-config")
    assert done.returncode == 0, done.stderr
    assert "LEAK_RESPONDER_BODY_LIMIT" in done.stdout and "10000000" in done.stdout
    assert "postgresql://leak:***@db.internal/leak" in done.stdout
    assert "s3cret" not in done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("leak-responder: warning: ")]
    assert len(warnings) == 2
    assert "did you mean LEAK_RESPONDER_MAIL_FROM?" in warnings[0]
    assert "LEAK_RESPONDER_RETENTION_DAYS is 45 days" in warnings[1]
