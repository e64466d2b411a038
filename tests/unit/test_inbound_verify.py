import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from starlette.datastructures import Headers

from service.inbound import (
    InboundError,
    KeyCache,
    reporters,
    signed_by,
    verify_signature,
)
from service.inbound.reasons import STATUS
from service.reasons import Reason

VECTOR = json.loads((Path(__file__).parent.parent / "data" / "github-partner-example.json").read_text())
PAYLOAD: bytes = VECTOR["payload"].encode("utf-8")
SIGNATURE: str = VECTOR["signature"]
KEY = serialization.load_pem_public_key(VECTOR["key"].encode())
ENABLED = reporters("https://keys.example/github", None, "https://keys.example/depsdev")
GITHUB, DEPSDEV = ENABLED["github"], ENABLED["depsdev"]


def _flip_one_char(signature: str) -> str:
    # Change a character in the middle (inside r or s), keeping it valid base64.
    middle = len(signature) // 2
    replacement = "A" if signature[middle] != "A" else "B"
    return signature[:middle] + replacement + signature[middle + 1 :]


def test_github_example_verifies():
    verify_signature(KEY, PAYLOAD, SIGNATURE)


def _other_key_signature() -> str:
    other = ec.generate_private_key(ec.SECP256R1())
    return base64.b64encode(other.sign(PAYLOAD, ec.ECDSA(hashes.SHA256()))).decode()


@pytest.mark.parametrize(
    ("body", "signature", "reason"),
    [
        pytest.param(PAYLOAD + b"\n", SIGNATURE, Reason.SIGNATURE_INVALID, id="trailing-newline"),
        pytest.param(
            json.dumps(json.loads(PAYLOAD)).encode(),
            SIGNATURE,
            Reason.SIGNATURE_INVALID,
            id="reserialised",
        ),
        pytest.param(PAYLOAD, _flip_one_char(SIGNATURE), Reason.SIGNATURE_INVALID, id="one-char-changed"),
        pytest.param(PAYLOAD, _other_key_signature(), Reason.SIGNATURE_INVALID, id="other-key"),
        pytest.param(PAYLOAD, "not base64 at all!", Reason.SIGNATURE_MALFORMED, id="not-base64"),
        pytest.param(PAYLOAD, SIGNATURE[:-1], Reason.SIGNATURE_MALFORMED, id="bad-padding"),
        pytest.param(PAYLOAD, "é" * 8, Reason.SIGNATURE_MALFORMED, id="non-ascii"),
        pytest.param(
            PAYLOAD,
            base64.b64encode(b"junk, not DER").decode(),
            Reason.SIGNATURE_MALFORMED,
            id="not-der",
        ),
        pytest.param(PAYLOAD, "", Reason.SIGNATURE_MALFORMED, id="empty"),
    ],
)
def test_tampering_is_refused(body: bytes, signature: str, reason: Reason):
    with pytest.raises(InboundError) as caught:
        verify_signature(KEY, body, signature)
    assert caught.value.reason is reason
    assert caught.value.status == 401


def test_reserialised_body_really_differs():
    # Guards the test above: if json.dumps happened to reproduce the bytes, it would prove nothing.
    assert json.dumps(json.loads(PAYLOAD)).encode() != PAYLOAD


def _keys_client() -> httpx.AsyncClient:
    def handler(request: httpx.Request) -> httpx.Response:
        entry = {"key_identifier": VECTOR["key_identifier"], "key": VECTOR["key"], "is_current": True}
        return httpx.Response(200, json={"public_keys": [entry]})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def _verify(headers, body: bytes = PAYLOAD, reporter=GITHUB) -> None:
    async def run() -> None:
        async with _keys_client() as client:
            (await signed_by(reporter, KeyCache(reporter, client), headers)).verify(body)

    asyncio.run(run())


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            Headers(
                headers={
                    "GITHUB-PUBLIC-KEY-IDENTIFIER": VECTOR["key_identifier"],
                    "github-public-key-signature": SIGNATURE,
                }
            ),
            id="starlette-mixed-case",
        ),
        pytest.param(
            {
                "github-public-key-identifier": VECTOR["key_identifier"],
                "GITHUB-PUBLIC-KEY-SIGNATURE": SIGNATURE,
            },
            id="plain-dict-other-case",
        ),
        pytest.param(
            {
                GITHUB.header_pairs[0].identifier: VECTOR["key_identifier"],
                GITHUB.header_pairs[0].signature: SIGNATURE,
            },
            id="canonical",
        ),
    ],
)
def test_verify_request_accepts_any_header_case(headers):
    _verify(headers)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Github-Public-Key-Signature": SIGNATURE}, id="no-identifier"),
        pytest.param({"Github-Public-Key-Identifier": VECTOR["key_identifier"]}, id="no-signature"),
        pytest.param(
            {"Github-Public-Key-Identifier": "", "Github-Public-Key-Signature": SIGNATURE},
            id="empty-identifier",
        ),
        pytest.param(
            {
                "GOSST-Public-Key-Identifier": VECTOR["key_identifier"],
                "GOSST-Public-Key-Signature": SIGNATURE,
            },
            id="other-reporters-headers",
        ),
    ],
)
def test_verify_request_missing_header(headers):
    with pytest.raises(InboundError) as caught:
        _verify(headers)
    assert caught.value.reason is Reason.SIGNATURE_MISSING
    assert caught.value.status == 401


def test_verify_request_unknown_identifier():
    headers = {"Github-Public-Key-Identifier": "not-a-key", "Github-Public-Key-Signature": SIGNATURE}
    with pytest.raises(InboundError) as caught:
        _verify(headers)
    assert caught.value.reason is Reason.KEY_UNKNOWN
    assert caught.value.status == 401


def test_verify_request_tampered_body():
    headers = {
        "Github-Public-Key-Identifier": VECTOR["key_identifier"],
        "Github-Public-Key-Signature": SIGNATURE,
    }
    with pytest.raises(InboundError) as caught:
        _verify(headers, PAYLOAD + b" ")
    assert caught.value.reason is Reason.SIGNATURE_INVALID


def test_reporters_are_data():
    enabled = reporters("https://gh", "", "https://dd")
    assert set(enabled) == {"github", "depsdev"}
    assert [(p.identifier, p.signature) for p in enabled["github"].header_pairs] == [
        ("Github-Public-Key-Identifier", "Github-Public-Key-Signature")
    ]
    assert [(p.identifier, p.signature) for p in enabled["depsdev"].header_pairs] == [
        ("DepsDev-Public-Key-Identifier", "DepsDev-Public-Key-Signature"),
        ("GOSST-Public-Key-Identifier", "GOSST-Public-Key-Signature"),
    ]
    gitlab = reporters(None, "https://gl", None)
    assert list(gitlab) == ["gitlab"]
    assert gitlab["gitlab"].header_pairs[0].signature == "Gitlab-Public-Key-Signature"
    assert reporters(None, None, None) == {}


@pytest.mark.parametrize("prefix", ["DepsDev", "GOSST", "depsdev", "gosst"])
def test_depsdev_verifies_under_either_pair(prefix):
    _verify(
        {
            f"{prefix}-Public-Key-Identifier": VECTOR["key_identifier"],
            f"{prefix}-Public-Key-Signature": SIGNATURE,
        },
        reporter=DEPSDEV,
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="neither"),
        pytest.param(
            {
                "Github-Public-Key-Identifier": VECTOR["key_identifier"],
                "Github-Public-Key-Signature": SIGNATURE,
            },
            id="githubs-pair",
        ),
        pytest.param(
            {
                "DepsDev-Public-Key-Identifier": VECTOR["key_identifier"],
                "GOSST-Public-Key-Signature": SIGNATURE,
            },
            id="half-of-each",
        ),
    ],
)
def test_depsdev_without_a_whole_pair_is_refused(headers):
    with pytest.raises(InboundError) as caught:
        _verify(headers, reporter=DEPSDEV)
    assert caught.value.reason is Reason.SIGNATURE_MISSING
    assert "DepsDev-Public-Key-Identifier" in caught.value.message
    assert "GOSST-Public-Key-Identifier" in caught.value.message


def test_depsdev_takes_the_first_whole_pair():
    """Both pairs present: the DepsDev pair is the one checked, so a broken GOSST pair beside a good
    DepsDev pair still verifies, and a broken DepsDev pair is refused whatever GOSST holds."""
    good = {
        "DepsDev-Public-Key-Identifier": VECTOR["key_identifier"],
        "DepsDev-Public-Key-Signature": SIGNATURE,
    }
    bad_gosst = {"GOSST-Public-Key-Identifier": "nope", "GOSST-Public-Key-Signature": "nope"}
    _verify({**good, **bad_gosst}, reporter=DEPSDEV)
    bad = {**good, "DepsDev-Public-Key-Signature": _flip_one_char(SIGNATURE)}
    good_gosst = {
        "GOSST-Public-Key-Identifier": VECTOR["key_identifier"],
        "GOSST-Public-Key-Signature": SIGNATURE,
    }
    with pytest.raises(InboundError) as caught:
        _verify({**bad, **good_gosst}, reporter=DEPSDEV)
    assert caught.value.reason is Reason.SIGNATURE_INVALID


def test_every_reason_has_one_status():
    for reason in STATUS:
        assert InboundError(reason, "x").status in {400, 401, 413, 503}
    assert InboundError(Reason.KEYS_UNAVAILABLE, "x").status == 503
    assert InboundError(Reason.BODY_TOO_LARGE, "x").status == 413
    assert InboundError(Reason.BODY_EMPTY, "x").status == 400
    error = InboundError(Reason.KEY_UNKNOWN, "unknown public key identifier")
    assert str(error) == "unknown public key identifier"
    assert error.reason == "key_unknown"


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def test_a_high_s_signature_verifies_as_documented():
    """ECDSA's (r, s) and (r, n - s) both verify. We accept both, on purpose (see Claim.verify): the
    signature is never an identity, a replay is recognised by the body's hash (docs/architecture.md).
    This pins the behaviour so that a change to it is a decision, not an accident."""
    private = ec.generate_private_key(ec.SECP256R1())
    body = b'[{"token":"x","type":"t"}]'
    r, s = decode_dss_signature(private.sign(body, ec.ECDSA(hashes.SHA256())))
    low, high = sorted((s, P256_ORDER - s))
    for value in (low, high):
        signature = base64.b64encode(encode_dss_signature(r, value)).decode()
        verify_signature(private.public_key(), body, signature)
    forged = base64.b64encode(encode_dss_signature(r, (high + 1) % P256_ORDER)).decode()
    with pytest.raises(InboundError) as caught:
        verify_signature(private.public_key(), body, forged)
    assert caught.value.reason is Reason.SIGNATURE_INVALID
