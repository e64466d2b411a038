"""Settings from the environment (and a `.env` file in the working directory), validated up front.

A responder that starts half-configured fails at 3 a.m. on the first real leak, so every setting is
parsed at start-up and the first bad one stops the process with one line that names it. The table
below is the single place a setting is declared: its parser, its default, and whether it is secret
(masked by `check-config`).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.tokens import mask_url

PREFIX = "LEAK_RESPONDER_"


class SettingsError(ValueError):
    """A setting is missing or malformed; `str()` is the one line shown to the operator."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"setting {name}: {problem}")
        self.name = name


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


def _optional_url(value: str) -> str | None:
    return _url(value) if value else None


def _database_url(value: str) -> str:
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        return value
    raise ValueError("expected sqlite:///PATH or postgresql://…")


def _data_key(value: str) -> bytes | None:
    if not value:
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("expected base64") from None
    if len(key) != 32:
        raise ValueError(f"expected base64 of 32 bytes, got {len(key)} bytes")
    return key


def _data_keys(value: str) -> tuple[bytes, ...]:
    """Older data keys, comma-separated, each as DATA_KEY is written."""
    keys = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        key = _data_key(part)
        assert key is not None
        keys.append(key)
    return tuple(keys)


_REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _replica_id(value: str) -> str:
    """Default: the host name, which a StatefulSet keeps across restarts of the same replica."""
    replica = value or socket.gethostname()
    if not _REPLICA.fullmatch(replica):
        raise ValueError("expected 1-63 letters, digits, dots, dashes or underscores")
    return replica


def _mode(value: str) -> str:
    if value not in ("enforce", "dry-run"):
        raise ValueError("expected enforce or dry-run")
    return value


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _operators(value: str) -> dict[str, str]:
    """`name:sha256hex` pairs; only the hash of each operator's bearer token is ever held."""
    operators: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        name, sep, digest = pair.partition(":")
        if not sep or not name or not _SHA256_HEX.fullmatch(digest.lower()):
            raise ValueError("expected comma-separated name:sha256hex pairs")
        if name in operators:
            raise ValueError(f"operator {name!r} appears twice")
        operators[name] = digest.lower()
    return operators


def _smtp_url(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("expected smtp://[user:pass@]host[:port] or smtps://…")
    parts.port  # noqa: B018 - raises ValueError on a malformed port
    return value


def _email(value: str) -> str | None:
    if not value:
        return None
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
        raise ValueError("expected an email address")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    expected = "a positive integer" if kind is int else "a positive number"

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"expected {expected}, got {value[:40]!r}") from None
        if number <= 0:
            raise ValueError(f"expected {expected}")
        return number

    return parse


_SIZE = re.compile(r"(\d+)\s*([kmg]i?b?|b)?", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def _size(value: str) -> int:
    """Bytes, plain or with a unit: 10485760, 10MiB (1024-based), 10MB (1000-based), 512KiB."""
    match = _SIZE.fullmatch(value)
    if not match or int(match[1]) == 0:
        raise ValueError(f"expected a positive size in bytes, e.g. 10485760 or 10MiB, got {value[:40]!r}")
    return int(match[1]) * _UNITS[(match[2] or "").lower()]


def _sentry_dsn(value: str) -> str:
    """Checked now, as the SDK would parse it at start-up: a bad DSN passing `check-config` and
    then failing `serve` with a traceback is the worst of both."""
    if not value:
        return value
    from sentry_sdk.utils import BadDsn, Dsn

    try:
        Dsn(value)
    except BadDsn as exc:
        raise ValueError(f"not a Sentry DSN ({exc}); expected https://PUBLIC_KEY@HOST/PROJECT_ID") from None
    return value


def _schedule(value: str) -> tuple[float, ...]:
    points = tuple(float(p) for p in value.split(","))
    if not points or any(p < 0 for p in points) or list(points) != sorted(points):
        raise ValueError("expected ascending non-negative seconds, e.g. 0,2,5,15,30,60,120")
    return points


def _path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected a path starting with /")
    return value


def _log_format(value: str) -> str:
    if value not in ("json", "text"):
        raise ValueError("expected json or text")
    return value


_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period` seconds, written `N/second`, `N/minute` or `N/hour`."""

    count: int
    period: float

    def __str__(self) -> str:
        unit = next(name for name, seconds in _PERIODS.items() if seconds == self.period)
        return f"{self.count}/{unit}"


def _rate(value: str) -> Rate:
    count, sep, unit = value.partition("/")
    if not sep or not count.strip().isdigit() or int(count) <= 0 or unit.strip() not in _PERIODS:
        raise ValueError("expected N/second, N/minute or N/hour with N > 0, e.g. 10/minute")
    return Rate(int(count), _PERIODS[unit.strip()])


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(p.strip()) for p in value.split(",") if p.strip())
    except ValueError:
        raise ValueError("expected comma-separated CIDRs, e.g. 10.0.0.0/8,fd00::/8") from None


@dataclass(frozen=True)
class _Spec:
    """How one setting is read: its variable (without our prefix), its parser, its default (None:
    required), whether `check-config` masks it, and whether it carries our prefix (Sentry's own
    variable names are standard)."""

    env: str
    parse: Callable[[str], Any]
    default: str | None
    secret: bool = False
    prefixed: bool = True

    @property
    def name(self) -> str:
        return PREFIX + self.env if self.prefixed else self.env


def _setting(
    env: str, parse: Callable[[str], Any], default: str | None, *, secret: bool = False, prefixed: bool = True
) -> Any:
    """A Settings field and how it is read, declared together in one line."""
    return field(metadata={"spec": _Spec(env, parse, default, secret, prefixed)})


_F = float
_I = int


@dataclass(frozen=True)
class Settings:
    database_url: str = _setting("DATABASE_URL", _database_url, "sqlite:///./data/leak-responder.db")
    database_pool_size: int = _setting("DATABASE_POOL_SIZE", _positive(_I), "10")
    data_key: bytes | None = _setting("DATA_KEY", _data_key, "", secret=True)
    data_key_fallbacks: tuple[bytes, ...] = _setting("DATA_KEY_FALLBACKS", _data_keys, "", secret=True)
    replica_id: str = _setting("REPLICA_ID", _replica_id, "")
    github_keys_url: str | None = _setting(
        "GITHUB_KEYS_URL", _optional_url, "https://api.github.com/meta/public_keys/secret_scanning"
    )
    github_token: str = _setting("GITHUB_TOKEN", str, "", secret=True)
    gitlab_keys_url: str | None = _setting("GITLAB_KEYS_URL", _optional_url, "")
    depsdev_keys_url: str | None = _setting(
        "DEPSDEV_KEYS_URL",
        _optional_url,
        "https://storage.googleapis.com/depsdev-gcp-public-keys/secret_scanning",
    )
    supermemory_api_url: str = _setting("SUPERMEMORY_API_URL", _url, "https://api.supermemory.ai")
    supermemory_admin_url: str | None = _setting("SUPERMEMORY_ADMIN_URL", _optional_url, "")
    supermemory_admin_token: str = _setting("SUPERMEMORY_ADMIN_TOKEN", str, "", secret=True)
    lookup_path: str = _setting("LOOKUP_PATH", _path, "/v3/admin/api-keys/lookup")
    revoke_path: str = _setting("REVOKE_PATH", _path, "/v3/auth/scoped-key/{id}")
    probe_path: str = _setting("PROBE_PATH", _path, "/v3/session")
    mode: str = _setting("MODE", _mode, "enforce")
    operator_tokens: dict[str, str] = _setting("OPERATOR_TOKENS", _operators, "")
    smtp_url: str | None = _setting("SMTP_URL", _smtp_url, "", secret=True)
    mail_from: str | None = _setting("MAIL_FROM", _email, "")
    security_contact: str | None = _setting("SECURITY_CONTACT", _email, "")
    notify_group_wait: float = _setting("NOTIFY_GROUP_WAIT", _positive(_F), "10")
    channel_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "CHANNEL_ALLOWED_NETWORKS", _networks, ""
    )
    channel_give_up_after: float = _setting("CHANNEL_GIVE_UP_AFTER", _positive(_F), "86400")
    runbook_url: str = _setting("RUNBOOK_URL", str, "docs/runbook.md")
    body_limit: int = _setting("BODY_LIMIT", _size, str(10 * 1024 * 1024))
    request_budget: float = _setting("REQUEST_BUDGET", _positive(_F), "5")
    connection_idle_timeout: float = _setting("CONNECTION_IDLE_TIMEOUT", _positive(_F), "10")
    http_timeout: float = _setting("HTTP_TIMEOUT", _positive(_F), "5")
    concurrency: int = _setting("CONCURRENCY", _positive(_I), "32")
    probe_schedule: tuple[float, ...] = _setting("PROBE_SCHEDULE", _schedule, "0,2,5,15,30,60,120")
    unconfirmed_reprobe_interval: float = _setting("UNCONFIRMED_REPROBE_INTERVAL", _positive(_F), "3600")
    unconfirmed_window: float = _setting("UNCONFIRMED_WINDOW", _positive(_F), "604800")
    probe_inconclusive_window: float = _setting("PROBE_INCONCLUSIVE_WINDOW", _positive(_F), "600")
    revoke_retry_window: float = _setting("REVOKE_RETRY_WINDOW", _positive(_F), "900")
    backoff_base: float = _setting("BACKOFF_BASE", _positive(_F), "1")
    backoff_max: float = _setting("BACKOFF_MAX", _positive(_F), "300")
    lease_seconds: float = _setting("LEASE_SECONDS", _positive(_F), "30")
    keys_refresh_interval: float = _setting("KEYS_REFRESH_INTERVAL", _positive(_F), "3600")
    retention_days: float = _setting("RETENTION_DAYS", _positive(_F), "30")
    sweep_interval: float = _setting("SWEEP_INTERVAL", _positive(_F), "3600")
    public_rate: Rate = _setting("PUBLIC_RATE", _rate, "10/minute")
    public_global_rate: Rate = _setting("PUBLIC_GLOBAL_RATE", _rate, "300/minute")
    public_max_keys: int = _setting("PUBLIC_MAX_KEYS", _positive(_I), "20")
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "TRUSTED_PROXIES", _networks, ""
    )
    log_level: str = _setting("LOG_LEVEL", str.upper, "INFO")
    log_format: str = _setting("LOG_FORMAT", _log_format, "json")
    sentry_dsn: str = _setting("SENTRY_DSN", _sentry_dsn, "", secret=True, prefixed=False)
    sentry_environment: str = _setting("SENTRY_ENVIRONMENT", str, "production", prefixed=False)
    sentry_checkin_interval: float = _setting("SENTRY_CHECKIN_INTERVAL", _positive(_F), "60")
    page_give_up_after: float = _setting("PAGE_GIVE_UP_AFTER", _positive(_F), "86400")

    @property
    def admin_url(self) -> str:
        return self.supermemory_admin_url or self.supermemory_api_url

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    @property
    def sqlite_path(self) -> Path | None:
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> Settings:
        """Environment variables win over the `.env` file, as every twelve-factor tool does."""
        merged = environment(environ, env_file)
        settings = cls(**{attribute: one_setting(attribute, merged) for attribute in SPECS})
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if not self.supermemory_admin_token:
            # Required on loopback too: the sandbox checks its admin token as Supermemory does
            # (`leak-responder sandbox` prints it), so a token-less setting would only fail later.
            raise SettingsError(env_name("supermemory_admin_token"), "required")
        if self.sqlite_path is None and self.data_key is None:
            raise SettingsError(env_name("data_key"), "required with a PostgreSQL database")
        if self.smtp_url and not self.mail_from:
            raise SettingsError(env_name("mail_from"), "required when SMTP_URL is set")
        if not any((self.github_keys_url, self.gitlab_keys_url, self.depsdev_keys_url)):
            raise SettingsError(env_name("github_keys_url"), "at least one reporter must be enabled")

    def notices(self, environ: Mapping[str, str]) -> list[str]:
        """Warnings that do not stop start-up: a variable of ours that no setting reads (a typo
        leaves its setting at the default, silently), and values a partner agreement objects to."""
        found = []
        known = {spec.name for spec in SPECS.values()}
        for name in sorted(environ):
            if name.startswith(PREFIX) and name not in known and not _FOREIGN.fullmatch(name[len(PREFIX) :]):
                # Compared without the prefix, which every candidate shares.
                ours = [n[len(PREFIX) :] for n in known if n.startswith(PREFIX)]
                closest = difflib.get_close_matches(name[len(PREFIX) :], ours, n=1, cutoff=0.75)
                hint = f"; did you mean {PREFIX}{closest[0]}?" if closest else ""
                found.append(f"{name} is not a setting and is ignored{hint}")
        if self.retention_days > GITHUB_RETENTION_DAYS:
            found.append(
                f"{env_name('retention_days')} is {self.retention_days:g} days: GitHub's partner program"
                f" asks that reporter metadata be deleted within {GITHUB_RETENTION_DAYS} days"
            )
        return found

    def describe(self) -> list[tuple[str, str]]:
        """Every effective setting by its variable name, secrets masked, for `check-config`."""
        rows = []
        for attribute, spec in SPECS.items():
            value = getattr(self, attribute)
            if spec.secret:
                shown = "(set, masked)" if value else "(unset)"
            elif attribute == "operator_tokens":
                shown = ", ".join(sorted(value)) or "(none)"
            elif isinstance(value, tuple):
                shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "(none)"
            else:
                # A URL setting may carry a password (DATABASE_URL does): never shown.
                shown = "(unset)" if value in (None, "") else mask_url(str(value))
            rows.append((spec.name, shown))
        return rows


# Every setting by attribute, in declaration order: read from the fields, so it cannot drift.
SPECS: dict[str, _Spec] = {f.name: f.metadata["spec"] for f in fields(Settings)}


# Variables with our prefix that are not settings: the CLI's own, and those Kubernetes injects for a
# Service named leak-responder (LEAK_RESPONDER_SERVICE_HOST, LEAK_RESPONDER_PORT_8000_TCP, …).
_FOREIGN = re.compile(
    r"URL|OPERATOR_TOKEN|SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?"
)
GITHUB_RETENTION_DAYS = 30


def environment(
    environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")
) -> dict[str, str]:
    """The `.env` file's variables under the environment's (`os.environ` unless given)."""
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update(read_env_file(env_file))
    merged.update(os.environ if environ is None else environ)
    return merged


def one_setting(attribute: str, environ: Mapping[str, str]) -> Any:
    """One setting parsed on its own, for a command that needs nothing else: `migrate` on
    PostgreSQL runs with the database URL alone (least privilege: no admin token, no data key)."""
    spec = SPECS[attribute]
    raw = environ.get(spec.name, spec.default)
    if raw is None:
        raise SettingsError(spec.name, "required")
    try:
        return spec.parse(raw.strip())
    except ValueError as exc:
        raise SettingsError(spec.name, str(exc) or "malformed") from None


def env_name(attribute: str) -> str:
    """The variable that sets `attribute`, for messages that name a setting."""
    return SPECS[attribute].name


def read_env_file(path: Path) -> dict[str, str]:
    """The common subset of dotenv: `KEY=value`, optional `export`, quotes, and `#` comments."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values
