"""Paging on-call: the events that mean a human must act, with fixed codes and levels.

The pipeline raises a page through `Pager.page`; what carries it (the log and the pages metric, and
Sentry when SENTRY_DSN is set) is this module's business, and it never blocks or fails the caller: a
responder that stalls because its pager is down would turn one outage into two. Pages wait for
Sentry in a queue of their own (`PageCourier`), so a burst of them is never dropped, a Sentry that
is briefly down or refusing gets them once it is back, and one that is down or hanging costs the
pipeline nothing.

Nothing secret may reach Sentry (contract.md §8). The SDK is initialised without request bodies, local
variables or default PII, and every event and breadcrumb goes through `scrub_event`, which redacts
anything key-shaped and drops every value under a token-like key, in lists as well as dicts (the
SDK's own scrubber skips lists, and a partner alert is a JSON list).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import sentry_sdk
from sentry_sdk.consts import EndpointType
from sentry_sdk.crons import capture_checkin
from sentry_sdk.crons.consts import MonitorStatus
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.starlette import StarletteIntegration
from sentry_sdk.transport import Transport
from sentry_sdk.utils import Dsn

if TYPE_CHECKING:
    from sentry_sdk._types import Event, LogLevelStr, MonitorConfig

from service import __version__
from service.backoff import backoff, retry_after
from service.observability import EVENTS_DROPPED, PAGES, PAGES_REPEATED, PAGES_WAITING, failure
from service.reasons import Reason
from service.store import IncidentDetail, Store, StoreError
from service.tokens import scrub

log = logging.getLogger("service.alerting")


LEVELS: dict[Reason, int] = {
    Reason.REVOCATION_UNCONFIRMED: logging.CRITICAL,
    Reason.REVOCATION_FAILED: logging.CRITICAL,
    Reason.LOOKUP_UNAUTHORIZED: logging.CRITICAL,
    Reason.REPORTER_KEYS_UNAVAILABLE: logging.ERROR,
    Reason.SIGNING_KEY_CHANGED: logging.WARNING,
    Reason.OWNER_UNREACHABLE: logging.WARNING,
    Reason.UNCONFIRMED_WINDOW_OVER: logging.CRITICAL,
    Reason.PUBLIC_REPORTS_FLOODED: logging.ERROR,
    Reason.SMTP_TLS_REQUIRED: logging.ERROR,
}


# How long one page stands for its condition, unless its gathering says otherwise.
REPEAT_WINDOW = 300.0


@dataclass(frozen=True)
class Gathering:
    """How a condition that is raised over and over becomes pages, instead of a page per occurrence.

    The condition opens at its first occurrence and pages `gather` seconds later (0: at once) with
    the count so far; later occurrences are counted, not sent. It ends `window` seconds after its
    first occurrence, or, `until_quiet`, once `window` seconds pass without one; then the count
    since its page goes out: paged when a fixed window ends (the condition may well still be going
    on, and on-call hears of it once a window), logged when it ended by going quiet (it is over).
    The next occurrence opens it again and pages again.
    """

    tags: tuple[str, ...] = ()  # the tags that tell one such condition from another
    gather: float = 0.0
    window: float = REPEAT_WINDOW
    until_quiet: bool = False


# The pages raised over and over (once per request or per incident meeting their condition): a
# reporter's keys being unavailable or the admin token being refused is one condition however many
# requests or incidents meet it. A flood of public reports is one too, gathered by the rate period
# (see `Runtime.build`). Other pages are raised once per incident by the pipeline: a key that could
# not be revoked needs its own action.
CONDITIONS: dict[Reason, Gathering] = {
    Reason.REPORTER_KEYS_UNAVAILABLE: Gathering(("reporter",)),
    Reason.SIGNING_KEY_CHANGED: Gathering(("reporter", "key_identifier")),
    Reason.LOOKUP_UNAUTHORIZED: Gathering(),
    Reason.SMTP_TLS_REQUIRED: Gathering(),
}

_Key = tuple[Reason, tuple[tuple[str, str], ...]]


@dataclass
class _Condition:
    since: float
    last: float
    message: str
    tags: dict[str, str]
    count: int = 1  # occurrences since it opened
    paged: int = 0  # of which the page said how many (0: not paged yet)


class Pager:
    """Pages, one per condition (see `Gathering`) for the codes in `conditions`.

    Delivery: every page sent is logged with its reason code and counted; channels build on this by
    overriding `_deliver`. Timers need the event loop; without one (a CLI command) a condition ends
    at its next occurrence or at `flush`, and a gathered one pages at once."""

    def __init__(
        self,
        repeat_window: float = REPEAT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        conditions: Mapping[Reason, Gathering] | None = None,
    ) -> None:
        self._clock = clock
        self._conditions = {
            code: dataclasses.replace(g, window=repeat_window) for code, g in CONDITIONS.items()
        } | dict(conditions or {})
        self._open: dict[_Key, _Condition] = {}

    def page(self, code: Reason, message: str, tags: Mapping[str, str], context: Mapping[str, Any]) -> None:
        gathering = self._conditions.get(code)
        if gathering is None:
            self._deliver(code, message, tags, context)
            return
        now = self._clock()
        key = (code, tuple((name, tags.get(name, "")) for name in gathering.tags))
        held = self._open.get(key)
        if held is not None and self._over(gathering, held, now):
            self._end(key)
            held = None
        if held is None:
            self._open[key] = _Condition(now, now, message, dict(tags))
            if gathering.gather > 0 and self._at(gathering.gather, lambda: self._gathered(key)):
                return
            self._gathered(key, context)
            return
        held.count += 1
        held.last = now
        if held.paged:
            PAGES_REPEATED.labels(event=str(code)).inc()

    def flush(self) -> None:
        """Page what is still being gathered and the count of every condition still repeating (at
        shutdown: nothing counted is lost)."""
        for key in list(self._open):
            self._gathered(key)
            self._end(key)

    @staticmethod
    def _over(gathering: Gathering, held: _Condition, now: float) -> bool:
        return now - (held.last if gathering.until_quiet else held.since) >= gathering.window

    def _gathered(self, key: _Key, context: Mapping[str, Any] | None = None) -> None:
        """The condition's page: at once, or with the count of what its gathering time brought."""
        held = self._open.get(key)
        if held is None or held.paged:
            return
        code = key[0]
        gathering = self._conditions[code]
        held.paged = held.count
        if gathering.gather > 0:
            message = f"{held.message} ({held.count} in {gathering.gather:g} s)"
            self._deliver(code, message, {**held.tags, "count": str(held.count)}, context or {})
        else:
            self._deliver(code, held.message, held.tags, context or {})
        self._watch(key)

    def _watch(self, key: _Key) -> None:
        """End the condition once its window is over; while it lasts, look again when it may be."""
        held = self._open.get(key)
        if held is None:
            return
        gathering = self._conditions[key[0]]
        now = self._clock()
        if self._over(gathering, held, now):
            self._end(key)
            return
        start = held.last if gathering.until_quiet else held.since
        self._at(start + gathering.window - now, lambda: self._watch(key))

    def _end(self, key: _Key) -> None:
        held = self._open.pop(key, None)
        if held is None:
            return
        code, gathering = key[0], self._conditions[key[0]]
        repeats = held.count - held.paged
        if gathering.until_quiet:
            extra = {"condition": str(code), "count": held.count, "lasted": held.last - held.since}
            log.info("condition over", extra=extra)
        elif held.paged and repeats:
            message = f"{held.message} (and {repeats} more times within {gathering.window:g} s)"
            self._deliver(code, message, {**held.tags, "repeats": str(repeats)}, {})

    def _at(self, delay: float, action: Callable[[], None]) -> bool:
        """Run `action` in `delay` seconds on the running loop; False when there is none."""
        try:
            asyncio.get_running_loop().call_later(max(delay, 0.0), action)
        except RuntimeError:
            return False
        return True

    def _deliver(
        self, code: Reason, message: str, tags: Mapping[str, str], context: Mapping[str, Any]
    ) -> None:
        PAGES.labels(event=str(code)).inc()
        failure(log, "alerting", code, message, level=LEVELS[code], page=True, context=tags)


SENTRY_LEVELS: dict[int, LogLevelStr] = {
    logging.CRITICAL: "fatal",
    logging.ERROR: "error",
    logging.WARNING: "warning",
}
MONITOR_SLUG = "leak-responder-pipeline"
FILTERED = "[Filtered]"

# Keys whose values are secrets whatever they look like; hashes, types and prefixes of tokens are not.
_SECRET_KEY = re.compile(
    r"token|secret|passw|authori[sz]ation|api[-_]?key|cookie|credential|private[-_]?key|signature|dsn", re.I
)
_HARMLESS_KEY = re.compile(r"hash|type|prefix|count", re.I)
# The worker loop beats at least every couple of seconds; this long without a beat means it is stuck.
_MAX_SILENCE = 30.0


def runbook_link(base: str, code: Reason) -> str:
    return f"{base}#{code}"


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key)) and not _HARMLESS_KEY.search(key)


def scrub_event(value: Any) -> Any:
    """Key-shaped strings redacted and token-like keys' values dropped, at any depth."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {
            scrub_event(k): FILTERED if _secret_key(k) and v is not None else scrub_event(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub_event(v) for v in value]
    return value


class EventBudget:
    """A token bucket for the events that the SDK's global client sends (errors logged, exceptions).

    That client hands events to one background thread through a bounded queue and drops what does
    not fit. A flood of errors (a bug on the request path, a database gone) is let through at a
    bounded rate, the rest counted and dropped here, so Sentry is not buried; pages never come this
    way (see `PageCourier`).
    """

    def __init__(
        self, burst: int = 20, per_second: float = 0.2, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def admit(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        EVENTS_DROPPED.inc()
        return False


class KeptEnvelopes(Transport):
    """The pages client's transport: it sends nothing, and keeps each envelope the client built
    (scrubbed by `before_send`, with the SDK's metadata and event id) for the courier, which posts it
    itself so that it knows what became of it."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.kept.append(envelope)


@dataclass(frozen=True)
class Answer:
    """What Sentry's ingest said to one post: its status (None: no answer, the connection failed
    or timed out) and, when it asked us to wait, for how long at least."""

    status: int | None
    retry_after: float | None = None

    @property
    def taken(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def worth_retrying(self) -> bool:
        """No answer, a 5xx, a 408 or a 429 may go better later; any other 4xx says this page is
        refused for good (a wrong DSN key, a body Sentry will never accept)."""
        return self.status is None or self.status in (408, 429) or self.status >= 500


Post = Callable[[bytes], Answer]


def envelope_poster(dsn: str, timeout: float) -> tuple[Post, Callable[[], None]]:
    """Posts an envelope to the DSN's ingest endpoint with the SDK's auth header (uncompressed: a
    page is small); with the function that closes its connections."""
    auth = Dsn(dsn).to_auth(client=f"leak-responder/{__version__}")
    url = auth.get_api_url(EndpointType.ENVELOPE)
    headers = {"Content-Type": "application/x-sentry-envelope", "X-Sentry-Auth": auth.to_header()}
    http = httpx.Client(timeout=timeout)

    def post(body: bytes) -> Answer:
        try:
            response = http.post(url, content=body, headers=headers)
        except httpx.HTTPError:
            return Answer(None)
        return Answer(response.status_code, _wait_asked(response.headers))

    return post, http.close


def _wait_asked(headers: Mapping[str, str]) -> float | None:
    """Sentry asks for a pause with `Retry-After`, or in `X-Sentry-Rate-Limits` (`seconds:categories
    :scope, …`): the longest it names."""
    limits = headers.get("x-sentry-rate-limits")
    if limits:
        seconds = [s for part in limits.split(",") if (s := part.strip().split(":")[0]).isdigit()]
        if seconds:
            return float(max(int(s) for s in seconds))
    return retry_after(headers.get("retry-after"))


@dataclass(frozen=True)
class PageRetry:
    """How long a page may wait for Sentry (from when it was raised), and the backoff between its
    attempts (the pipeline's own, `LEAK_RESPONDER_BACKOFF_*`)."""

    give_up_after: float
    backoff_base: float
    backoff_max: float


class PageCourier:
    """Pages' own way to Sentry, which no burst can overflow and no brief outage loses.

    The SDK's transport queues events for its sending thread and drops whatever arrives while its
    queue (100 events) is full: 150 keys that cannot be revoked are 150 pages within seconds. It also
    drops an event it could not send: a connection refused, a 5xx or a 429, and the event is gone.
    So pages have a client of their own, with no other event in its queue, whose transport only
    keeps the envelope it built (`KeptEnvelopes`); this thread takes pages one at a time from a
    queue that has no bound, posts each one itself and, while Sentry does not take it, tries again
    with backoff (a `Retry-After` or rate limit as a floor) for up to `give_up_after` seconds after
    it was raised. Each attempt sends the same envelope, event id included, so a page whose answer
    was lost on the way is still one event in Sentry. A page Sentry refuses for good, or that has
    waited that long, is dropped with `page_dropped` in a log line that carries the page itself. A
    page is small and raised at most once per incident or per gathered condition, so what waits
    stays small.

    While Sentry is down on-call hears nothing from it, so the delay itself is told elsewhere: the
    first attempt Sentry does not take logs `page_delayed` (a warning carrying the page, once per
    page), and `leak_responder_pages_waiting` counts the pages not yet taken, for an alert from the
    metrics side long before `page_dropped` comes.
    """

    def __init__(
        self,
        client: sentry_sdk.Client,
        post: Post,
        retry: PageRetry,
        close_post: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        assert isinstance(client.transport, KeptEnvelopes), "the pages client keeps its envelopes"
        self._client = client
        self._kept = client.transport
        self._post = post
        self._close_post = close_post
        self._retry = retry
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: queue.SimpleQueue[tuple[Event, float] | None] = queue.SimpleQueue()
        # Set at close: a page then gets one more attempt, no more waiting between attempts.
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._unsettled = 0
        self._thread = threading.Thread(target=self._run, name="sentry-pages", daemon=True)
        self._thread.start()

    def send(self, event: Event) -> None:
        """Queue a page; returns at once, from any thread."""
        with self._lock:
            self._unsettled += 1
        PAGES_WAITING.inc()
        self._queue.put((event, self._clock()))

    def close(self, timeout: float) -> None:
        """Try every page queued so far once more, at once, and wait `timeout` at most for them; a
        page still not taken is dropped (and logged), since the process is going away."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout)
        with self._lock:
            left = self._unsettled
        if left:
            failure(
                log,
                "alerting",
                Reason.PAGE_DROPPED,
                "pages not yet taken by Sentry at shutdown",
                level=logging.ERROR,
                count=left,
            )
        self._close_post()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            event, raised = item
            try:
                self._deliver(event, raised)
            except Exception as exc:
                # This thread carries every later page: one that cannot be sent must not stop it.
                failure(
                    log,
                    "alerting",
                    Reason.INTERNAL_ERROR,
                    "a page could not be handed to Sentry",
                    level=logging.ERROR,
                    exc_info=exc,
                )
            finally:
                with self._lock:
                    self._unsettled -= 1
                PAGES_WAITING.dec()

    def _deliver(self, event: Event, raised: float) -> None:
        self._client.capture_event(event)
        envelopes, self._kept.kept = self._kept.kept, []
        for envelope in envelopes:
            self._until_taken(event, envelope.serialize(), raised)

    def _until_taken(self, event: Event, body: bytes, raised: float) -> None:
        attempts = 0
        while True:
            attempts += 1
            answer = self._post(body)
            if answer.taken:
                return
            waited = self._clock() - raised
            if not answer.worth_retrying or waited >= self._retry.give_up_after or self._closing.is_set():
                _page_failure(
                    Reason.PAGE_DROPPED,
                    logging.ERROR,
                    "Sentry did not take a page",
                    event,
                    answer,
                    attempts=attempts,
                    waited=round(waited, 1),
                )
                return
            delay = backoff(
                attempts, self._retry.backoff_base, self._retry.backoff_max, answer.retry_after, self._rng
            )
            if attempts == 1:
                _page_failure(
                    Reason.PAGE_DELAYED,
                    logging.WARNING,
                    "Sentry did not take a page yet, retrying",
                    event,
                    answer,
                    retry_in=round(delay, 1),
                )
            else:
                log.debug("page not taken by Sentry yet", extra={"status": answer.status, "retry_in": delay})
            self._closing.wait(delay)


def _page_failure(reason: Reason, level: int, what: str, event: Event, answer: Answer, **more: Any) -> None:
    """The log line of a page Sentry did not take: it carries the page (its code and message),
    since Sentry, which would have shown it to on-call, did not get it."""
    failure(
        log,
        "alerting",
        reason,
        f"{what}: {event.get('message', '')}",
        level=level,
        page=event.get("tags", {}).get("page"),
        status=answer.status,
        **more,
    )


def init_sentry(dsn: str, environment: str, retry: PageRetry, timeout: float) -> PageCourier:
    """The global client, for errors and check-ins, and the pages' own (see `PageCourier`); a post
    of a page waits `timeout` at most for Sentry's answer."""
    budget = EventBudget()
    private: dict[str, Any] = {
        "dsn": dsn,
        "environment": environment,
        "send_default_pii": False,
        "include_local_variables": False,
        "max_request_body_size": "never",
        "shutdown_timeout": 2,
    }
    sentry_sdk.init(
        **private,
        before_send=lambda event, hint: scrub_event(event) if budget.admit() else None,
        before_breadcrumb=lambda crumb, hint: scrub_event(crumb),
        integrations=[
            StarletteIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
    )
    # Pages become Sentry events of their own, with fingerprints; their log lines would be duplicates.
    ignore_logger(log.name)
    pages = sentry_sdk.Client(
        **private,
        transport=KeptEnvelopes(),
        before_send=lambda event, hint: scrub_event(event),
        default_integrations=False,
        auto_enabling_integrations=False,
        send_client_reports=False,
    )
    post, close_post = envelope_poster(dsn, timeout)
    return PageCourier(pages, post, retry, close_post)


# The namespace of an incident's page ids (uuid5 of "<incident id>/<code>").
_PAGE_IDS = uuid.UUID("6f1d2c1e-3b7a-4c55-9a57-1f0e8a4b2d90")


class SentryPager(Pager):
    """Pages as Sentry events: one fixed fingerprint per code, tags to search by, the incident's
    timeline and the runbook section that says what to do.

    An incident is paged once per code (the code is recorded with the step's outcome), but a step
    runs again when its outcome could not be recorded: its lease ran out while it waited on
    Supermemory and another worker took it over, or the process died between page and commit. So
    an incident's page has an event id made of the incident and the code, and the second attempt
    is the same event, which Sentry keeps once, as it does for the courier's retries."""

    def __init__(
        self,
        store: Store,
        runbook_url: str,
        courier: PageCourier,
        conditions: Mapping[Reason, Gathering] | None = None,
    ) -> None:
        super().__init__(conditions=conditions)
        self.courier = courier
        self.store = store
        self.runbook_url = runbook_url
        self._tasks: set[asyncio.Task[None]] = set()

    def _deliver(
        self, code: Reason, message: str, tags: Mapping[str, str], context: Mapping[str, Any]
    ) -> None:
        super()._deliver(code, message, tags, context)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._capture(code, message, tags, context, None)
            return
        # The timeline is a store read: done beside the caller, never in its way.
        task = loop.create_task(self._enrich(code, message, dict(tags), dict(context)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, grace: float = 2.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        await asyncio.to_thread(self.courier.close, grace)
        await asyncio.to_thread(sentry_sdk.get_client().flush, grace)

    async def _enrich(
        self, code: Reason, message: str, tags: dict[str, str], context: dict[str, Any]
    ) -> None:
        detail = None
        if tags.get("incident_id"):
            try:
                detail = await self.store.detail(tags["incident_id"])
            except StoreError:
                pass  # the store is down: its own failures say so, and the page goes without
            except Exception as exc:
                # The timeline is a courtesy: a row the code cannot read must not cost the page.
                failure(
                    log,
                    "alerting",
                    Reason.INTERNAL_ERROR,
                    "page sent without its timeline, which could not be read",
                    level=logging.ERROR,
                    exc_info=exc,
                    page=str(code),
                    incident_id=tags["incident_id"],
                )
        self._capture(code, message, tags, context, detail)

    def _capture(
        self,
        code: Reason,
        message: str,
        tags: Mapping[str, str],
        context: Mapping[str, Any],
        detail: IncidentDetail | None,
    ) -> None:
        tags = {"page": str(code), **{k: str(v) for k, v in tags.items() if v}}
        incident: dict[str, Any] = dict(context)
        if detail is not None:
            reporters = sorted({s.reporter for s in detail.sightings})
            sources = sorted({s.source or "unknown" for s in detail.sightings})
            if reporters:
                tags.setdefault("reporter", ",".join(reporters))
                tags.setdefault("source", ",".join(sources))
            incident["timeline"] = [
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at)),
                    "event": e.kind,
                    "state": str(e.state) if e.state else None,
                    **e.detail,
                }
                for e in detail.events
            ]
        link = runbook_link(self.runbook_url, code)
        incident_id = tags.get("incident_id")
        self.courier.send(
            {
                **({"event_id": uuid.uuid5(_PAGE_IDS, f"{incident_id}/{code}").hex} if incident_id else {}),
                "level": SENTRY_LEVELS[LEVELS[code]],
                "logger": log.name,
                "message": f"{code}: {message}",
                "fingerprint": ["leak-responder", str(code)],
                "tags": tags,
                "contexts": {"incident": incident, "runbook": {"url": link}},
                "extra": {"runbook": link},
            }
        )


class PipelineMonitor:
    """A Sentry cron monitor around the worker loop: a check-in every `interval` seconds, `ok` while
    the loop beats and `error` once it has been silent too long. A process that dies or hangs sends
    nothing, and Sentry's missed-check-in alert catches that."""

    def __init__(
        self, heartbeat: Callable[[], float], interval: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._heartbeat = heartbeat
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._config: MonitorConfig = {
            "schedule": {"type": "interval", "value": max(1, round(interval / 60)), "unit": "minute"},
            "checkin_margin": 2,
            "max_runtime": 1,
        }

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pipeline-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check_in(self) -> bool:
        silent = self._clock() - self._heartbeat()
        healthy = silent <= _MAX_SILENCE
        if not healthy:
            failure(
                log,
                "alerting",
                Reason.PIPELINE_STALLED,
                "the pipeline worker loop stopped beating",
                level=logging.ERROR,
                silent_for=round(silent, 1),
            )
        capture_checkin(
            monitor_slug=MONITOR_SLUG,
            status=MonitorStatus.OK if healthy else MonitorStatus.ERROR,
            monitor_config=self._config,
        )
        return healthy

    async def _run(self) -> None:
        while True:
            self.check_in()
            await asyncio.sleep(self._interval)
