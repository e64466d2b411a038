"""The canary idea applied to the console: canary keys sent by a partner alert, through the console's
report form (scanned, reported, and hidden in a refused note) and through the API, the owner told by
email; then every console page is loaded and searched for them in clear, with the service's log."""

from __future__ import annotations

import re
import secrets

import httpx
import pytest

from service.sandbox import SandboxKey
from tests.integration.console_helpers import ConsoleClient
from tests.integration.operator_helpers import operator_env, report

pytestmark = pytest.mark.integration


def canary_key() -> str:
    return f"sm_CANARY{secrets.token_hex(8)}_{secrets.token_hex(32)}"


def test_no_console_page_shows_a_token_in_clear(sandbox, make_service, smtp):
    live, pasted, in_note, listed = (canary_key() for _ in range(4))
    sandbox.supermemory.add_keys(
        [
            SandboxKey(live, "key_canary", "org_canary", "canary", "owner@example.test", "Owner", [], True),
            SandboxKey(
                pasted, "key_canary2", "org_canary", "canary2", "owner@example.test", "Owner", [], True
            ),
        ]
    )
    unshaped = f"canary-{secrets.token_hex(12)}"
    canaries = [live, pasted, in_note, listed, unshaped]
    service = make_service({**operator_env(), **smtp.env()})
    console = ConsoleClient(service)
    assert console.sign_in().status_code == 303

    def csrf() -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', console.get("/console/").text)
        assert found is not None
        return found.group(1)

    pages: dict[str, httpx.Response] = {"login": httpx.get(f"{service.url}/console/login")}
    assert service.post_alert(sandbox.github, [live]).status_code == 200
    assert report(service, {"tokens": [listed, unshaped]}).status_code == 200
    pages["report review"] = console.post(
        "/console/report/scan", {"csrf": csrf(), "text": f"A={pasted}\nB={listed}", "url": "https://x.test/p"}
    )
    sealed = re.search(r'name="sealed" value="([^"]+)"', pages["report review"].text)
    assert sealed is not None
    pages["report done"] = console.post("/console/report", {"csrf": csrf(), "sealed": sealed.group(1)})
    pages["report refused"] = console.post(
        "/console/report/scan", {"csrf": csrf(), "text": "x", "note": f"key {in_note}"}
    )
    assert [pages[p].status_code for p in ("report review", "report done", "report refused")] == [
        200,
        200,
        400,
    ]
    service.wait_state(live, "closed", timeout=30)
    service.wait_state(pasted, "closed", timeout=30)

    pages["overview"] = console.get("/console/")
    pages["incidents"] = console.get("/console/incidents")
    pages["rows"] = console.get("/console/incidents?rows=1")
    pages["report"] = console.get("/console/report")
    ids = set(re.findall(r"/console/incidents/(inc_[0-9a-f]+)", pages["incidents"].text))
    assert len(ids) == 4
    for incident_id in ids:
        pages[incident_id] = console.get(f"/console/incidents/{incident_id}")
    assert all(r.status_code == 200 for name, r in pages.items() if name != "report refused")
    # The search is real: the owner's email went out and its delivery shows on the incident page.
    live_page = next(
        r.text for name, r in pages.items() if name.startswith("inc_") and "key_canary<" in r.text
    )
    assert "owner@example.test" in live_page and 'class="delivery delivery-sent"' in live_page
    assert b"sm_CANA" in pages["incidents"].content and b"sm_CANA" in pages["report review"].content
    service.stop()

    outputs = {name: r.content + str(r.headers).encode() for name, r in pages.items()}
    outputs["service log"] = service.log_path.read_bytes()
    for canary in canaries:
        for name, blob in outputs.items():
            assert canary.encode() not in blob, f"canary found in clear in {name}"
