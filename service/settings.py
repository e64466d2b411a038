"""Settings from the environment (and a `.env` file in the working directory), validated up front.

A responder that starts half-configured fails at 3 a.m. on the first real leak, so every setting is
parsed at start-up and the first bad one stops the process with one line that names it. The table
below is the single place a setting is declared: its parser, its default, and whether it is secret
(masked by `check-config`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    def parse(value: str) -> float:
        number = kind(value)
        if number <= 0:
            raise ValueError("expected a positive number")
        return number

    return parse


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


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[str], Any]
    default: str | None
    secret: bool = False


_F = float
_I = int


# field name -> how it is read. `None` as default means required (checked after parsing).
_SPECS: dict[str, _Spec] = {
    "database_url": _Spec("DATABASE_URL", _database_url, "sqlite:///./data/leak-responder.db"),
    "database_pool_size": _Spec("DATABASE_POOL_SIZE", _positive(_I), "10"),
    "data_key": _Spec("DATA_KEY", _data_key, "", secret=True),
    "github_keys_url": _Spec(
        "GITHUB_KEYS_URL", _optional_url, "https://api.github.com/meta/public_keys/secret_scanning"
    ),
    "github_token": _Spec("GITHUB_TOKEN", str, "", secret=True),
    "gitlab_keys_url": _Spec("GITLAB_KEYS_URL", _optional_url, ""),
    "depsdev_keys_url": _Spec(
        "DEPSDEV_KEYS_URL",
        _optional_url,
        "https://storage.googleapis.com/depsdev-gcp-public-keys/secret_scanning",
    ),
    "supermemory_api_url": _Spec("SUPERMEMORY_API_URL", _url, "https://api.supermemory.ai"),
    "supermemory_admin_url": _Spec("SUPERMEMORY_ADMIN_URL", _optional_url, ""),
    "supermemory_admin_token": _Spec("SUPERMEMORY_ADMIN_TOKEN", str, "", secret=True),
    "lookup_path": _Spec("LOOKUP_PATH", _path, "/v3/admin/api-keys/lookup"),
    "revoke_path": _Spec("REVOKE_PATH", _path, "/v3/auth/scoped-key/{id}"),
    "probe_path": _Spec("PROBE_PATH", _path, "/v3/session"),
    "mode": _Spec("MODE", _mode, "enforce"),
    "operator_tokens": _Spec("OPERATOR_TOKENS", _operators, ""),
    "smtp_url": _Spec("SMTP_URL", _smtp_url, "", secret=True),
    "mail_from": _Spec("MAIL_FROM", _email, ""),
    "security_contact": _Spec("SECURITY_CONTACT", _email, ""),
    "notify_group_wait": _Spec("NOTIFY_GROUP_WAIT", _positive(_F), "10"),
    "runbook_url": _Spec("RUNBOOK_URL", str, "docs/runbook.md"),
    "body_limit": _Spec("BODY_LIMIT", _positive(_I), str(10 * 1024 * 1024)),
    "request_budget": _Spec("REQUEST_BUDGET", _positive(_F), "5"),
    "http_timeout": _Spec("HTTP_TIMEOUT", _positive(_F), "5"),
    "concurrency": _Spec("CONCURRENCY", _positive(_I), "32"),
    "probe_schedule": _Spec("PROBE_SCHEDULE", _schedule, "0,2,5,15,30,60,120"),
    "probe_inconclusive_window": _Spec("PROBE_INCONCLUSIVE_WINDOW", _positive(_F), "600"),
    "revoke_retry_window": _Spec("REVOKE_RETRY_WINDOW", _positive(_F), "900"),
    "backoff_base": _Spec("BACKOFF_BASE", _positive(_F), "1"),
    "backoff_max": _Spec("BACKOFF_MAX", _positive(_F), "300"),
    "lease_seconds": _Spec("LEASE_SECONDS", _positive(_F), "30"),
    "keys_refresh_interval": _Spec("KEYS_REFRESH_INTERVAL", _positive(_F), "3600"),
    "retention_days": _Spec("RETENTION_DAYS", _positive(_F), "30"),
    "sweep_interval": _Spec("SWEEP_INTERVAL", _positive(_F), "3600"),
    "log_level": _Spec("LOG_LEVEL", str.upper, "INFO"),
    "log_format": _Spec("LOG_FORMAT", _log_format, "json"),
    "sentry_dsn": _Spec("SENTRY_DSN", str, "", secret=True),
    "sentry_environment": _Spec("SENTRY_ENVIRONMENT", str, "production"),
    "sentry_checkin_interval": _Spec("SENTRY_CHECKIN_INTERVAL", _positive(_F), "60"),
}

# Sentry's own variable names are standard; every other setting carries our prefix.
_UNPREFIXED = {"sentry_dsn", "sentry_environment"}


def env_name(field: str) -> str:
    spec = _SPECS[field]
    return spec.env if field in _UNPREFIXED else PREFIX + spec.env


@dataclass(frozen=True)
class Settings:
    database_url: str
    database_pool_size: int
    data_key: bytes | None
    github_keys_url: str | None
    github_token: str
    gitlab_keys_url: str | None
    depsdev_keys_url: str | None
    supermemory_api_url: str
    supermemory_admin_url: str | None
    supermemory_admin_token: str
    lookup_path: str
    revoke_path: str
    probe_path: str
    mode: str
    operator_tokens: dict[str, str]
    smtp_url: str | None
    mail_from: str | None
    security_contact: str | None
    notify_group_wait: float
    runbook_url: str
    body_limit: int
    request_budget: float
    http_timeout: float
    concurrency: int
    probe_schedule: tuple[float, ...]
    probe_inconclusive_window: float
    revoke_retry_window: float
    backoff_base: float
    backoff_max: float
    lease_seconds: float
    keys_refresh_interval: float
    retention_days: float
    sweep_interval: float
    log_level: str
    log_format: str
    sentry_dsn: str
    sentry_environment: str
    sentry_checkin_interval: float

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
        merged: dict[str, str] = {}
        if env_file is not None and env_file.is_file():
            merged.update(read_env_file(env_file))
        merged.update(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for field, spec in _SPECS.items():
            name = env_name(field)
            raw = merged.get(name, spec.default)
            if raw is None:
                raise SettingsError(name, "required")
            try:
                values[field] = spec.parse(raw.strip())
            except ValueError as exc:
                raise SettingsError(name, str(exc) or "malformed") from None
        settings = cls(**values)
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if not self.supermemory_admin_token and not _is_loopback(self.admin_url):
            raise SettingsError(
                env_name("supermemory_admin_token"),
                "required unless the admin URL is a local sandbox",
            )
        if self.sqlite_path is None and self.data_key is None:
            raise SettingsError(env_name("data_key"), "required with a PostgreSQL database")
        if self.smtp_url and not self.mail_from:
            raise SettingsError(env_name("mail_from"), "required when SMTP_URL is set")
        if not any((self.github_keys_url, self.gitlab_keys_url, self.depsdev_keys_url)):
            raise SettingsError(env_name("github_keys_url"), "at least one reporter must be enabled")

    def describe(self) -> list[tuple[str, str]]:
        """Every effective setting by its variable name, secrets masked, for `check-config`."""
        rows = []
        for f in fields(self):
            value = getattr(self, f.name)
            spec = _SPECS[f.name]
            if spec.secret:
                shown = "(set, masked)" if value else "(unset)"
            elif f.name == "operator_tokens":
                shown = ", ".join(sorted(value)) or "(none)"
            elif isinstance(value, tuple):
                shown = ",".join(f"{v:g}" for v in value)
            else:
                shown = "(unset)" if value in (None, "") else str(value)
            rows.append((env_name(f.name), shown))
        return rows


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
