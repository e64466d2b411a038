"""A big alert is committed in parts (Worker.accept): a small alert is answered between two of them
rather than after the whole big one, and a process killed between two parts loses nothing, the
sender's redelivery of the same body finishing the alert. On SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

import httpx
import pytest

from service.pipeline.worker import INTAKE_PART
from service.sandbox import build_alert, seeded_keys
from tests.harness import Sandbox, Service, postgres_env, wait_until

pytestmark = pytest.mark.integration

URL = "https://github.com/octocat/big/blob/main/dump.txt"


@pytest.fixture(params=["sqlite", "postgres"])
def start(request, sandbox: Sandbox, make_service, tmp_path) -> Callable[[], Service]:
    """Starts the service on the backend (again in the same place, after a kill)."""
    env: dict[str, str] = {"LEAK_RESPONDER_LOG_LEVEL": "INFO"}
    if request.param == "postgres":
        env = postgres_env(sandbox, request.getfixturevalue("pg_url"))
        assert Service(tmp_path, env).cli("migrate").returncode == 0
    return lambda: make_service(env, workdir=tmp_path)


def fresh_tokens(count: int) -> list[str]:
    """Key-shaped tokens that are no key: each one is looked up, then labelled a false positive."""
    return [f"sm_big{i:06d}{secrets.token_hex(12)}" for i in range(count)]


def send(service: Service, sandbox: Sandbox, body: bytes, done: list[tuple[str, httpx.Response]], name: str):
    """Posts `body` in a thread of its own (its own client), appending (name, response) when answered."""

    def post() -> None:
        with httpx.Client(timeout=120) as client:
            headers = {
                "Github-Public-Key-Identifier": sandbox.github.key_identifier,
                "Github-Public-Key-Signature": sandbox.github.sign(body),
                "Content-Type": "application/json",
            }
            try:
                done.append(
                    (name, client.post(f"{service.url}/v1/alerts/github", content=body, headers=headers))
                )
            except httpx.TransportError:
                pass  # the process was killed under it

    thread = threading.Thread(target=post)
    thread.start()
    return thread


@pytest.mark.timeout(180)
def test_a_small_alert_is_answered_between_the_parts_of_a_big_one(sandbox, start):
    service = start()
    # Each lookup call takes 100 ms, so the big alert's 80 calls outlast one part's commit by far.
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 100})
    big_tokens = fresh_tokens(8 * INTAKE_PART)
    small_token = f"sm_small{secrets.token_hex(16)}"
    done: list[tuple[str, httpx.Response]] = []
    big = send(service, sandbox, build_alert(big_tokens, url=URL), done, "big")
    # The first part of the big alert is committed (visible to another connection): until the
    # whole alert was one transaction, this moment was the end of its work, its answer imminent.
    wait_until(lambda: service.count("incidents") > 0, timeout=60, interval=0.01)
    small = send(service, sandbox, build_alert([small_token], url=URL), done, "small")
    small.join(60)
    big.join(120)
    assert [name for name, _ in done] == ["small", "big"]
    answers = {name: response for name, response in done}
    assert answers["small"].status_code == 200 and [a["label"] for a in answers["small"].json()] == [
        "false_positive"
    ]
    assert answers["big"].status_code == 200
    assert len(answers["big"].json()) == len(big_tokens)
    assert service.count("incidents") == len(big_tokens) + 1
    assert service.count("alerts") == 2


@pytest.mark.timeout(240)
def test_killed_between_parts_then_redelivered_one_alert_each_key_revoked_once(sandbox, start):
    keys = seeded_keys(6, seed="big-parts")
    sandbox.supermemory.add_keys(keys)
    filler = fresh_tokens(3 * INTAKE_PART - len(keys))
    # Three keys in the first part, three in the last.
    tokens = [k.token for k in keys[:3]] + filler + [k.token for k in keys[3:]]
    body = build_alert(tokens, url=URL)
    service = start()
    # Slow lookups: the second part is still being looked up when the first has committed.
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 400})
    done: list[tuple[str, httpx.Response]] = []
    sender = send(service, sandbox, body, done, "big")
    wait_until(lambda: service.count("incidents") > 0, timeout=60, interval=0.01)
    service.kill()
    sender.join(30)
    assert done == [], "no answer before the whole alert is committed"
    # Exactly the first part, whole, with the alert's record: a half-written alert.
    assert service.count("incidents") == INTAKE_PART
    assert service.count("sightings") == INTAKE_PART
    assert service.count("alerts") == 1

    # The sender got no 2xx, so it redelivers the same body to the restarted service.
    sandbox.supermemory.set_knobs(latency_ms={})
    restarted = start()
    first = restarted.post_alert(sandbox.github, [], body=body, timeout=120)
    assert first.status_code == 200
    labels = {a["token_hash"]: a["label"] for a in first.json()}
    assert len(labels) == len(tokens)
    assert sorted(labels.values()).count("true_positive") == len(keys)
    for key in keys:
        restarted.wait_state(key.token, "confirmed", timeout=60)
    assert sandbox.supermemory.stats()["effective_revokes"] == {k.id: 1 for k in keys}
    assert restarted.count("incidents") == len(tokens)
    assert restarted.count("sightings") == len(tokens)
    with restarted.db() as conn:
        alerts = conn.execute("SELECT count(*), max(new_incidents) FROM alerts").fetchone()
        assert (alerts[0], alerts[1]) == (1, len(tokens))
        received = conn.execute("SELECT count(*) FROM events WHERE kind = 'received'").fetchone()[0]
    assert received == len(tokens), "each token received once, across the crash"

    # Labels stay as they were on a further redelivery.
    again = restarted.post_alert(sandbox.github, [], body=body, timeout=120)
    assert {a["token_hash"]: a["label"] for a in again.json()} == labels
    assert restarted.count("alerts") == 1


@pytest.mark.timeout(180)
def test_a_big_alert_whose_parts_are_looked_up_at_once_is_one_alert(sandbox, start):
    """Parts go to the store as soon as their lookups answer, two at a time after the first: each
    finds the alert's record the first part created, none creates another or misses it."""
    service = start()
    tokens = fresh_tokens(4 * INTAKE_PART)
    answer = service.post_alert(sandbox.github, [], body=build_alert(tokens, url=URL), timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    assert [a["label"] for a in answer.json()] == ["false_positive"] * len(tokens)
    assert service.count("incidents") == service.count("sightings") == len(tokens)
    with service.db() as conn:
        alerts = conn.execute("SELECT count(*), max(new_incidents) FROM alerts").fetchone()
    assert (alerts[0], alerts[1]) == (1, len(tokens))
