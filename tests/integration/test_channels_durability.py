"""Each event once per channel and state: through a SIGKILL with events waiting (none lost, none
doubled), through a SIGKILL mid-send (sent again under the same id, logged as uncertain), and with
two replicas on one PostgreSQL database sending from the same outbox."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from service.sandbox import ChannelReceiver, ServerThread, build_alert, seeded_keys
from tests.harness import Service, postgres_env, wait_until
from tests.integration.channel_helpers import ALLOW_LOOPBACK

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver() -> Iterator[tuple[ChannelReceiver, str]]:
    rc = ChannelReceiver()
    with ServerThread(rc.app()) as server:
        yield rc, server.url


def with_org_channels(sandbox, rc: ChannelReceiver, base: str, count: int, seed: str):
    keys = seeded_keys(count, seed=seed, receiver=base)
    sandbox.supermemory.add_keys(keys)
    for key in keys:
        for channel in key.channels:
            if channel["type"] == "webhook":
                rc.add_secret(channel["url"].removeprefix(base), channel["secret"])
    return keys


def delivered(rc: ChannelReceiver) -> Counter[tuple[str, str]]:
    """(path, event id) of every delivery the receiver answered 2xx; Slack messages by their text."""
    found: Counter[tuple[str, str]] = Counter()
    for r in rc.received():
        if r.status == 200:
            found[(r.path, r.headers.get("webhook-id") or r.json["blocks"][-1]["elements"][0]["text"])] += 1
    return found


def test_events_waiting_at_a_kill_go_out_once_after_the_restart(sandbox, make_service, receiver):
    rc, base = receiver
    keys = with_org_channels(sandbox, rc, base, 4, "restart")
    paths = {c["url"].removeprefix(base) for k in keys for c in k.channels}
    for path in paths:
        rc.behave(path, status=503)
    service = make_service(ALLOW_LOOPBACK)
    service.post_alert(sandbox.github, [k.token for k in keys])
    for key in keys:
        service.wait_state(key.token, "confirmed")
    wait_until(lambda: {r.path for r in rc.received()} == paths)
    service.kill()
    for path in paths:
        rc.behave(path, status=200)
    restarted = make_service(ALLOW_LOOPBACK)

    # 4 keys of 2 orgs, each org with a webhook and a Slack channel: 3 events per key per channel.
    wait_until(lambda: sum(delivered(rc).values()) == 4 * 2 * 3, timeout=30)
    assert set(delivered(rc).values()) == {1}, "no event delivered twice"

    def statuses() -> list[tuple[str, int]]:
        with restarted.db() as conn:
            rows = conn.execute("SELECT status, count(*) FROM channel_events GROUP BY status").fetchall()
        return [tuple(r) for r in rows]

    # The receiver answers before the service records the outcome: the rows follow.
    wait_until(lambda: statuses() == [("sent", 24)])


def test_a_kill_mid_send_sends_again_under_the_same_id(sandbox, make_service, receiver):
    rc, base = receiver
    (key,) = with_org_channels(sandbox, rc, base, 1, "midsend")
    hook = next(c["url"].removeprefix(base) for c in key.channels if c["type"] == "webhook")
    rc.behave(hook, delay=30.0)
    service = make_service(ALLOW_LOOPBACK)
    service.post_alert(sandbox.github, [key.token])
    wait_until(lambda: rc.received(hook))
    service.kill()  # the receiver has the event; the service never learned that it did
    rc.behave(hook, delay=0.0)
    restarted = make_service(ALLOW_LOOPBACK)
    restarted.wait_state(key.token, "confirmed")
    wait_until(lambda: len({r.headers["webhook-id"] for r in rc.received(hook)}) == 3, timeout=30)
    ids = [r.headers["webhook-id"] for r in rc.received(hook)]
    assert ids[0] == ids[1], "the uncertain event went again with its id, for the receiver to dedupe"
    assert Counter(ids).most_common(1)[0][1] == 2 and sorted(Counter(ids).values()) == [1, 1, 2]
    # The Slack channel's event may have been in flight at the kill too: only the webhook's is known.
    lines = restarted.logged("resend_unknown_outcome")
    (line,) = [r for r in lines if r["channel_type"] == "webhook"]
    assert (line["stage"], line["event_state"]) == ("channels", "matched")
    assert restarted.failures("channels", "resend_unknown_outcome") == len(lines)


@pytest.mark.timeout(300)
def test_two_replicas_send_each_event_once(sandbox, make_service, receiver, pg_url, tmp_path):
    rc, base = receiver
    keys = with_org_channels(sandbox, rc, base, 60, "replicas")
    env = {**postgres_env(sandbox, pg_url), **ALLOW_LOOPBACK}
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(make_service(env, workdir=tmp_path / name))
    body = build_alert([k.token for k in keys], url="https://github.com/octocat/leak/blob/main/.env")
    senders = [
        threading.Thread(target=lambda r=r: r.post_alert(sandbox.github, [], body=body, timeout=60))
        for r in replicas
    ]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    # 60 keys of 30 orgs, a webhook and a Slack channel each: 3 events per key per channel.
    wait_until(lambda: sum(delivered(rc).values()) >= 60 * 2 * 3, timeout=120, interval=0.5)
    assert sum(delivered(rc).values()) == 60 * 2 * 3
    assert set(delivered(rc).values()) == {1}
    logs = [
        r
        for replica in replicas
        for r in replica.log_records()
        if r.get("message") == "channel event delivered"
    ]
    assert len(logs) == 360
    assert all(
        any(r.get("message") == "channel event delivered" for r in x.log_records()) for x in replicas
    ), "both replicas sent"
