"""The GitHub sandbox over real HTTP: the keys endpoint with its ETag and failure modes, key rotation,
and alerts that arrive signed over their exact bytes."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.sandbox import KEYS_PATH, GitHubSandbox, ServerThread, build_alert

TOKEN = "sm_" + "A" * 22 + "_" + "b" * 64


@pytest.fixture
def github() -> GitHubSandbox:
    return GitHubSandbox()


@pytest.fixture
def client(github: GitHubSandbox) -> Iterator[httpx.Client]:
    with ServerThread(github.app()) as server, httpx.Client(base_url=server.url, timeout=5) as client:
        yield client


def verify(pem: str, body: bytes, signature: str) -> None:
    public_key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(base64.b64decode(signature), body, ec.ECDSA(hashes.SHA256()))


def keys_by_id(client: httpx.Client) -> dict[str, dict[str, object]]:
    return {k["key_identifier"]: k for k in client.get(KEYS_PATH).json()["public_keys"]}


# -- alert bodies and signatures --------------------------------------------------------------------


def test_build_alert_is_compact_json_in_githubs_field_order():
    assert (
        build_alert([TOKEN, "ghp_x"], url="https://github.com/o/r/blob/x/f")
        == (
            f'[{{"token":"{TOKEN}","type":"supermemory_api_key","url":"https://github.com/o/r/blob/x/f",'
            '"source":"content"},{"token":"ghp_x","type":"supermemory_api_key",'
            '"url":"https://github.com/o/r/blob/x/f","source":"content"}]'
        ).encode()
    )
    assert (
        build_alert([TOKEN], url=None, type_="t", source="npm")
        == f'[{{"token":"{TOKEN}","type":"t","source":"npm"}}]'.encode()
    )
    assert json.loads(build_alert([TOKEN], url=""))[0]["url"] == ""
    assert build_alert([], url=None) == b"[]"


def test_sign_verifies_with_the_served_public_key(client, github):
    body = build_alert([TOKEN], url="https://example.test")
    signature = github.sign(body)
    served = keys_by_id(client)
    assert list(served) == [github.key_identifier]
    verify(served[github.key_identifier]["key"], body, signature)
    with pytest.raises(InvalidSignature):
        verify(served[github.key_identifier]["key"], body + b" ", signature)


def test_identifier_defaults_to_sha256_of_the_der_public_key():
    private_key = ec.generate_private_key(ec.SECP256R1())
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert GitHubSandbox(private_key=private_key).key_identifier == hashlib.sha256(der).hexdigest()
    assert GitHubSandbox("custom-id", private_key).key_identifier == "custom-id"
    with pytest.raises(ValueError, match="P-256"):
        GitHubSandbox(private_key=ec.generate_private_key(ec.SECP384R1()))


# -- keys endpoint ----------------------------------------------------------------------------------


def test_keys_endpoint_serves_a_strong_etag_and_honours_if_none_match(client, github):
    first = client.get(KEYS_PATH)
    assert first.status_code == 200
    etag = first.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert first.json()["public_keys"][0]["is_current"] is True

    not_modified = client.get(KEYS_PATH, headers={"If-None-Match": etag})
    assert (not_modified.status_code, not_modified.content, not_modified.headers["ETag"]) == (304, b"", etag)
    assert client.get(KEYS_PATH, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert client.get(KEYS_PATH, headers={"If-None-Match": '"stale"'}).status_code == 200
    assert (github.key_fetches, github.conditional_hits) == (4, 2)

    github.rotate()
    changed = client.get(KEYS_PATH, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag


def test_rotate_keeps_the_old_key_listed_as_not_current(client, github):
    old = github.key_identifier
    new = client.post("/_sandbox/rotate").json()["key_identifier"]
    assert new == github.key_identifier != old
    served = keys_by_id(client)
    assert {i: k["is_current"] for i, k in served.items()} == {old: False, new: True}
    body = build_alert([TOKEN], url=None)
    verify(served[new]["key"], body, github.sign(body))

    newest = client.post("/_sandbox/rotate", json={"keep_old": False}).json()["key_identifier"]
    assert list(keys_by_id(client)) == [newest]
    assert github.rotate(keep_old=False) not in (old, new, newest)
    assert client.post("/_sandbox/rotate", json={"keep_old": "no"}).status_code == 400


def test_replace_key_material_keeps_the_identifier_and_changes_the_key(client, github):
    identifier = github.key_identifier
    body = build_alert([TOKEN], url=None)
    old_signature = github.sign(body)
    old_pem = keys_by_id(client)[identifier]["key"]

    assert client.post("/_sandbox/replace-key-material").json() == {"key_identifier": identifier}
    new_pem = keys_by_id(client)[identifier]["key"]
    assert new_pem != old_pem
    verify(new_pem, body, github.sign(body))
    with pytest.raises(InvalidSignature):
        verify(new_pem, body, old_signature)


@pytest.mark.parametrize(
    ("mode", "status"), [("500", 500), ("429", 429), ("nonjson", 200), ("wrongshape", 200), ("empty", 200)]
)
def test_each_keys_failure_mode(client, github, mode, status):
    response = client.post("/_sandbox/knobs", json={"keys_failure": mode})
    assert response.json() == {"keys_failure": mode}
    response = client.get(KEYS_PATH)
    assert response.status_code == status
    assert "ETag" not in response.headers
    if mode == "429":
        assert response.headers["Retry-After"] == "1"
    if mode == "nonjson":
        with pytest.raises(ValueError):
            response.json()
    if mode == "wrongshape":
        assert all("key" not in entry for entry in response.json()["public_keys"])
    if mode == "empty":
        assert response.json() == {"public_keys": []}

    client.post("/_sandbox/knobs", json={"keys_failure": None})
    assert client.get(KEYS_PATH).status_code == 200
    assert github.key_fetches == 2


def test_keys_failure_hang_makes_the_client_time_out(client, github):
    github.keys_failure = "hang"
    with pytest.raises(httpx.ReadTimeout):
        client.get(KEYS_PATH, timeout=0.3)
    assert github.stats()["key_fetches"] == 1


def test_unknown_keys_failure_mode_is_refused(client, github):
    assert client.post("/_sandbox/knobs", json={"keys_failure": "teapot"}).status_code == 400
    assert client.post("/_sandbox/knobs", json={"other": 1}).status_code == 400
    with pytest.raises(ValueError, match="keys_failure"):
        github.keys_failure = "404"
    assert client.get("/_sandbox/knobs").json() == {"keys_failure": None}


# -- sending alerts ---------------------------------------------------------------------------------


class Receiver:
    """A tiny partner endpoint that records exactly what arrived."""

    def __init__(self, answer: Response) -> None:
        self.answer = answer
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def endpoint(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        return self.answer

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/alerts/github", self.endpoint, methods=["POST"])])


def test_send_alert_delivers_the_exact_signed_bytes(client, github):
    receiver = Receiver(JSONResponse([{"token_hash": "h", "token_type": "t", "label": "true_positive"}]))
    with ServerThread(receiver.app()) as target:
        response = client.post(
            "/_sandbox/send-alert",
            json={
                "target": f"{target.url}/v1/alerts/github",
                "tokens": [TOKEN, "not-a-key"],
                "url": "https://github.com/o/r/blob/main/.env",
                "type": "supermemory_api_key",
                "source": "content",
            },
        )
    assert response.json() == {
        "status": 200,
        "body": [{"token_hash": "h", "token_type": "t", "label": "true_positive"}],
    }
    [(headers, body)] = receiver.requests
    assert body == build_alert([TOKEN, "not-a-key"], url="https://github.com/o/r/blob/main/.env")
    assert headers["github-public-key-identifier"] == github.key_identifier
    assert headers["content-type"] == "application/json"
    verify(keys_by_id(client)[github.key_identifier]["key"], body, headers["github-public-key-signature"])
    assert github.stats()["alerts_sent"] == 1


def test_send_alert_after_rotation_signs_with_the_new_key(client, github):
    old = github.key_identifier
    github.rotate()
    receiver = Receiver(PlainTextResponse("nope", status_code=401))
    with ServerThread(receiver.app()) as target:
        response = client.post(
            "/_sandbox/send-alert", json={"target": f"{target.url}/v1/alerts/github", "tokens": [TOKEN]}
        )
    assert response.json() == {"status": 401, "body": "nope"}
    [(headers, body)] = receiver.requests
    assert headers["github-public-key-identifier"] == github.key_identifier != old
    assert json.loads(body) == [{"token": TOKEN, "type": "supermemory_api_key", "source": "content"}]


def test_send_alert_reports_bad_requests_and_unreachable_targets(client):
    assert client.post("/_sandbox/send-alert", json={"target": "ftp://x", "tokens": []}).status_code == 400
    assert client.post("/_sandbox/send-alert", json={"target": "http://x", "tokens": "t"}).status_code == 400
    assert client.post("/_sandbox/send-alert", json=[]).status_code == 400
    with ServerThread(Starlette()) as gone:
        url = gone.url
    response = client.post("/_sandbox/send-alert", json={"target": url, "tokens": [TOKEN]})
    assert response.status_code == 502
    assert TOKEN not in response.text


def test_stats_endpoint(client, github):
    client.get(KEYS_PATH)
    assert client.get("/_sandbox/stats").json() == {
        "key_fetches": 1,
        "conditional_hits": 0,
        "alerts_sent": 0,
        "keys_failure": None,
        "key_identifier": github.key_identifier,
        "key_identifiers": [github.key_identifier],
    }
