"""Alert to email received (issue 3): from the signed alert's send to the moment a real SMTP server
(aiosmtpd on loopback) has the owner's message, with the sandbox adding 20 ms to every Supermemory
call, for one token and for one 1,000-token alert whose keys belong to 50 owners.

The baseline is the three Supermemory calls' own 60 ms; the 1,000-token figure also says how many
emails arrived, which must be 50 (one per owner, listing that owner's 20 keys).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from service.sandbox import SandboxKey, seeded_keys
from tests.harness import Sandbox, Service, SmtpSink, wait_until

_OWNERS = 50


def _owned(keys: list[SandboxKey], owners: int, label: str) -> list[SandboxKey]:
    return [
        dataclasses.replace(k, owner_email=f"{label}{i % owners}@example.test", notify=[])
        for i, k in enumerate(keys)
    ]


def run(runs: int = 10, tokens: int = 1000) -> dict[str, Any]:
    with Sandbox(keys=0) as sandbox, SmtpSink() as smtp, tempfile.TemporaryDirectory() as tmp:
        sandbox.supermemory.set_knobs(latency_ms={"all": 20})
        service = Service(
            Path(tmp),
            {
                **sandbox.env(),
                **smtp.env(),
                "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
                "LEAK_RESPONDER_PROBE_SCHEDULE": "0,2,5,15",
                "LEAK_RESPONDER_LEASE_SECONDS": "30",
                "LEAK_RESPONDER_HTTP_TIMEOUT": "5",
            },
        ).start()
        try:
            singles = []
            for key in _owned(seeded_keys(runs, seed="bench-notify-single"), runs, "single"):
                sandbox.supermemory.add_keys([key])
                sent = time.time()
                service.post_alert(sandbox.github, [key.token])
                (message,) = wait_until(lambda k=key: smtp.to(k.owner_email), interval=0.005)
                singles.append(message.received_at - sent)
            many = _owned(seeded_keys(tokens, seed="bench-notify-many"), _OWNERS, "many")
            sandbox.supermemory.add_keys(many)
            before = len(smtp.received())
            sent = time.time()
            service.post_alert(sandbox.github, [k.token for k in many], timeout=60)
            wait_until(
                lambda: (
                    {a for m in smtp.received()[before:] for a in m.rcpt_tos} >= {k.owner_email for k in many}
                ),
                timeout=180,
                interval=0.02,
            )
            time.sleep(1.0)  # anything sent twice would arrive now
            emails = smtp.received()[before:]
        finally:
            service.stop()
    arrivals = sorted(m.received_at - sent for m in emails)
    return {
        "single_p50_ms": round(1000 * statistics.median(singles), 1),
        "single_max_ms": round(1000 * max(singles), 1),
        "single_baseline_ms": 60,
        "thousand_first_email_s": round(arrivals[0], 2),
        "thousand_last_email_s": round(arrivals[-1], 2),
        "thousand_emails": len(emails),
        "thousand_owners": _OWNERS,
    }


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name:>24}: {value}")
