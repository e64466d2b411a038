"""The canary idea applied to the operator's surface: canary keys sent through /v1/reports (every
body kind, refusals and replays included) and through the CLI's `report` and `scan`, then searched
for in clear in the responses, the CLI's output, the service's log and its database files."""

from __future__ import annotations

import base64
import json
import secrets

import httpx
import pytest

from service.cli import main
from service.sandbox import SandboxKey
from tests.integration.operator_helpers import TOKENS, auth, get, operator_env, report

pytestmark = pytest.mark.integration


def canary_key() -> str:
    return f"sm_CANARY{secrets.token_hex(8)}_{secrets.token_hex(32)}"


def test_reports_and_cli_never_show_tokens_in_clear(sandbox, make_service, tmp_path, monkeypatch, capsys):
    live = canary_key()
    sandbox.supermemory.add_keys(
        [SandboxKey(live, "key_canary", "org_canary", "canary", "canary@example.test", "Canary", [], True)]
    )
    in_text, listed, in_gitleaks, in_trufflehog, encoded = (canary_key() for _ in range(5))
    in_note, too_large, via_cli, scanned, in_url = (canary_key() for _ in range(5))
    unshaped = f"canary-{secrets.token_hex(12)}"
    canaries = [live, in_text, listed, in_gitleaks, in_trufflehog, encoded, in_note, too_large, via_cli]
    canaries += [scanned, unshaped, in_url]
    service = make_service(operator_env())

    b64 = base64.b64encode(f'{{"apiKey": "{encoded}"}}'.encode()).decode()
    # Keys inside a file name, a link and a URL: each is stored and echoed, so each must be redacted.
    gitleaks = [
        {
            "RuleID": "generic",
            "File": f"{in_gitleaks}.env",
            "Link": f"https://x/{in_gitleaks}",
            "StartLine": 1,
        }
        | {"Secret": in_gitleaks, "Match": ""}
    ]
    trufflehog = {"SourceMetadata": {"Data": {"Git": {"file": "b.ts", "line": 2}}}, "Raw": in_trufflehog}
    sent = [
        report(service, f"key: {live}\nother: {in_text}\ndata: {b64}\n", content_type="text/plain", key="k1"),
        report(service, f"key: {live}\nother: {in_text}\ndata: {b64}\n", content_type="text/plain", key="k1"),
        report(service, {"tokens": [listed, unshaped, live], "url": f"https://paste.example/?k={in_url}"}),
        report(service, gitleaks),
        report(service, json.dumps(trufflehog)),
        report(service, {"text": "hello", "note": f"was {in_note}"}),
        report(service, f"{too_large}\n" + "x" * (1024 * 1024), content_type="text/plain"),
        report(service, {"tokens": [listed]}, key="k1"),
        httpx.post(f"{service.url}/v1/reports", content=f"{live}".encode(), headers={"Authorization": live}),
    ]
    assert [r.status_code for r in sent] == [200, 200, 200, 200, 200, 400, 413, 422, 401]
    assert len(sent[0].json()["findings"]) == 3
    service.wait_state(live, "confirmed")
    incident_id = sent[2].json()["findings"][2]["incident_id"]
    sent += [get(service, "/v1/incidents"), get(service, f"/v1/incidents/{incident_id}")]
    sent.append(httpx.post(f"{service.url}/v1/incidents/{incident_id}/retry", headers=auth()))
    sent.append(httpx.get(f"{service.url}/metrics"))

    leak = tmp_path / "leak.txt"
    leak.write_text(f"token={via_cli}\n")
    to_scan = tmp_path / "scan.txt"
    to_scan.write_text(f"SUPERMEMORY_API_KEY={scanned}\n")
    monkeypatch.setenv("LEAK_RESPONDER_OPERATOR_TOKEN", TOKENS["alice"])
    assert main(["report", str(leak), "--url", service.url]) == 0
    assert main(["scan", "--progress", str(to_scan), str(leak)]) == 1
    assert main(["incidents", "list", "--url", service.url]) == 0
    assert main(["incidents", "show", incident_id, "--url", service.url]) == 0
    assert main(["incidents", "show", incident_id, "--url", service.url, "--json"]) == 0
    cli = capsys.readouterr()
    service.stop()

    outputs = {f"response {i}": r.content for i, r in enumerate(sent)}
    outputs |= {f"response {i} headers": str(r.headers).encode() for i, r in enumerate(sent)}
    outputs["cli stdout"] = cli.out.encode()
    outputs["cli stderr"] = cli.err.encode()
    outputs["service log"] = service.log_path.read_bytes()
    for path in tmp_path.glob("leak-responder.db*"):
        outputs[path.name] = path.read_bytes()
    assert outputs["service log"] and outputs["cli stdout"]
    for canary in canaries:
        for name, blob in outputs.items():
            assert canary.encode() not in blob, f"canary found in clear in {name}"
    # The search is real: redacted forms are there, in the responses and in the CLI's output.
    assert b"sm_CANA" in outputs["response 0"] and b"sm_CANA" in outputs["cli stdout"]
