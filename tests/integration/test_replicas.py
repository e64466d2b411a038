"""Several replicas on one PostgreSQL database: one alert of 1,000 keys sent to two processes at
once, one of them killed with SIGKILL midway; the other finishes, each key is revoked once and each
recipient told of each of its keys once."""

from __future__ import annotations

import threading

import httpx
import pytest

from service.sandbox import build_alert, seeded_keys
from service.tokens import redact
from tests.harness import Service, postgres_env, wait_until

pytestmark = pytest.mark.integration

KEYS = 1000


def test_a_replica_refuses_to_start_until_migrated_then_is_ready(sandbox, make_service, pg_url, tmp_path):
    env = postgres_env(sandbox, pg_url)
    refused = Service(tmp_path, env).cli("serve", "--port", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, "one line"
    assert "0001_initial" in refused.stderr and "leak-responder migrate" in refused.stderr

    migrated = Service(tmp_path, env).cli("migrate")
    assert migrated.returncode == 0 and "0001_initial" in migrated.stdout, migrated.stderr
    again = Service(tmp_path, env).cli("migrate")
    assert again.returncode == 0 and "no migration pending" in again.stdout

    service = make_service(env)
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready == {"status": "ok", "checks": {"worker": True, "store": True, "migrations": True}}


@pytest.mark.timeout(420)
def test_two_replicas_one_killed_midway_each_key_revoked_and_told_once(
    sandbox, make_service, smtp, pg_url, tmp_path
):
    keys = seeded_keys(KEYS, seed="replicas")
    sandbox.supermemory.add_keys(keys)
    env = {**postgres_env(sandbox, pg_url), **smtp.env(), "LEAK_RESPONDER_NOTIFY_GROUP_WAIT": "1"}
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(make_service(env, workdir=tmp_path / name))
    doomed, survivor = replicas

    # SMTP stays down until the kill: a process killed between SMTP's acceptance and its commit may
    # send one message twice (the outbox's documented at-least-once window), and this test is about
    # replicas, so it keeps that window shut and asserts no duplicates at all.
    smtp.stop()
    # Revokes take a while, so that the kill lands with work in flight on both replicas.
    sandbox.supermemory.set_knobs(latency_ms={"revoke": 100})
    body = build_alert([k.token for k in keys], url="https://github.com/octocat/leak/blob/main/.env")
    answers: dict[str, int] = {}

    def send(service: Service) -> None:
        answers[service.url] = service.post_alert(sandbox.github, [], body=body, timeout=60).status_code

    senders = [threading.Thread(target=send, args=(r,)) for r in replicas]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    assert list(answers.values()) == [200, 200]

    wait_until(lambda: len(sandbox.supermemory.stats()["effective_revokes"]) >= 100, timeout=60)
    doomed.kill()
    revoked_at_kill = len(sandbox.supermemory.stats()["effective_revokes"])
    assert revoked_at_kill < KEYS, "the kill must land midway"
    smtp.start()

    wait_until(lambda: survivor.count_state("closed") == KEYS, timeout=300, interval=0.5)
    assert survivor.count("incidents") == KEYS
    assert sandbox.supermemory.stats()["effective_revokes"] == {k.id: 1 for k in keys}
    with survivor.db() as conn:
        revoked_events = conn.execute(
            "SELECT count(*), count(DISTINCT incident_id) FROM events WHERE kind = 'revoked'"
        ).fetchone()
        assert revoked_events[0] == revoked_events[1] == KEYS
    for replica in replicas:
        assert any(r.get("message") == "incident revoked" for r in replica.log_records()), "both worked"

    expected: dict[str, list[str]] = {}
    for k in keys:
        for address in dict.fromkeys(a.lower() for a in [k.owner_email, *k.notify]):
            expected.setdefault(address, []).append(redact(k.token))
    received = smtp.received()
    assert {a for m in received for a in m.rcpt_tos} == set(expected)
    for address, redacted in expected.items():
        bodies = [m.part("plain") for m in received if address in m.rcpt_tos]
        assert len(bodies) <= len(redacted)
        for form in redacted:
            assert sum(form in b for b in bodies) == 1, f"{address} told of {form} once"


def test_the_harness_reads_postgres_like_sqlite(sandbox, pg_url, tmp_path):
    """The integration helpers (`db()`, `incident()`, `state()`) run unchanged on PostgreSQL."""
    service = Service(tmp_path, postgres_env(sandbox, pg_url))
    assert service.cli("migrate").returncode == 0
    assert service.count("incidents") == 0
    assert service.incident("sm_" + "x" * 30) is None
    with service.db() as conn:
        row = conn.execute("SELECT ? AS a, 2 AS b", ("one",)).fetchone()
        assert (row[0], row["b"], dict(row)) == ("one", 2, {"a": "one", "b": 2})


def test_two_replicas_share_the_public_rate_and_keep_no_address(sandbox, make_service, pg_url, tmp_path):
    """The per-client rate is one limit across replicas: a client alternating between two processes
    gets no more than the limit in all. Their shared table names clients only by keyed hashes."""
    from tests.integration.public_helpers import assert_received, public

    env = {
        **postgres_env(sandbox, pg_url),
        "LEAK_RESPONDER_PUBLIC_RATE": "4/minute",
        "LEAK_RESPONDER_TRUSTED_PROXIES": "127.0.0.0/8",
    }
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(make_service(env, workdir=tmp_path / name))
    one, two = replicas
    for replica in (one, two, one, two):
        assert_received(public(replica, "nothing", client="198.51.100.7"))
    for replica in (one, two):
        refused = public(replica, "nothing", client="198.51.100.7")
        assert refused.status_code == 429 and refused.json()["error"] == "public_rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 15
    # Another client has its own bucket, on either replica.
    assert_received(public(two, f"a key {sandbox.tokens[0]}", client="198.51.100.8"))
    one.wait_state(sandbox.tokens[0], "confirmed")

    with one.db() as conn:
        keys = [r[0] for r in conn.execute("SELECT key FROM rate_buckets ORDER BY key")]
        dump = " ".join(str(tuple(r)) for table in ("alerts", "sightings", "events", "rate_buckets")
                        for r in conn.execute(f"SELECT * FROM {table}"))  # fmt: skip
    assert len(keys) == 3 and "global" in keys
    assert all(k == "global" or (k.startswith("client:") and len(k) == 39) for k in keys)
    assert "198.51.100" not in dump and "127.0.0.1" not in dump
