"""Configuration from ``BILLING_*`` environment variables (pydantic-settings).

:func:`load_settings` is the one entry point: a bad value raises :class:`ConfigError` whose
message is a single line naming the variable, e.g.
``BILLING_PARTITIONS: Input should be greater than or equal to 1 (got '0')``. Values of URL
settings are never echoed (they may carry passwords).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import ConfigError
from worker.limits import (
    DEFAULT_CREDIT_TTL_SECONDS,
    DEFAULT_MAX_CREDIT_BALANCE,
    MAX_SAFE_INTEGER,
)

ENV_PREFIX = "BILLING_"
#: Schemes the state Redis client (redis-py) accepts; broker and backend are left to Celery.
_URL_SCHEMES: dict[str, tuple[str, ...]] = {"redis_url": ("redis", "rediss", "unix")}
_ENV_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SECRET_FIELDS = frozenset({"redis_url", "broker_url", "result_backend"})


class Settings(BaseSettings):
    """Every knob of the worker, CLI and beat. Units are in the field names."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    #: Environment name; namespaces every Redis key and the WAL directory (``[A-Za-z0-9_-]``).
    env: str = "dev"
    #: State Redis (fencing and credit). Not the broker.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Celery broker (``redis://`` or ``amqp://``).
    broker_url: str = "redis://127.0.0.1:6379/1"
    #: Celery result backend.
    result_backend: str = "redis://127.0.0.1:6379/2"
    #: Root of the write-ahead log: ``<wal_dir>/<env>/p<NN>/``.
    wal_dir: Path = Path("var/wal")
    #: Number of WAL partitions (and writer leases) per environment. Fixed once used.
    partitions: int = Field(default=8, ge=1, le=1024)
    #: Per-wallet credit cap, base units.
    max_credit_balance: int = Field(default=DEFAULT_MAX_CREDIT_BALANCE, ge=0, le=MAX_SAFE_INTEGER)
    #: TTL of balances, notes and consumption markers, seconds.
    credit_ttl_seconds: int = Field(default=DEFAULT_CREDIT_TTL_SECONDS, ge=1, le=10 * 365 * 86400)
    #: Writer lease lifetime, milliseconds.
    lease_ttl_ms: int = Field(default=10_000, ge=100, le=3_600_000)
    #: Connect and read timeout of the state Redis, milliseconds.
    redis_timeout_ms: int = Field(default=1_000, ge=10, le=60_000)
    #: Cap of the jittered retry backoff for STALE/CORRUPT, seconds (below the visibility timeout).
    retry_max_s: float = Field(default=30.0, gt=0, le=3600)
    #: Broker visibility timeout (Redis/SQS brokers), seconds: unacked messages come back after it.
    visibility_timeout_s: int = Field(default=300, ge=10, le=43_200)
    #: WAL segment rotation size, bytes.
    wal_segment_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, le=1 << 40)
    #: ``always``: fsync every append (a batch append fsyncs once); ``off``: leave it to the OS.
    wal_fsync: Literal["always", "off"] = "always"
    #: Prometheus metrics port of the worker (0 disables the endpoint).
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    #: Consecutive connection failures that open the state-Redis circuit breaker.
    breaker_failures: int = Field(default=3, ge=1, le=1000)
    #: How long the breaker stays open before a half-open probe, milliseconds.
    breaker_reset_ms: int = Field(default=2_000, ge=10, le=600_000)
    #: Most messages a pool process hands to the pipeline at once (1: one task per message). A
    #: message is handed over at once when a process is idle; batches form only under load.
    batch_size: int = Field(default=50, ge=1, le=10_000)
    #: Backstop timer of the batch consumer, milliseconds (only with ``batch_size`` > 1).
    batch_flush_ms: int = Field(default=20, ge=1, le=60_000)

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        # Messages here never quote the value: it may hold a password (see _one_line).
        schemes = _URL_SCHEMES.get(info.field_name or "")
        problem = url_problem(value, schemes)
        if problem is not None:
            raise ValueError(f"{problem} (the value is not shown: it may hold a password)")
        return value

    @field_validator("env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise ValueError("must be 1-32 characters of [A-Za-z0-9_-]")
        return value

    @model_validator(mode="after")
    def _retry_below_visibility(self) -> Settings:
        if self.retry_max_s >= self.visibility_timeout_s:
            raise ValueError(
                "retry_max_s must stay below visibility_timeout_s "
                f"({self.retry_max_s} >= {self.visibility_timeout_s})"
            )
        return self

    @property
    def env_wal_dir(self) -> Path:
        """This environment's WAL directory."""
        return self.wal_dir / self.env


def url_problem(url: str, schemes: tuple[str, ...] | None = None) -> str | None:
    """Why ``url`` is not a usable connection URL, in words that never quote it; ``None`` if fine.

    Catches what would otherwise fail later with a library error quoting part of the URL (a bad
    port, an unencoded ``/``, ``?`` or ``#`` in the password that makes it part of the host, path
    or fragment) and what a redaction could not mask (an ``@`` outside the user-info part)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "not a valid URL (a port that is not a number, or an unencoded reserved character)"
    if not parts.scheme or "://" not in url:
        return "not a URL (expected scheme://...)"
    if schemes is not None and parts.scheme not in schemes:
        return f"scheme must be one of {', '.join(s + '://' for s in schemes)}"
    if "@" in url.split("://", 1)[1] and "@" not in parts.netloc:
        return "has an '@' outside the user:password@ part (percent-encode '/', '?', '#', '@' in passwords)"
    return None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first.get("loc") or ()
    field = str(loc[0]) if loc else ""
    name = f"{ENV_PREFIX}{field.upper()}" if field else f"{ENV_PREFIX}*"
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if field and field not in _SECRET_FIELDS and "input" in first:
        return f"{name}: {message} (got {first['input']!r})"
    return f"{name}: {message}"


def load_settings() -> Settings:
    """Read the settings from the environment; raise :class:`ConfigError` (one line) if bad."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests that change the environment call ``cache_clear``."""
    return load_settings()
