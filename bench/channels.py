"""Alert to webhook event received and verified (issue 10): from the signed alert's send to the
moment a real receiver on loopback (the sandbox's) has the event and the reference Standard Webhooks
package accepts its signature, with the sandbox adding 20 ms to every Supermemory call.

For one key: p50 of the `matched` event (baseline: the lookup's 20 ms) and of the `confirmed` event
(baseline: lookup, revoke and probe, 60 ms). For 1,000 keys of 50 orgs with a webhook each, sent as
one alert, whose revokes do not take until every key is unconfirmed (then its re-probe's re-revoke
does), so that every key goes matched → revoked → unconfirmed → confirmed: the first and last
event's arrival, and the check that each key's channel got exactly its 4 events, once each.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook

from service.sandbox import ChannelReceiver, SandboxKey, ServerThread, channel_secret, seeded_keys
from tests.harness import Sandbox, Service, SmtpSink, wait_until

_ORGS = 50
_STATES = ("matched", "revoked", "unconfirmed", "confirmed")


def _org_keys(keys: list[SandboxKey], orgs: int, base: str, label: str) -> list[SandboxKey]:
    for i, key in enumerate(keys):
        org = f"org_{label}_{i % orgs}"
        key.org_id = org
        key.channels = [
            {
                "id": f"wh_{org}",
                "type": "webhook",
                "url": f"{base}/hooks/{org}",
                "secret": channel_secret(label, org),
            }
        ]
    return keys


def _events(receiver: ChannelReceiver, secrets: dict[str, str]) -> list[tuple[float, str, dict[str, Any]]]:
    """(arrival, webhook-id, event) of every 2xx delivery, each verified by the reference package."""
    found = []
    for r in receiver.received():
        if r.status == 200:
            event = Webhook(secrets[r.path]).verify(r.body, r.headers)
            found.append((r.at, r.headers["webhook-id"], event))
    return found


def run(runs: int = 10, tokens: int = 1000) -> dict[str, Any]:
    receiver = ChannelReceiver()
    with (
        Sandbox(keys=0) as sandbox,
        SmtpSink() as smtp,
        ServerThread(receiver.app()) as hooks,
        tempfile.TemporaryDirectory() as tmp,
    ):
        sandbox.supermemory.set_knobs(latency_ms={"all": 20})
        service = Service(
            Path(tmp),
            {
                **sandbox.env(),
                **smtp.env(),
                "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
                "LEAK_RESPONDER_CHANNEL_ALLOWED_NETWORKS": "127.0.0.1/32",
                "LEAK_RESPONDER_PROBE_SCHEDULE": "0,0.5",
                "LEAK_RESPONDER_UNCONFIRMED_REPROBE_INTERVAL": "2",
                "LEAK_RESPONDER_NOTIFY_GROUP_WAIT": "1",
                "LEAK_RESPONDER_LEASE_SECONDS": "30",
                "LEAK_RESPONDER_HTTP_TIMEOUT": "5",
            },
        ).start()
        secrets: dict[str, str] = {}
        try:
            matched, confirmed = [], []
            for key in _org_keys(seeded_keys(runs, seed="bench-channels-single"), runs, hooks.url, "single"):
                path = f"/hooks/{key.org_id}"
                secrets[path] = key.channels[0]["secret"]
                receiver.add_secret(path, secrets[path])
                sandbox.supermemory.add_keys([key])
                sent = time.time()
                service.post_alert(sandbox.github, [key.token])
                wait_until(lambda p=path: len(receiver.received(p)) == 3, interval=0.002)
                arrivals = {
                    e["type"].rsplit(".", 1)[1]: at
                    for at, _, e in _events(receiver, secrets)
                    if e["subject"] == key.id
                }
                matched.append(arrivals["matched"] - sent)
                confirmed.append(arrivals["confirmed"] - sent)

            many = _org_keys(seeded_keys(tokens, seed="bench-channels-many"), _ORGS, hooks.url, "many")
            for key in many:
                path = f"/hooks/{key.org_id}"
                secrets[path] = key.channels[0]["secret"]
                receiver.add_secret(path, secrets[path])
            sandbox.supermemory.add_keys(many)
            # Revokes that do not take until every key is unconfirmed; then its re-probe's re-revoke
            # takes, and the next re-probe confirms it: 4 states, 4 events per key.
            sandbox.supermemory.set_knobs(never_revoke=True)
            before = len(receiver.received())
            sent = time.time()
            service.post_alert(sandbox.github, [k.token for k in many], timeout=60)
            wait_until(lambda: len(receiver.received()) - before >= tokens * 3, timeout=600, interval=0.1)
            three_waves = time.time() - sent
            sandbox.supermemory.set_knobs(never_revoke=False)
            wait_until(lambda: len(receiver.received()) - before >= tokens * 4, timeout=600, interval=0.1)
            time.sleep(2.0)  # anything sent twice would arrive now
            events = [e for e in _events(receiver, secrets) if e[2]["subject"] in {k.id for k in many}]
        finally:
            service.stop()
    per_key = Counter((e["subject"], e["type"].rsplit(".", 1)[1]) for _, _, e in events)
    exact = (
        all(per_key[(k.id, s)] == 1 for k in many for s in _STATES) and sum(per_key.values()) == tokens * 4
    )
    arrivals = sorted(at - sent for at, _, _ in events)
    return {
        "single_matched_p50_ms": round(1000 * statistics.median(matched), 1),
        "single_matched_baseline_ms": 20,
        "single_confirmed_p50_ms": round(1000 * statistics.median(confirmed), 1),
        "single_confirmed_max_ms": round(1000 * max(confirmed), 1),
        "single_confirmed_baseline_ms": 60,
        "thousand_first_event_s": round(arrivals[0], 2),
        "thousand_last_event_s": round(arrivals[-1], 2),
        "thousand_unconfirmed_wave_done_s": round(three_waves, 2),
        "thousand_events": len(events),
        "thousand_distinct_event_ids": len({i for _, i, _ in events}),
        "thousand_exactly_4_per_key": exact,
        "thousand_orgs": _ORGS,
    }


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name:>30}: {value}")
