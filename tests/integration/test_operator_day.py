"""An operator's first day, over real HTTP and the real CLI: making an operator token, the CLI finding
the service and the token in the environment or `.env`, distinct refusals, and an incident that
says what it is waiting for and where each email stands."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from service.cli import main
from tests.harness import wait_until
from tests.integration.operator_helpers import TOKENS, auth, operator_env

pytestmark = pytest.mark.integration


def test_operator_token_command_and_the_cli_reading_env_and_dotenv(
    make_service, tmp_path, monkeypatch, capsys
):
    assert main(["operator-token", "carol"]) == 0
    printed = capsys.readouterr().out
    token = re.search(r"LEAK_RESPONDER_OPERATOR_TOKEN=(\S+)", printed)[1]
    entry = re.search(r"LEAK_RESPONDER_OPERATOR_TOKENS=(\S+)", printed)[1]
    assert entry.startswith("carol:") and token not in entry
    assert main(["operator-token", "a:b"]) == 2

    service = make_service({"LEAK_RESPONDER_OPERATOR_TOKENS": entry})
    # Neither --url nor --token-file: the CLI reads both from .env in the working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LEAK_RESPONDER_OPERATOR_TOKEN", raising=False)
    monkeypatch.delenv("LEAK_RESPONDER_URL", raising=False)
    (tmp_path / ".env").write_text(
        f"LEAK_RESPONDER_URL={service.url}\nLEAK_RESPONDER_OPERATOR_TOKEN={token}\n"
    )
    assert main(["incidents", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"incidents": [], "next": None}
    # The environment wins over .env.
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", "not-carols")
    assert main(["incidents", "list"]) == 1
    assert "403 auth_forbidden" in capsys.readouterr().err


def test_no_operators_configured_is_not_a_wrong_token(service):
    response = httpx.get(f"{service.url}/v1/incidents", headers=auth())
    assert response.status_code == 403
    assert response.json()["error"] == "operators_not_configured"
    assert "LEAK_RESPONDER_OPERATOR_TOKENS" in response.json()["detail"]
    assert service.failures("operators", "operators_not_configured") == 1


def test_an_incident_says_what_it_waits_for_and_where_each_email_stands(
    sandbox, make_service, smtp, monkeypatch, capsys
):
    smtp.reply["RCPT"] = "451 4.7.1 try again later"
    # A long backoff: between its attempts the email is visibly pending, not being sent.
    slow = {"LEAK_RESPONDER_BACKOFF_BASE": "4", "LEAK_RESPONDER_BACKOFF_MAX": "4"}
    service = make_service({**operator_env(), **smtp.env(), **slow})
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    wait_until(lambda: "notify_pending" in service.events(token))
    incident_id = service.incident(token)["id"]
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    monkeypatch.setenv("LEAK_RESPONDER_URL", service.url)

    assert main(["incidents", "show", incident_id, "--json"]) == 0
    waiting = json.loads(capsys.readouterr().out)
    assert waiting["state"] == "confirmed"
    assert re.fullmatch(
        r"notify at \S+ after \d+ failed attempt\(s\), last smtp_temporary_failure", waiting["waiting_for"]
    )
    [pending] = [d for d in waiting["emails"] if d["recipient"] == "owner0@example.test"]
    assert pending["status"] == "pending" and pending["message_id"].startswith("<")
    assert "451" in pending["detail"]

    # A confirmed incident moves on by itself (its email is retried with backoff): not retryable.
    assert main(["incidents", "retry", incident_id, "--json"]) == 1
    assert "409 incident_not_retryable" in capsys.readouterr().err
    assert main(["incidents", "show", incident_id]) == 0
    shown = capsys.readouterr().out
    assert "waiting for: notify at" in shown and "smtp_temporary_failure" in shown
    smtp.reply.clear()
    service.wait_state(token, "closed")
    assert main(["incidents", "show", incident_id]) == 0
    shown = capsys.readouterr().out
    assert "waiting for: nothing (final)" in shown
    [message] = smtp.to("owner0@example.test")
    sent = re.search(r"owner0@example.test\s+\S+\s+sent\s+attempts=\d+\s+message-id=(\S+)", shown)
    assert sent and sent[1] == message.email["Message-ID"]


def test_incidents_retry_pushes_a_stuck_revoke_at_once(sandbox, make_service, monkeypatch, capsys):
    sandbox.supermemory.set_knobs(fail_next={"revoke": 1000}, fail_status={"revoke": 503})
    slow = {"LEAK_RESPONDER_BACKOFF_BASE": "60", "LEAK_RESPONDER_BACKOFF_MAX": "60"}
    service = make_service({**operator_env(), **slow})
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    wait_until(lambda: service.incident(token)["attempts"] >= 1)
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    monkeypatch.setenv("LEAK_RESPONDER_URL", service.url)
    sandbox.supermemory.set_knobs(fail_next={"revoke": 0})
    assert main(["incidents", "retry", service.incident(token)["id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attempts"] == 0
    service.wait_state(token, "confirmed", "notified", "closed")  # long before the 60 s backoff
