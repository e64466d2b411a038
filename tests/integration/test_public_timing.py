"""No oracle in time: a public report's answer takes as long whether the text held nothing, a
key-shaped string that is no key, a revoked key or a live one.

One comparison of two timings proves nothing on a shared machine, so this sends many reports of each
kind, interleaved in a fresh random order every round (a burst of load from elsewhere lands on all
kinds alike), and compares the kinds pairwise with a rank test (Mann-Whitney U). A pair fails only
when the difference is both significant and large: the probability that a report of one kind takes
longer than one of the other must stay within 0.5 ± 0.2. Waiting for the lookup (here made 50 ms
slow) would put that probability near 1; a commit made for some kinds and not others, near 0.9.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from itertools import combinations

import pytest

from service.sandbox import seeded_keys
from tests.integration.public_helpers import assert_received, public

pytestmark = pytest.mark.integration

ROUNDS = 120
WARM_UP = 20
MAX_EFFECT = 0.2
# |z| beyond this is significant; with the effect bound it makes a false alarm rarer than 1 in 10^4.
Z_SIGNIFICANT = 3.29


def mann_whitney(x: list[float], y: list[float]) -> tuple[float, float]:
    """(A, z): A = P(X > Y) + P(X = Y) / 2 from the U statistic, and U's normal approximation with
    the tie correction."""
    ranked = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(ranked)
    ties = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    n1, n2 = len(x), len(y)
    r1 = sum(r for r, (_, group) in zip(ranks, ranked, strict=True) if group == 0)
    u = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    return u / (n1 * n2), (u - n1 * n2 / 2) / sigma


def test_the_rank_test_tells_equal_from_shifted():
    """Guards the statistics: the same distribution passes, a 20% shift does not."""
    rng = random.Random(7)
    same = [rng.lognormvariate(0, 0.3) for _ in range(240)]
    a, z = mann_whitney(same[:120], same[120:])
    assert abs(a - 0.5) < MAX_EFFECT and abs(z) < Z_SIGNIFICANT
    shifted = [v * 1.2 for v in same[120:]]
    a, z = mann_whitney(shifted, same[:120])
    assert a - 0.5 > MAX_EFFECT and z > Z_SIGNIFICANT


@pytest.mark.timeout(300)
def test_the_answer_takes_as_long_whatever_the_report_held(sandbox, make_service):
    live_keys = seeded_keys(ROUNDS, seed="timing")
    sandbox.supermemory.add_keys(live_keys)
    # A lookup the answer waited for would add these 50 ms to keys (live or not) and not to text.
    sandbox.supermemory.set_knobs(latency_ms={"lookup": 50})
    service = make_service(
        {
            "LEAK_RESPONDER_PUBLIC_RATE": "100000/minute",
            "LEAK_RESPONDER_PUBLIC_GLOBAL_RATE": "100000/minute",
            "LEAK_RESPONDER_LOG_LEVEL": "WARNING",
        }
    )
    revoked = sandbox.tokens[0]
    service.post_alert(sandbox.github, [revoked])
    service.wait_state(revoked, "confirmed")

    def filler() -> str:
        # As long as a key, never one: no `sm_` in it.
        return "zz_" + secrets.token_hex(11)[:22] + "_" + secrets.token_hex(32)

    def unknown() -> str:
        return f"sm_{secrets.token_hex(11)[:22]}_{secrets.token_hex(32)}"

    live = iter(k.token for k in live_keys)
    kinds = {
        "nothing": filler,
        "unknown": unknown,
        "revoked": lambda: revoked,
        "live": lambda: next(live),
    }
    for _ in range(WARM_UP):
        assert_received(public(service, f"SUPERMEMORY_API_KEY={filler()}\n"))

    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(ROUNDS):
        order = list(kinds)
        random.shuffle(order)
        for kind in order:
            body = f"SUPERMEMORY_API_KEY={kinds[kind]()}\n"
            started = time.perf_counter()
            response = public(service, body)
            times[kind].append(time.perf_counter() - started)
            assert_received(response)

    verdicts = {}
    for one, other in combinations(kinds, 2):
        a, z = mann_whitney(times[one], times[other])
        verdicts[f"{one} vs {other}"] = (round(a, 3), round(z, 2))
    medians = {k: round(sorted(v)[len(v) // 2] * 1000, 2) for k, v in times.items()}
    different = {
        pair: (a, z)
        for pair, (a, z) in verdicts.items()
        if abs(a - 0.5) > MAX_EFFECT and abs(z) > Z_SIGNIFICANT
    }
    assert not different, f"answer time depends on what was sent: {different}; medians (ms) {medians}"
    # The test is real: the live keys it sent were found and are being revoked behind the answers.
    service.wait_state(live_keys[0].token, "confirmed", timeout=30)
