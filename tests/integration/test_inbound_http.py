"""The partner endpoint over real HTTP: signatures, keys, bodies and status codes (docs/contract.md §4).

Every refusal is checked three ways: the status, the reason code in the body and the log, and that
nothing was stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.sandbox import ServerThread, build_alert
from service.tokens import token_hash
from tests.harness import wait_until

pytestmark = pytest.mark.integration

VECTOR = json.loads((Path(__file__).parent.parent / "data" / "github-partner-example.json").read_text())


@pytest.fixture
def github_example_keys():
    """GitHub's published test key, served the way GitHub serves its keys."""
    document = {
        "public_keys": [
            {"key_identifier": VECTOR["key_identifier"], "key": VECTOR["key"], "is_current": False},
        ]
    }
    app = Starlette(routes=[Route("/keys", lambda request: JSONResponse(document))])
    with ServerThread(app) as server:
        yield f"{server.url}/keys"


def post_raw(service, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{service.url}/v1/alerts/github", content=body, headers=headers, timeout=30)


def assert_refused(service, response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason
    assert service.count("alerts") == 0 and service.count("incidents") == 0
    wait_until(lambda: any(r.get("reason") == reason for r in service.log_records()))


def test_githubs_documented_example_verifies(make_service, github_example_keys):
    service = make_service({"LEAK_RESPONDER_GITHUB_KEYS_URL": github_example_keys})
    headers = {
        "Github-Public-Key-Identifier": VECTOR["key_identifier"],
        "Github-Public-Key-Signature": VECTOR["signature"],
    }
    response = post_raw(service, VECTOR["payload"].encode(), headers)
    assert response.status_code == 200
    assert response.json() == [
        {
            "token_hash": token_hash("NMIfyYncKcRALEXAMPLE"),
            "token_type": "mycompany_api_token",
            "label": "false_positive",
        }
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("trailing-newline", "signature_invalid"),
        ("reserialised", "signature_invalid"),
        ("signature-char", "signature_invalid"),
        ("not-base64", "signature_malformed"),
        ("missing-signature", "signature_missing"),
        ("missing-identifier", "signature_missing"),
        ("unknown-identifier", "key_unknown"),
    ],
)
def test_tampered_example_is_401(make_service, github_example_keys, change, reason):
    service = make_service({"LEAK_RESPONDER_GITHUB_KEYS_URL": github_example_keys})
    body = VECTOR["payload"].encode()
    headers = {
        "Github-Public-Key-Identifier": VECTOR["key_identifier"],
        "Github-Public-Key-Signature": VECTOR["signature"],
    }
    if change == "trailing-newline":
        body += b"\n"
    elif change == "reserialised":
        body = json.dumps(json.loads(body)).encode()
    elif change == "signature-char":
        sig = VECTOR["signature"]
        headers["Github-Public-Key-Signature"] = sig[:20] + ("A" if sig[20] != "A" else "B") + sig[21:]
    elif change == "not-base64":
        headers["Github-Public-Key-Signature"] = "not base64!!"
    elif change == "missing-signature":
        del headers["Github-Public-Key-Signature"]
    elif change == "missing-identifier":
        del headers["Github-Public-Key-Identifier"]
    elif change == "unknown-identifier":
        headers["Github-Public-Key-Identifier"] = "f" * 64
    assert_refused(service, post_raw(service, body, headers), 401, reason)


def test_signature_from_another_key_is_401(sandbox, service):
    from service.sandbox import GitHubSandbox

    impostor = GitHubSandbox(key_identifier=sandbox.github.key_identifier)
    body = build_alert([sandbox.tokens[0]], url=None)
    headers = {
        "Github-Public-Key-Identifier": sandbox.github.key_identifier,
        "Github-Public-Key-Signature": impostor.sign(body),
    }
    assert_refused(service, post_raw(service, body, headers), 401, "signature_invalid")


def test_mixed_case_header_names(sandbox, service):
    body = build_alert([sandbox.tokens[0]], url="")
    headers = {
        "GITHUB-PUBLIC-KEY-IDENTIFIER": sandbox.github.key_identifier,
        "github-public-key-signature": sandbox.github.sign(body),
    }
    response = post_raw(service, body, headers)
    assert response.status_code == 200
    assert response.json()[0]["label"] == "true_positive"


def test_rotated_key_is_fetched_once(sandbox, service):
    service.post_alert(sandbox.github, ["warm-up"])
    fetches = sandbox.github.key_fetches
    sandbox.github.rotate()
    for _ in range(3):
        assert service.post_alert(sandbox.github, ["after-rotation"]).status_code == 200
    assert sandbox.github.key_fetches == fetches + 1


def test_no_keys_ever_is_503_and_pages(sandbox, make_service):
    sandbox.github.keys_failure = "500"
    service = make_service()
    body = build_alert([sandbox.tokens[0]], url=None)
    response = service.post_alert(sandbox.github, [], body=body)
    assert_refused(service, response, 503, "keys_unavailable")
    wait_until(lambda: any(r.get("reason") == "reporter_keys_unavailable" for r in service.log_records()))


def test_keys_endpoint_failing_later_keeps_the_last_good_keys(sandbox, make_service):
    service = make_service({"LEAK_RESPONDER_KEYS_REFRESH_INTERVAL": "0.2"})
    assert service.post_alert(sandbox.github, ["first"]).status_code == 200
    sandbox.github.keys_failure = "nonjson"
    wait_until(lambda: any(r.get("reason") == "keys_bad_response" for r in service.log_records()))
    assert service.post_alert(sandbox.github, ["second"]).status_code == 200


BAD_BODIES = {
    "not-json": (b"{nope", "body_not_json"),
    "not-a-list": (b'{"token": "x", "type": "t"}', "body_not_list"),
    "empty-list": (b"[]", "body_empty"),
    "item-not-object": (b'["sm_aaaaaaaaaaaaaaaaaaaaaaaa"]', "item_not_object"),
    "missing-token": (b'[{"type": "supermemory_api_key"}]', "item_missing_token"),
    "missing-type": (b'[{"token": "sm_aaaaaaaaaaaaaaaaaaaaaaaa"}]', "item_missing_type"),
    "type-not-string": (b'[{"token": "sm_aaaaaaaaaaaaaaaaaaaaaaaa", "type": 7}]', "item_bad_field"),
    "one-bad-among-good": (
        b'[{"token": "sm_aaaaaaaaaaaaaaaaaaaaaaaa", "type": "t"}, {"token": 5, "type": "t"}]',
        "item_bad_field",
    ),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_malformed_body_is_400_and_stores_nothing(sandbox, service, case):
    body, reason = BAD_BODIES[case]
    assert_refused(service, service.post_alert(sandbox.github, [], body=body), 400, reason)
    assert sandbox.supermemory.stats()["calls"]["lookup"] == 0


def test_unknown_type_is_routed_by_shape(sandbox, service):
    token = sandbox.tokens[0]
    body = json.dumps(
        [
            {"token": token, "type": "openai_api_key", "url": "https://x.test/a", "source": "Content"},
            {"token": "plainly-not-a-key", "type": "whatever"},
            # A type is the sender's text: the answer escapes it as JSON does.
            {"token": "another-non-key", "type": 'a "quoted" \\ type, été ✓'},
        ]
    ).encode()
    response = service.post_alert(sandbox.github, [], body=body)
    assert response.status_code == 200
    assert [(e["token_type"], e["label"]) for e in response.json()] == [
        ("openai_api_key", "true_positive"),
        ("whatever", "false_positive"),
        ('a "quoted" \\ type, été ✓', "false_positive"),
    ]
    assert response.headers["content-type"] == "application/json"
    assert response.content == json.dumps(response.json(), ensure_ascii=False, separators=(",", ":")).encode()
    service.wait_state(token, "confirmed")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413(sandbox, make_service, chunked):
    service = make_service({"LEAK_RESPONDER_BODY_LIMIT": "4096"})
    body = build_alert(["x" * 100] * 60, url=None)
    assert len(body) > 4096
    headers = {
        "Github-Public-Key-Identifier": sandbox.github.key_identifier,
        "Github-Public-Key-Signature": sandbox.github.sign(body),
    }
    # A chunked body declares no length at all: the limit must hold while reading.
    content = (body[i : i + 1000] for i in range(0, len(body), 1000)) if chunked else body
    response = httpx.post(f"{service.url}/v1/alerts/github", content=content, headers=headers, timeout=30)
    assert_refused(service, response, 413, "body_too_large")


def test_disabled_reporter_is_404(sandbox, service):
    response = httpx.post(f"{service.url}/v1/alerts/gitlab", content=b"[]", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"] == "reporter_disabled"


def test_store_that_cannot_commit_is_503_then_redelivery_succeeds(sandbox, service):
    """A real write failure of the real store (a trigger makes SQLite abort the insert): the alert is
    refused with 503 so GitHub redelivers, nothing half-written stays behind, and the redelivery works."""
    token = sandbox.tokens[0]
    import sqlite3

    with sqlite3.connect(service.db_path) as conn:
        conn.execute(
            "CREATE TRIGGER fail_alerts BEFORE INSERT ON alerts BEGIN SELECT RAISE(ABORT, 'simulated'); END"
        )
    response = service.post_alert(sandbox.github, [token])
    assert response.status_code == 503
    assert response.json()["error"] == "store_unavailable"
    assert service.count("incidents") == 0 and service.count("sightings") == 0
    with sqlite3.connect(service.db_path) as conn:
        conn.execute("DROP TRIGGER fail_alerts")
    assert service.post_alert(sandbox.github, [token]).json()[0]["label"] == "true_positive"
    service.wait_state(token, "confirmed")


@pytest.mark.parametrize(
    ("reporter", "prefix"),
    [("gitlab", "Gitlab"), ("depsdev", "GOSST"), ("depsdev", "DepsDev")],
    ids=["gitlab", "depsdev-GOSST", "depsdev-DepsDev"],
)
def test_other_partners_use_their_own_headers(sandbox, make_service, reporter, prefix):
    """GitLab and deps.dev send GitHub's format under their own header names and keys URLs; deps.dev
    under either of two spellings (RubyGems and crates.io read `DepsDev-…`, PyPI reads `GOSST-…`)."""
    service = make_service({f"LEAK_RESPONDER_{reporter.upper()}_KEYS_URL": sandbox.keys_url})
    token = sandbox.tokens[0]
    body = build_alert([token], url="https://gitlab.example/leak")
    signed = {
        f"{prefix}-Public-Key-Identifier": sandbox.github.key_identifier,
        f"{prefix}-Public-Key-Signature": sandbox.github.sign(body),
    }
    response = httpx.post(f"{service.url}/v1/alerts/{reporter}", content=body, headers=signed, timeout=30)
    assert response.json() == [
        {"token_hash": token_hash(token), "token_type": "supermemory_api_key", "label": "true_positive"}
    ]
    service.wait_state(token, "confirmed")
    with service.db() as conn:
        assert [r[0] for r in conn.execute("SELECT reporter FROM sightings")] == [reporter]
    # GitHub's header names are not this reporter's: refused as unsigned.
    github_headers = {k.replace(prefix, "Github"): v for k, v in signed.items()}
    refused = httpx.post(
        f"{service.url}/v1/alerts/{reporter}", content=body, headers=github_headers, timeout=30
    )
    assert refused.status_code == 401 and refused.json()["error"] == "signature_missing"


def test_depsdev_with_neither_pair_is_401(sandbox, make_service):
    """A request signed under neither of deps.dev's pairs, or under half of each, is unsigned."""
    service = make_service({"LEAK_RESPONDER_DEPSDEV_KEYS_URL": sandbox.keys_url})
    body = build_alert([sandbox.tokens[0]], url=None)
    identifier, signature = sandbox.github.key_identifier, sandbox.github.sign(body)
    for headers in (
        {},
        {"DepsDev-Public-Key-Identifier": identifier, "GOSST-Public-Key-Signature": signature},
        {"GOSST-Public-Key-Identifier": identifier, "DepsDev-Public-Key-Signature": signature},
    ):
        response = httpx.post(f"{service.url}/v1/alerts/depsdev", content=body, headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"] == "signature_missing"
    assert service.count("alerts") == 0 and service.count("incidents") == 0


@pytest.fixture
def gitlab():
    """GitLab's keys endpoint: the sandbox's signer under a 40-hex key identifier, as GitLab's are."""
    from service.sandbox import GitHubSandbox

    signer = GitHubSandbox(key_identifier="3f786850e387550fdab836ed7e6dc881de23001b")
    with ServerThread(signer.app()) as server:
        yield signer, f"{server.url}/meta/public_keys/secret_scanning"


def test_gitlabs_shape_is_a_normal_alert(sandbox, make_service, gitlab):
    """GitLab's items carry no `source` and a raw-file URL, signed under a 40-hex identifier: each of
    those is normal, so the alert is labelled and the key revoked like any other."""
    signer, keys_url = gitlab
    service = make_service({"LEAK_RESPONDER_GITLAB_KEYS_URL": keys_url})
    token = sandbox.tokens[0]
    raw_url = "https://gitlab.com/acme/app/-/raw/9f2c1e0b7a3d4c5e6f708192a3b4c5d6e7f80912/config/.env"
    body = json.dumps([{"token": token, "type": "supermemory_api_key", "url": raw_url}]).encode()
    headers = {
        "Gitlab-Public-Key-Identifier": signer.key_identifier,
        "Gitlab-Public-Key-Signature": signer.sign(body),
    }
    response = httpx.post(f"{service.url}/v1/alerts/gitlab", content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == [
        {"token_hash": token_hash(token), "token_type": "supermemory_api_key", "label": "true_positive"}
    ]
    service.wait_state(token, "confirmed")
    with service.db() as conn:
        row = conn.execute("SELECT reporter, url, source FROM sightings").fetchone()
    assert (row[0], row[1], row[2]) == ("gitlab", raw_url, None)


def test_a_key_published_just_after_a_junk_refetch_is_retry_later_not_401(sandbox, service):
    """A stranger's junk identifier spends the once-a-minute refetch; GitHub rotates a second later
    and signs a genuine alert with the new key. A 401 would lose it (GitHub does not retry a 4xx)."""
    body = build_alert([sandbox.tokens[0]], url=None)
    junk = {"Github-Public-Key-Identifier": "junk", "Github-Public-Key-Signature": sandbox.github.sign(body)}
    assert_refused(service, post_raw(service, body, junk), 401, "key_unknown")
    sandbox.github.rotate()
    response = service.post_alert(sandbox.github, [], body=body)
    assert response.status_code == 503
    assert response.json()["error"] == "key_not_yet_fetched"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert service.count("alerts") == 0
    assert service.failures("inbound", "key_not_yet_fetched") == 1
