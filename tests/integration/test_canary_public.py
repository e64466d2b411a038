"""The canary idea applied to the public surface: canary keys sent through /v1/public/reports in every
accepted form and every refused one (too large, too many keys, wrong type, over a client's rate,
over everyone's), with a URL that holds a key, then searched for in clear in the responses, the
/report page, security.txt, the metrics, the log, the database files, the owner's email and the
Sentry page of the flood."""

from __future__ import annotations

import base64
import json
import secrets
import urllib.parse

import httpx
import pytest

from service.sandbox import SandboxKey
from tests.harness import wait_until
from tests.integration.public_helpers import public

pytestmark = pytest.mark.integration


def canary_key() -> str:
    return f"sm_CANARY{secrets.token_hex(8)}_{secrets.token_hex(32)}"


def fragments(token: str) -> list[bytes]:
    """The token, its body without the prefix, and its tail: a partial leak is still a leak."""
    return [token.encode(), token[3:].encode(), token[-16:].encode(), token[8:30].encode()]


def test_public_reports_never_show_tokens_in_clear(sandbox, make_service, tmp_path, smtp, sentry):
    live = canary_key()
    sandbox.supermemory.add_keys(
        [SandboxKey(live, "key_canary", "org_canary", "canary", "canary@example.test", "Canary", [], True)]
    )
    in_json, in_url, encoded, percent, in_form = (canary_key() for _ in range(5))
    too_large, too_many, wrong_type, over_client, over_everyone = (canary_key() for _ in range(5))
    unshaped = f"canary-{secrets.token_hex(12)}"
    canaries = [live, in_json, in_url, encoded, percent, in_form, too_large, too_many, wrong_type]
    canaries += [over_client, over_everyone, unshaped]
    service = make_service(
        {
            **smtp.env(),
            **sentry.env(),
            "LEAK_RESPONDER_PUBLIC_RATE": "12/minute",
            "LEAK_RESPONDER_PUBLIC_GLOBAL_RATE": "20/minute",
            "LEAK_RESPONDER_PUBLIC_MAX_KEYS": "3",
            "LEAK_RESPONDER_TRUSTED_PROXIES": "127.0.0.0/8",
        }
    )
    b64 = base64.b64encode(f'{{"apiKey": "{encoded}"}}'.encode()).decode()
    leaky_url = f"https://paste.example/raw/1?k={in_url}"
    sent = [
        public(service, f"key: {live}\nalso {unshaped}\ndata: {b64}\n", client="198.51.100.1"),
        public(service, {"text": f"{in_json} {live}", "url": leaky_url}, client="198.51.100.1"),
        public(service, f"x={urllib.parse.quote(percent + '&')}", client="198.51.100.1"),
        public(service, f"url=https://gist.example/1\r\ntext={in_form}\r\n", client="198.51.100.1"),
        public(service, f"{too_large}\n" + "x" * (64 * 1024), client="198.51.100.1"),
        public(service, "\n".join([too_many, *(canary_key() for _ in range(3))]), client="198.51.100.1"),
        public(
            service, f"{wrong_type}", content_type="application/x-www-form-urlencoded", client="198.51.100.1"
        ),
    ]
    sent += [public(service, "nothing", client="198.51.100.1") for _ in range(5)]
    sent.append(public(service, over_client, client="198.51.100.1"))
    sent += [public(service, "nothing", client=f"198.51.100.{i}") for i in range(2, 14)]
    sent.append(public(service, over_everyone, client="198.51.100.99"))
    statuses = [r.status_code for r in sent]
    assert statuses[:7] == [202, 202, 202, 202, 413, 413, 415], statuses
    assert (
        statuses[12] == 429
        and statuses[-1] == 429
        and sent[-1].json()["error"] == "public_global_rate_limited"
    )
    for token in (live, in_json, in_url, encoded, percent, in_form):
        service.wait_state(token, "confirmed", "closed", "false_positive")
    service.wait_state(live, "closed")
    wait_until(lambda: sentry.pages("public_reports_flooded"), timeout=30)
    sent += [
        httpx.get(f"{service.url}/report"),
        httpx.get(f"{service.url}/.well-known/security.txt"),
        httpx.get(f"{service.url}/metrics"),
        httpx.get(f"{service.url}/openapi.json"),
    ]
    service.stop()

    outputs = {f"response {i}": r.content for i, r in enumerate(sent)}
    outputs |= {f"response {i} headers": str(r.headers).encode() for i, r in enumerate(sent)}
    outputs["service log"] = service.log_path.read_bytes()
    for path in tmp_path.glob("leak-responder.db*"):
        outputs[path.name] = path.read_bytes()
    outputs |= {f"email {i}": m.raw for i, m in enumerate(smtp.received())}
    outputs["sentry"] = sentry.all_bytes()
    assert outputs["service log"] and any(k.startswith("email") for k in outputs) and outputs["sentry"]
    for canary in canaries:
        for fragment in fragments(canary):
            for name, blob in outputs.items():
                assert fragment not in blob, f"canary fragment {fragment[:6]!r}… found in clear in {name}"
    # The search is real: redacted forms are in the owner's email, and the public sighting too.
    email = b"".join(v for k, v in outputs.items() if k.startswith("email"))
    assert b"sm_CANA" in email and b"member of the public" in email
    assert json.loads(sent[0].content) == {"status": "received"}
