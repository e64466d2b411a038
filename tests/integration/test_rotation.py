"""Rotating secrets as docs/operations.md says, each tried once: an operator token (new entry beside
the old, then the old removed) and the Supermemory admin token (new one first, then the old refused)."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest

from service.cli import main
from tests.harness import wait_until

pytestmark = pytest.mark.integration


def entry_and_token(name: str, capsys) -> tuple[str, str]:
    assert main(["operator-token", name]) == 0
    printed = capsys.readouterr().out
    return (
        re.search(r"LEAK_RESPONDER_OPERATOR_TOKENS=(\S+)", printed)[1],
        re.search(r"LEAK_RESPONDER_OPERATOR_TOKEN=(\S+)", printed)[1],
    )


def get(service, token: str) -> int:
    return httpx.get(f"{service.url}/v1/incidents", headers={"Authorization": f"Bearer {token}"}).status_code


def test_operator_token_rotation(make_service, tmp_path, capsys):
    old_entry, old = entry_and_token("dana", capsys)
    new_entry, new = entry_and_token("dana-2", capsys)
    service = make_service({"LEAK_RESPONDER_OPERATOR_TOKENS": old_entry})
    assert (get(service, old), get(service, new)) == (200, 403)
    service.stop()
    both = make_service({"LEAK_RESPONDER_OPERATOR_TOKENS": f"{old_entry},{new_entry}"}, workdir=tmp_path)
    assert (get(both, old), get(both, new)) == (200, 200)
    both.stop()
    after = make_service({"LEAK_RESPONDER_OPERATOR_TOKENS": new_entry}, workdir=tmp_path)
    assert (get(after, old), get(after, new)) == (403, 200)
    assert hashlib.sha256(new.encode()).hexdigest() in new_entry


def test_admin_token_rotation(sandbox, make_service, tmp_path):
    service = make_service()
    assert service.post_alert(sandbox.github, [sandbox.tokens[0]]).json()[0]["label"] == "true_positive"
    service.stop()
    # Supermemory issues the new token (here the sandbox switches to it), the service is restarted
    # with it, and alerts are looked up as before; the old one, still configured, would be refused.
    old = sandbox.supermemory.knobs.admin_token
    sandbox.supermemory.set_knobs(admin_token="rotated-admin-token")
    stale = make_service({"LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": old}, workdir=tmp_path)
    assert stale.post_alert(sandbox.github, [sandbox.tokens[1]]).status_code == 200
    wait_until(lambda: [r for r in stale.logged("lookup_unauthorized") if r.get("page")])
    assert stale.state(sandbox.tokens[1]) == "received"
    stale.stop()
    rotated = make_service(
        {"LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "rotated-admin-token"}, workdir=tmp_path
    )
    rotated.wait_state(sandbox.tokens[1], "confirmed", "notified", "closed", timeout=30)
    assert rotated.post_alert(sandbox.github, [sandbox.tokens[2]]).json()[0]["label"] == "true_positive"
