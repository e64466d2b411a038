"""Wiring: the one place that turns settings into a running set of parts, for the app and the CLI."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.alerting import Gathering, Pager, PageRetry, PipelineMonitor, SentryPager, init_sentry
from service.channels import AddressPolicy, ChannelDispatcher, ChannelSender
from service.inbound import BodyBudget, KeyCache, Reporter, reporters
from service.inbound.public import ClientNames, PublicLimits
from service.notify import EmailNotifier, Letter, SmtpSender
from service.observability import failure
from service.pipeline import Policy, Steps, Sweeper, Worker
from service.reasons import Reason
from service.settings import Settings
from service.store import RewrapReport, Sealer, SqliteStore, Store, embedded_key
from service.supermemory import SupermemoryClient

log = logging.getLogger("service.runtime")

# How many bodies at the limit may be held at once, all requests together (see BodyBudget).
BODIES_IN_FLIGHT = 6


def data_key(settings: Settings) -> bytes:
    """The current data key: the setting, or on SQLite by default a key file beside the database."""
    key = settings.data_key
    if key is None:
        path = settings.sqlite_path
        assert path is not None, "settings require DATA_KEY without SQLite"
        key = embedded_key(Path(f"{path}.key"))
    return key


def sealer_for(settings: Settings) -> Sealer:
    """The current data key and the fallbacks that still open what older keys sealed."""
    return Sealer(data_key(settings), settings.data_key_fallbacks)


def store_failure(reason: Reason, message: str) -> None:
    """What the store reports of itself (it knows neither logs nor metrics): a lost wake-up channel
    only delays work (polling covers it), anything else is an error."""
    level = logging.WARNING if reason is Reason.STORE_LISTEN_LOST else logging.ERROR
    failure(log, "store", reason, message, level=level)


def open_store(settings: Settings) -> Store:
    """The backend named by DATABASE_URL (not yet opened)."""
    path = settings.sqlite_path
    if path is None:
        # Imported here so that a SQLite deployment never loads the PostgreSQL driver.
        from service.store.postgres import PostgresStore

        return PostgresStore(
            settings.database_url,
            sealer_for(settings),
            pool_size=settings.database_pool_size,
            on_failure=store_failure,
        )
    return SqliteStore(path, sealer_for(settings), on_failure=store_failure)


async def check_store(settings: Settings) -> None:
    """Open and close the store once: StoreError when it is unreachable, owned by another process
    (SQLite) or behind on migrations, SealingError when the data keys do not open what it holds;
    so that a command can refuse to start with one line instead of a failed start-up's traceback."""
    store = open_store(settings)
    await store.open()
    await store.close()


async def migrate(database_url: str, settings: Callable[[], Settings]) -> list[str]:
    """Apply pending migrations; the ones this call applied. PostgreSQL needs the URL alone (a
    migration job runs with its own database role and nothing else: no admin token, no data key);
    SQLite migrates whenever it is opened, so for it this opens the store with the full `settings()`
    (and says what it applied through the same list)."""
    if not database_url.startswith("sqlite:"):
        from service.store.migrations import migrate_postgres

        return [m.label for m in await migrate_postgres(database_url)]
    full = settings()
    assert full.sqlite_path is not None
    store = SqliteStore(full.sqlite_path, sealer_for(full), on_failure=store_failure)
    await store.open()
    await store.close()
    return store.migrated


async def rewrap(settings: Settings, batch: int) -> RewrapReport:
    """Reseal every token under the current data key (`Store.rewrap`)."""
    store = open_store(settings)
    await store.open()
    try:
        return await store.rewrap(batch)
    finally:
        await store.close()


@dataclass
class Runtime:
    settings: Settings
    store: Store
    client: SupermemoryClient
    pager: Pager
    worker: Worker
    reporters: dict[str, Reporter]
    keys_http: httpx.AsyncClient
    sweeper: Sweeper
    public_limits: PublicLimits
    channels: ChannelDispatcher
    bodies: BodyBudget
    caches: dict[str, KeyCache] = field(default_factory=dict)
    monitor: PipelineMonitor | None = None

    @classmethod
    def build(cls, settings: Settings, pager: Pager | None = None) -> Runtime:
        store = open_store(settings)
        # A flood of public reports is one condition: paged once, with the refusals that its first
        # seconds brought, and over after one rate period without a refusal.
        everyone = settings.public_global_rate.period
        flood = Gathering(gather=min(10.0, everyone), window=everyone, until_quiet=True)
        conditions = {Reason.PUBLIC_REPORTS_FLOODED: flood}
        if pager is None:
            if settings.sentry_dsn:
                retry = PageRetry(settings.page_give_up_after, settings.backoff_base, settings.backoff_max)
                courier = init_sentry(
                    settings.sentry_dsn, settings.sentry_environment, retry, settings.http_timeout
                )
                pager = SentryPager(store, settings.runbook_url, courier, conditions)
            else:
                pager = Pager(conditions=conditions)
        client = SupermemoryClient(
            api_url=settings.supermemory_api_url,
            admin_url=settings.admin_url,
            admin_token=settings.supermemory_admin_token,
            timeout=settings.http_timeout,
            concurrency=settings.concurrency,
            lookup_path=settings.lookup_path,
            revoke_path=settings.revoke_path,
            probe_path=settings.probe_path,
        )
        policy = Policy(
            dry_run=settings.dry_run,
            probe_schedule=settings.probe_schedule,
            probe_inconclusive_window=settings.probe_inconclusive_window,
            revoke_retry_window=settings.revoke_retry_window,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            reprobe_interval=settings.unconfirmed_reprobe_interval,
            unconfirmed_window=settings.unconfirmed_window,
        )
        notifier = None
        if settings.smtp_url:
            assert settings.mail_from is not None, "settings require MAIL_FROM with SMTP_URL"
            notifier = EmailNotifier(
                store,
                SmtpSender(settings.smtp_url, timeout=settings.http_timeout),
                Letter(settings.mail_from, settings.security_contact),
                group_wait=settings.notify_group_wait,
                # A delivery is held as long as the incident's lease: whoever retakes one retakes both.
                hold=settings.lease_seconds,
            )
        worker = Worker(
            Steps(store, client, pager, policy, notifier),
            replica=settings.replica_id,
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
        )
        channels = ChannelDispatcher(
            store,
            ChannelSender(
                AddressPolicy(settings.channel_allowed_networks),
                timeout=settings.http_timeout,
                concurrency=settings.concurrency,
            ),
            replica=settings.replica_id,
            concurrency=settings.concurrency,
            # Longer than any attempt can take (it is bounded by the HTTP timeout), like a lease.
            hold=max(settings.lease_seconds, 2 * settings.http_timeout),
            give_up_after=settings.channel_give_up_after,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
        )
        worker.after_commit = channels.wake
        enabled = reporters(settings.github_keys_url, settings.gitlab_keys_url, settings.depsdev_keys_url)
        keys_http = httpx.AsyncClient(timeout=settings.http_timeout, headers={"User-Agent": "leak-responder"})
        sweeper = Sweeper(store, retention=settings.retention_days * 86400, interval=settings.sweep_interval)
        public_limits = PublicLimits(
            store,
            ClientNames(data_key(settings)),
            (settings.public_rate.count, settings.public_rate.period),
            (settings.public_global_rate.count, settings.public_global_rate.period),
        )
        # Room for a few bodies at the limit at once, well inside the container's memory limit.
        bodies = BodyBudget(BODIES_IN_FLIGHT * settings.body_limit)
        runtime = cls(
            settings,
            store,
            client,
            pager,
            worker,
            enabled,
            keys_http,
            sweeper,
            public_limits,
            channels,
            bodies,
        )
        if settings.sentry_dsn:
            runtime.monitor = PipelineMonitor(lambda: worker.heartbeat, settings.sentry_checkin_interval)
        for name, reporter in enabled.items():
            runtime.caches[name] = KeyCache(
                reporter,
                keys_http,
                auth_token=(settings.github_token or None) if name == "github" else None,
                refresh_interval=settings.keys_refresh_interval,
                on_event=runtime._key_event,
            )
        return runtime

    def _key_event(self, reason: Reason, data: dict[str, str]) -> None:
        if reason is Reason.SIGNING_KEY_CHANGED:
            self.pager.page(
                Reason.SIGNING_KEY_CHANGED,
                "a reporter's verification key changed under a known identifier",
                data,
                {},
            )
        else:
            failure(log, "inbound", reason, "reporter keys fetch failed", context=data)

    async def start(self) -> None:
        await self.store.open()
        for cache in self.caches.values():
            cache.start()
        await self.worker.start()
        self.channels.start()
        self.sweeper.start()
        if self.monitor is not None:
            self.monitor.start()
        if self.settings.dry_run:
            log.warning("dry-run mode: matched keys are NOT revoked", extra={"reason": Reason.DRY_RUN})
        if self.worker.steps.notifier is None:
            log.warning(
                "SMTP is not configured: owners will NOT be emailed; confirmed incidents wait in the"
                " notify state until LEAK_RESPONDER_SMTP_URL is set",
                extra={"reason": Reason.NOTIFY_DISABLED},
            )
        if not self.settings.sentry_dsn:
            log.warning(
                "SENTRY_DSN is not set: pages go to the log only", extra={"reason": Reason.PAGER_LOG_ONLY}
            )

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        await self.sweeper.stop()
        await self.worker.stop()
        await self.channels.stop()
        self.pager.flush()
        if isinstance(self.pager, SentryPager):
            await self.pager.aclose()
        for cache in self.caches.values():
            await cache.aclose()
        await self.keys_http.aclose()
        await self.client.aclose()
        await self.store.close()
