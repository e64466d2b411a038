"""The console's incident list against the operator API for the same query (issue 12), with 100,000
incidents in the store: how much more a rendered page costs than the JSON of the same rows.

The store is filled through the store's own intake and transitions (SQLite, before the service
starts), with arrivals spread over 7 days: most incidents confirmed, some closed and false
positives (states the worker leaves alone, so it stays idle while we measure), reported by github
or by hand, across 500 orgs. Then `wrk` (Debian's package) asks
each URL with one connection for a few seconds, the API and the console alternating over rounds,
best round of each kept; the page's latency and throughput are given as ratios to the API's.

- first page: `GET /v1/incidents` vs `GET /console/incidents` (50 rows, newest first);
- filtered: both with `state=closed&reporter=github` (a state's index and the sightings);
- rows: the page's self-refresh (`?rows=1`, the table's rows only) vs the same API call.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.store import AlertRecord, Sealer, State, TokenSighting, Transition
from service.store.sqlite import SqliteStore
from tests.harness import Sandbox, Service
from tests.integration.console_helpers import ConsoleClient
from tests.integration.operator_helpers import TOKENS, operator_env

WEEK = 7 * 24 * 3600.0
FILTER = "state=closed&reporter=github"


async def _fill(path: Path, key: bytes, incidents: int, batch: int = 1000) -> None:
    """`incidents` incidents in batches of one alert each, arrival times spread over the last week."""
    now = time.time()
    clock = [now]
    store = SqliteStore(path, Sealer(key), clock=lambda: clock[0])
    await store.open()
    try:
        for start in range(0, incidents, batch):
            clock[0] = now - WEEK + WEEK * start / incidents
            reporter = "github" if start % (2 * batch) == 0 else "manual"
            items = [
                TokenSighting(
                    f"sm_{secrets.token_hex(20)}" if (start + i) % 33 else f"fp-{secrets.token_hex(8)}",
                    "supermemory_api_key",
                    f"https://github.com/o/r/blob/main/f{start + i}.env",
                    "content",
                    reporter,
                )
                for i in range(batch)
            ]
            refs = await store.intake(AlertRecord(reporter, secrets.token_hex(32), batch), items, 0)
            at = clock[0]
            transitions = []
            for n, ref in enumerate(refs):
                if ref.state is not State.RECEIVED:
                    continue
                end, done = (
                    (State.CLOSED, {"revoked_at": at + 0.04, "confirmed_at": at + 0.09, "closed_at": at + 1})
                    if n % 20 == 0
                    else (State.CONFIRMED, {"revoked_at": at + 0.03 + n % 7 / 100, "confirmed_at": at + 0.08})
                )
                values = {"label": "true_positive", "key_id": f"key_{n}", "org_id": f"org_{n % 500}"}
                transitions.append(
                    Transition(
                        ref.id, State.RECEIVED, str(end), state=end, set={**values, **done, "matched_at": at}
                    )
                )
            await store.apply(transitions)
    finally:
        await store.close()


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _wrk(url: str, headers: dict[str, str], seconds: int) -> dict[str, float]:
    command = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    latency = {}
    for quantile in ("50", "99"):
        value, unit = re.search(rf"\s{quantile}%\s+([0-9.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        latency[quantile] = float(value) * _UNITS[unit] * 1000
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert non_2xx is None, f"{url}: {non_2xx.group(0)}"
    return {"rps": rps, "p50_ms": latency["50"], "p99_ms": latency["99"]}


def run(incidents: int = 100_000, seconds: int = 5, rounds: int = 3) -> dict[str, Any]:
    key = os.urandom(32)
    results: dict[str, Any] = {"incidents": incidents, "seconds_per_round": seconds, "rounds": rounds}
    with Sandbox() as sandbox, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        asyncio.run(_fill(Path(tmp) / "leak-responder.db", key, incidents))
        results["fill_seconds"] = time.perf_counter() - started
        env = {
            **sandbox.env(),
            **operator_env(),
            "LEAK_RESPONDER_DATA_KEY": base64.b64encode(key).decode(),
            "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
        }
        service = Service(Path(tmp), env).start()
        try:
            console = ConsoleClient(service)
            assert console.sign_in().status_code == 303
            cookie = {"Cookie": f"leak_responder_console={console.http.cookies['leak_responder_console']}"}
            bearer = {"Authorization": f"Bearer {TOKENS['alice']}"}
            api = f"{service.url}/v1/incidents"
            page = f"{service.url}/console/incidents"
            pairs = {
                "first_page": ((api, bearer), (page, cookie)),
                "filtered": ((f"{api}?{FILTER}", bearer), (f"{page}?{FILTER}", cookie)),
                "rows": ((api, bearer), (f"{page}?rows=1", cookie)),
            }
            # The pages hold what they say: 50 rows, and the filter's rows only.
            shown = httpx.get(f"{api}?{FILTER}", headers=bearer).json()["incidents"]
            assert len(shown) == 50 and {i["state"] for i in shown} == {"closed"}
            assert console.get(f"/console/incidents?{FILTER}").text.count("<tr class=") == 50
            for name, (baseline, candidate) in pairs.items():
                best: dict[str, dict[str, float]] = {}
                for _ in range(rounds):
                    for side, (url, headers) in (("api", baseline), ("console", candidate)):
                        figures = _wrk(url, headers, seconds)
                        if side not in best or figures["rps"] > best[side]["rps"]:
                            best[side] = figures
                results[name] = {
                    **best,
                    "p50_ratio": best["console"]["p50_ms"] / best["api"]["p50_ms"],
                    "rps_ratio": best["console"]["rps"] / best["api"]["rps"],
                }
        finally:
            service.stop()
    return results
