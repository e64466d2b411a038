"""Poison strings over real HTTP: lone surrogates (JSON's `\\ud800`) in every string field of every
input path, fuzzed with hypothesis, and keys hidden in the strings around a token.

JSON lets a sender write a lone surrogate; Python carries it until an encoder (SQLite, PostgreSQL,
the JSON answer) refuses it. Each example sends one real sandbox key beside the poison, so a poison
that turned the request into a 500 would also leave a real key unrevoked, on every redelivery.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.tokens import token_hash
from tests.harness import Sandbox, Service
from tests.integration.operator_helpers import auth, operator_env, report

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text with at least one lone surrogate somewhere in it.
plain = st.text(st.characters(exclude_characters="\x00"), max_size=8)
poison = st.builds(lambda a, s, b: f"{a}{s}{b}", plain, st.characters(categories=["Cs"]), plain)


def surrogates(value: Any) -> list[str]:
    """Every string (keys included) of a parsed JSON value that holds a lone surrogate."""
    if isinstance(value, str):
        return [value] if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in surrogates(k) + surrogates(v)]
    if isinstance(value, list):
        return [s for v in value for s in surrogates(v)]
    return []


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[Sandbox, Service]]:
    """One service for every example: a fresh process per example would make the fuzzing too slow."""
    with Sandbox() as sandbox:
        # Public reports' rates high enough for every example.
        rates = {
            "LEAK_RESPONDER_PUBLIC_RATE": "1000/minute",
            "LEAK_RESPONDER_PUBLIC_GLOBAL_RATE": "1000/minute",
        }
        service = Service(
            tmp_path_factory.mktemp("poison"), {**sandbox.env(), **operator_env(), **rates}
        ).start()
        yield sandbox, service
        service.stop()


def shown(service: Service, token: str) -> dict[str, Any]:
    """The incident of `token` as the operator API shows it: a 200 holding no lone surrogate."""
    incident = service.incident(token)
    assert incident is not None
    response = httpx.get(f"{service.url}/v1/incidents/{incident['id']}", headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    assert surrogates(response.json()) == []
    return response.json()


@FUZZ
@given(field=st.sampled_from(["token", "type", "url", "source"]), junk=poison)
def test_surrogates_in_any_alert_field_keep_the_real_key(world, field, junk):
    sandbox, service = world
    key = sandbox.tokens[0]
    item = {
        "token": "not-a-key-but-long-enough-to-show",
        "type": "generic",
        "url": "https://x",
        "source": "c",
    }
    # A token long enough that its redacted form shows its first and last characters.
    item[field] = f"{junk}{'x' * 20}{junk}" if field == "token" else junk
    body = json.dumps([{"token": key, "type": "supermemory_api_key"}, item]).encode()
    response = service.post_alert(sandbox.github, [], body=body)
    assert response.status_code == 200, response.text
    assert surrogates(response.json()) == []
    labels = {entry["token_hash"]: entry["label"] for entry in response.json()}
    assert labels[token_hash(key)] == "true_positive"
    shown(service, item["token"])


def _report_body(path: str, key: str, junk: str) -> tuple[str, str]:
    """(body, content type) of a report of kind and field `path` carrying `junk` and `key`."""
    gitleaks = {"RuleID": "generic", "File": "a.env", "Link": "https://l", "Secret": key, "Match": key}
    trufflehog: dict[str, Any] = {"SourceMetadata": {"Data": {"Git": {"file": "b", "link": "https://l"}}}}
    trufflehog["Raw"] = key
    kind, _, field = path.partition(".")
    if kind == "text":
        document: Any = {"text": f"{junk} {key} {junk}" if field == "text" else key}
    elif kind == "tokens":
        document = {"tokens": [key, junk] if field == "tokens" else [key]}
    elif kind == "gitleaks":
        document = [gitleaks | {field: junk if field in ("File", "Link", "RuleID") else f"{junk} {key}"}]
    else:
        where = trufflehog["SourceMetadata"]["Data"]["Git"]
        if field == "Raw":
            trufflehog["Raw"] = f"{junk} {key}"
        else:
            where[field] = junk
        return json.dumps(trufflehog), "application/x-ndjson"
    if field in ("url", "note"):
        document[field] = junk
    return json.dumps(document), "application/json"


REPORT_PATHS = [
    "text.text",
    "text.url",
    "text.note",
    "tokens.tokens",
    "tokens.url",
    "tokens.note",
    "gitleaks.File",
    "gitleaks.Link",
    "gitleaks.RuleID",
    "gitleaks.Secret",
    "trufflehog.file",
    "trufflehog.link",
    "trufflehog.Raw",
]


@FUZZ
@given(path=st.sampled_from(REPORT_PATHS), junk=poison)
def test_surrogates_in_any_report_field_keep_the_real_key(world, path, junk):
    sandbox, service = world
    key = sandbox.tokens[1]
    body, content_type = _report_body(path, key, junk)
    response = report(service, body, content_type=content_type)
    assert response.status_code == 200, response.text
    assert surrogates(response.json()) == []
    found = {f["token_hash"]: f for f in response.json()["findings"]}
    assert found[token_hash(key)]["label"] == "true_positive"
    shown(service, key)


def test_a_key_inside_the_strings_around_a_token_is_kept_and_shown_redacted(world):
    """A leaked key often sits in the URL of the file it leaked in; that URL must not keep it."""
    sandbox, service = world
    key = sandbox.tokens[2]
    url = f"https://github.com/o/r/blob/main/.env?key={key}"
    body = json.dumps([{"token": key, "type": "supermemory_api_key", "url": url, "source": key}]).encode()
    assert service.post_alert(sandbox.github, [], body=body).status_code == 200
    gitleaks = [{"RuleID": "g", "File": f"leak/{key}.env", "Link": url, "Secret": key, "Match": key}]
    answer = report(service, json.dumps(gitleaks))
    assert answer.status_code == 200, answer.text
    assert key not in answer.text
    assert answer.json()["findings"][0]["file"].startswith("leak/sm_")
    detail = shown(service, key)
    assert key not in json.dumps(detail)
    urls = {s["url"] for s in detail["sightings"]}
    assert f"https://github.com/o/r/blob/main/.env?key={key[:7]}…{key[-4:]}" in urls
    with service.db() as conn:
        rows = [tuple(r) for r in conn.execute("SELECT url, source FROM sightings")]
    assert rows and not any(key in str(row) for row in rows)


@FUZZ
@given(field=st.sampled_from(["text", "url"]), junk=poison)
def test_surrogates_in_a_public_report_keep_the_real_key(world, field, junk):
    sandbox, service = world
    key = sandbox.tokens[3]
    document = {
        "text": f"{junk} {key} {junk}" if field == "text" else key,
        "url": junk if field == "url" else None,
    }
    body = json.dumps(document).encode()  # ASCII: the surrogate travels as JSON's escape
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{service.url}/v1/public/reports", content=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    shown(service, key)
