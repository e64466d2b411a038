"""Logs and metrics, and the one function through which every failure is reported.

An operator debugging a page reads a log line, looks at a dashboard and greps the tests for the same
reason code; `failure()` is what keeps those three in step, because it is the only way the code
reports a failure: it writes the log line and counts the metric in one call.

The log filter also redacts anything shaped like a Supermemory key, wherever it hides (message,
arguments, extra fields, exception text). It is the net under the rule, not the rule: no code
passes a raw token to a logger in the first place.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service.reasons import Reason
from service.tokens import scrub

if TYPE_CHECKING:
    # A hint only: the store reports its own failures through this module, so it cannot be imported.
    from service.store.models import StoreStats

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

FAILURES = Counter(
    "leak_responder_failures_total",
    "Failures an operator may see, by stage and reason code.",
    ["stage", "reason"],
)
ALERTS = Counter(
    "leak_responder_alerts_total",
    "Partner alerts and manual reports by reporter and outcome.",
    ["reporter", "outcome"],
)
PUBLIC_REPORTS = Counter(
    "leak_responder_public_reports_total",
    "Public reports by outcome: received, or the reason code they were refused with.",
    ["outcome"],
)
PUBLIC_KEYS = Counter(
    "leak_responder_public_keys_found_total", "Distinct keys found in public reports that were received."
)
TRANSITIONS = Counter(
    "leak_responder_transitions_total", "Incident state transitions by new state.", ["state"]
)
SUPERMEMORY_CALLS = Counter(
    "leak_responder_supermemory_calls_total", "Supermemory calls by call and outcome.", ["call", "outcome"]
)
PAGES = Counter("leak_responder_pages_total", "On-call pages raised, by event.", ["event"])
PAGES_REPEATED = Counter(
    "leak_responder_pages_repeated_total",
    "Pages not sent because their condition was paged within the repeat window, by event.",
    ["event"],
)
PAGES_WAITING = Gauge(
    "leak_responder_pages_waiting",
    "Pages raised but not yet taken by Sentry (queued, or retried while Sentry does not take them).",
)
BODY_BYTES = Gauge(
    "leak_responder_body_bytes_reserved",
    "Bytes reserved by request bodies being received, all requests together (see BodyBudget).",
)
EVENTS_DROPPED = Counter(
    "leak_responder_sentry_events_dropped_total",
    "Sentry events other than pages dropped because errors came faster than their budget.",
)
TIME_TO_REVOKE = Histogram(
    "leak_responder_time_to_revoke_seconds",
    "From alert received to revoke acknowledged.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
TIME_TO_CONFIRM = Histogram(
    "leak_responder_time_to_confirm_seconds",
    "From alert received to the probe's 401.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)


@functools.cache
def counter(metric: Counter, *values: str) -> Counter:
    """`metric`'s child for these label values (in the order of its label names), made once.

    `labels()` checks and joins its arguments and takes a lock on every call, a microsecond and a
    half, paid several times per alert on the ack path. The parent keeps its children for the
    process's life anyway; only bounded label values (reporters enabled here, reason codes, states,
    our own outcomes) come here."""
    return metric.labels(*values)


class _Snapshot:
    """A collector that hands out families computed once per scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def exposition(stats: StoreStats, key_caches: Mapping[str, Mapping[str, int]]) -> bytes:
    """The process's metrics plus those read at scrape time: the store's counts (shared by every
    replica) and each reporter's key-cache counters. No label ever holds a token or a hash."""
    incidents = GaugeMetricFamily("leak_responder_incidents", "Incidents by state.", labels=["state"])
    for state, count in sorted(stats.incidents_by_state.items()):
        incidents.add_metric([state], count)
    families: list[Metric] = [
        incidents,
        GaugeMetricFamily(
            "leak_responder_pending_work", "Incidents not yet in a final state.", value=stats.pending
        ),
        GaugeMetricFamily(
            "leak_responder_oldest_pending_seconds",
            "Age of the oldest incident not yet in a final state; grows while the pipeline is stuck.",
            value=stats.oldest_pending_age,
        ),
        GaugeMetricFamily(
            "leak_responder_due_work", "Incidents whose next step is due now.", value=stats.due
        ),
    ]
    for counter in ("hits", "misses", "fetches", "fetch_failures"):
        family = CounterMetricFamily(
            f"leak_responder_key_cache_{counter}", f"Verification-key cache {counter}.", labels=["reporter"]
        )
        for reporter, counts in sorted(key_caches.items()):
            family.add_metric([reporter], counts[counter])
        families.append(family)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(families))
    return generate_latest() + generate_latest(snapshot)


def failure(
    logger: logging.Logger,
    stage: str,
    reason: Reason,
    message: str,
    *,
    level: int = logging.WARNING,
    exc_info: BaseException | None = None,
    context: Mapping[str, Any] | None = None,
    **fields: Any,
) -> None:
    """Report a failure: one log line carrying `reason`, and the failures counter by stage and reason.

    `exc_info` is the logger's own argument, not an extra field: a LogRecord refuses extras that
    shadow its attributes, and the line would be lost with the traceback it was meant to carry.
    `context` carries fields gathered in a mapping (tags, request details) beside the keyword ones.
    """
    FAILURES.labels(stage=stage, reason=str(reason)).inc()
    logger.log(
        level,
        message,
        exc_info=exc_info,
        extra={"reason": str(reason), "stage": stage, **(context or {}), **fields},
    )


class ScrubFilter(logging.Filter):
    """Renders each record's message once, redacted, so no formatter ever sees the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, scrub(value))
        return True


# Record attributes that are not ours to print; uvicorn's color_message duplicates the message.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        entry.update(_extras(record))
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{record.levelname:<7} {record.name}: {record.getMessage()}" + (
            f" [{extras}]" if extras else ""
        )
        return line + (f"\n{record.exc_text}" if record.exc_text else "")


def _extras(record: logging.LogRecord) -> Mapping[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def configure_logging(level: str, fmt: str) -> None:
    """JSON lines to stdout for machines, text for a person at a terminal (`make run`)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
