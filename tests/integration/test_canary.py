"""Plant canary tokens, drive them down every path (accepted, refused, retried, crashed), then search
every output the service has for them in clear: its log, its responses, its metrics and the bytes of
its database files (the WAL included)."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from service.sandbox import SandboxKey, build_alert

pytestmark = pytest.mark.integration


def canary_key() -> str:
    return f"sm_CANARY{secrets.token_hex(8)}_{secrets.token_hex(32)}"


def test_raw_tokens_never_appear_in_any_output(sandbox, make_service, tmp_path):
    live = canary_key()
    sandbox.supermemory.add_keys(
        [SandboxKey(live, "key_canary", "org_canary", "canary", "canary@example.test", "Canary", [], True)]
    )
    unknown_shaped = canary_key()
    unshaped = f"canary-{secrets.token_hex(12)}"
    in_bad_body = canary_key()
    in_bad_signature = canary_key()
    in_url = canary_key()
    canaries = [live, unknown_shaped, unshaped, in_bad_body, in_bad_signature, in_url]

    service = make_service()
    responses: list[httpx.Response] = []
    # Failures on every Supermemory call, so the retry and error paths log too.
    sandbox.supermemory.set_knobs(
        fail_next={"lookup": 1, "revoke": 2, "probe": 2},
        fail_status={"lookup": 503, "revoke": 429, "probe": 500},
        retry_after=0.1,
        propagation_delay_s=0.3,
    )
    responses.append(service.post_alert(sandbox.github, [live, unknown_shaped, unshaped]))
    # The key inside the URL (and the source) of its own alert, as a leak in a query string shows.
    responses.append(
        service.post_alert(sandbox.github, [in_url], url=f"https://example.test/x?key={in_url}&live={live}")
    )
    responses.append(
        service.post_alert(sandbox.github, [], body=json.dumps([{"token": in_bad_body, "type": 5}]).encode())
    )
    body = build_alert([in_bad_signature], url=None)
    responses.append(
        httpx.post(
            f"{service.url}/v1/alerts/github",
            content=body,
            headers={
                "Github-Public-Key-Identifier": sandbox.github.key_identifier,
                "Github-Public-Key-Signature": sandbox.github.sign(body + b" "),
            },
        )
    )
    # Crash mid-pipeline and come back, so start-up and recovery paths are covered too.
    service.kill()
    restarted = make_service(workdir=tmp_path)
    restarted.wait_state(live, "confirmed", timeout=30)
    restarted.wait_state(unknown_shaped, "false_positive")
    responses.append(restarted.post_alert(sandbox.github, [live, unknown_shaped, unshaped]))
    responses.append(httpx.get(f"{restarted.url}/metrics"))
    responses.append(httpx.get(f"{restarted.url}/readyz"))
    restarted.stop()

    assert [r.status_code for r in responses] == [200, 200, 400, 401, 200, 200, 200]
    outputs = {f"response {i}": r.content for i, r in enumerate(responses)}
    outputs |= {f"response {i} headers": str(r.headers).encode() for i, r in enumerate(responses)}
    outputs["service log"] = restarted.log_path.read_bytes()
    for path in tmp_path.glob("leak-responder.db*"):
        outputs[path.name] = path.read_bytes()
    assert outputs["service log"], "the log is empty: the search would prove nothing"
    assert any(name.endswith(".db") for name in outputs)

    for canary in canaries:
        for name, blob in outputs.items():
            assert canary.encode() not in blob, f"canary found in clear in {name}"
    # And the search is real: the redacted forms and hashes the service may show are there.
    assert b"sm_CANA" in outputs["service log"] or b"sm_CANA" in outputs["leak-responder.db"]
