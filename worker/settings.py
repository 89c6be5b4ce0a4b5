"""Jobcast's configuration: one typed object read from ``JOBCAST_*`` environment variables.

It is built once at the edge (the server's app factory, the worker's entry point, the CLI) and
passed in; nothing reads the environment anywhere else.

Two modes: ``production`` (the default) refuses to start without real secrets, so a forgotten
``JOBCAST_SECRET_KEY`` is a startup error and never a silently guessable default;
``development`` (what ``jobcast dev`` sets) fills them with local defaults.
"""

from __future__ import annotations

import base64
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .signatures import SecretFormatError, decode_secret

DEV_SECRET_KEY = "jobcast-development-secret-do-not-use-in-production"
DEV_API_KEYS = "dev:dev-key"
#: What ``jobcast dev`` signs webhooks with when no secret is set (README, Webhooks).
DEV_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"jobcast-development-webhook-key!").decode()
#: The Standard Webhooks schedule: seconds to wait before each retry after the first attempt.
STANDARD_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,50400,72000,86400"


#: The archive of the Procfile's processes when JOBCAST_ARCHIVE_URL is not set: a SQLite file in
#: the working directory (beside Redis's dump.rdb). Production sets a PostgreSQL URL.
DEFAULT_ARCHIVE_URL = "sqlite:///jobcast-archive.sqlite3"

#: What a tenant may be called: it becomes part of Redis keys and event messages.
TENANT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ConfigError(Exception):
    """The configuration is unusable; the message says which variable to set and how."""


def parse_pairs(raw: str, variable: str) -> list[tuple[str, str]]:
    """Parse ``"a:x,b:y"`` into ``[("a", "x"), ("b", "y")]`` (API keys, webhook secrets).

    A tenant may appear more than once (two keys during a rotation)."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(
                f"{variable}: entry {item!r} is not of the form 'tenant:value'; "
                f"write e.g. {variable}='tenant-a:secret-a,tenant-b:secret-b'."
            )
        pairs.append((name.strip(), value.strip()))
    return pairs


def parse_schedule(raw: str) -> list[float]:
    """``"5,300,1800"`` -> ``[5.0, 300.0, 1800.0]``: seconds before each retry; empty means no retry."""
    delays = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        try:
            delay = float(part)
        except ValueError:
            delay = -1.0
        if not 0 <= delay <= 7 * 24 * 3600:  # also false for NaN
            raise ValueError(
                f"JOBCAST_WEBHOOK_RETRY_SCHEDULE: {part!r} is not a number of seconds from 0 to 604800; "
                f"write the delays before each retry, comma separated, e.g. '{STANDARD_RETRY_SCHEDULE}'"
            )
        delays.append(delay)
    return delays


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBCAST_", extra="ignore")

    env: Literal["production", "development"] = "production"
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_keys: str = ""
    secret_key: str = ""
    job_modules: str = ""
    webhook_secret: str = ""
    webhook_secrets: str = ""
    webhook_allow_private: bool = False
    webhook_retry_schedule: str = STANDARD_RETRY_SCHEDULE
    submit_rate: str = ""
    max_queued: int = Field(default=100_000, ge=1)

    #: Seconds a job token stays valid, and a stream token.
    job_token_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    stream_token_ttl_s: int = Field(default=3600, ge=1)
    #: Seconds a finished job (record, event log, index entries) is kept: in Redis until it is
    #: archived, then in the archive, whose older rows are deleted in batches.
    retention_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: Where finished jobs go (SQLAlchemy-style URL): ``sqlite:///path`` (relative to the working
    #: directory; ``jobcast dev`` puts it in its data directory) or ``postgresql://user@host/db``.
    archive_url: str = DEFAULT_ARCHIVE_URL
    #: Seconds after it finished that a job moves from Redis to the archive (less than retention_s).
    archive_after_s: int = Field(default=3600, ge=0)
    #: Worker: jobs moved to the archive per batch (one SQL transaction, one eviction script call).
    archive_batch: int = Field(default=500, ge=1, le=10_000)
    #: Entries kept in one job's event log and in a tenant's event log (approximate trimming).
    job_log_max: int = Field(default=10_000, ge=100)
    tenant_log_max: int = Field(default=100_000, ge=1_000)

    #: At most this many of one tenant's jobs run at once, across all workers (0: no limit).
    tenant_concurrency: int = Field(default=0, ge=0)
    #: Worker: how many jobs one worker process runs at once.
    worker_concurrency: int = Field(default=10, ge=1)
    #: Worker: seconds between lease renewals of running jobs. A job whose lease (3 heartbeats)
    #: lapses is taken to have lost its worker and is retried or failed.
    heartbeat_s: float = Field(default=5.0, gt=0)
    #: Worker: seconds between sweeps for lapsed leases and due retries (an upper bound; due
    #: retries are promoted on time).
    maintenance_s: float = Field(default=2.0, gt=0)
    #: Worker: at most this many progress writes per second per job reach Redis.
    progress_rate: float = Field(default=4.0, gt=0)
    #: Worker: seconds running jobs get to finish after SIGTERM before they are handed back.
    shutdown_grace_s: int = Field(default=30, ge=0)

    #: Server: seconds between keep-alive comments on an idle event stream.
    sse_ping_s: float = Field(default=15.0, gt=0, le=15.0)
    #: Server: seconds one write to an event stream may take before the client is cut off.
    sse_send_timeout_s: float = Field(default=10.0, gt=0)

    #: Server: open event streams allowed in one server process (503 beyond).
    sse_max_streams: int = Field(default=20_000, ge=1)
    #: Open event streams allowed per tenant, across all server processes (429 beyond; 0: no cap).
    sse_max_streams_per_tenant: int = Field(default=10_000, ge=0)
    #: Webhooks: seconds one delivery attempt may take, everything included (resolving the host,
    #: connecting, sending, the answer's status and headers).
    webhook_timeout_s: float = Field(default=15.0, gt=0, le=300)
    #: Worker: deliveries one worker process makes at once, on their own queue beside the jobs.
    webhook_concurrency: int = Field(default=20, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: "text" for people, "json" (one object per line) for log pipelines.
    log_format: Literal["text", "json"] = "text"
    #: When set, GET /metrics requires "Authorization: Bearer <this>".
    metrics_token: str = ""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @model_validator(mode="after")
    def _require_secrets(self) -> Settings:
        if self.env == "development":
            self.secret_key = self.secret_key or DEV_SECRET_KEY
            self.api_keys = self.api_keys or DEV_API_KEYS
            if not self.webhook_secret and not self.webhook_secrets:
                self.webhook_secret = DEV_WEBHOOK_SECRET
        self.webhook_keys  # noqa: B018 - a malformed secret is a startup error, in every mode
        if self.archive_after_s >= self.retention_s:
            raise ConfigError(
                f"JOBCAST_ARCHIVE_AFTER_S ({self.archive_after_s}) must be less than JOBCAST_RETENTION_S "
                f"({self.retention_s}): a finished job would expire from Redis before it is archived. "
                "Lower JOBCAST_ARCHIVE_AFTER_S (default 3600) or raise JOBCAST_RETENTION_S."
            )
        if not self.archive_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError(
                f"JOBCAST_ARCHIVE_URL must start with sqlite:/// or postgresql://, not {self.archive_url[:40]!r}; "
                f"e.g. JOBCAST_ARCHIVE_URL='{DEFAULT_ARCHIVE_URL}' or "
                "JOBCAST_ARCHIVE_URL='postgresql://jobcast@db.internal/jobcast'."
            )
        return self

    def check_production(self) -> None:
        """Raise :class:`ConfigError` when production mode lacks what it cannot default."""
        if self.env != "production":
            return
        if len(self.secret_key) < 32:
            raise ConfigError(
                "JOBCAST_SECRET_KEY is missing or shorter than 32 characters; it signs job and stream "
                "tokens. Set it to a long random string, e.g. "
                "JOBCAST_SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))'), "
                "or run `jobcast dev` for a local development setup."
            )
        if not self.tenant_keys:
            raise ConfigError(
                "JOBCAST_API_KEYS is empty, so no client could authenticate. "
                "Set it to tenant:key pairs, e.g. JOBCAST_API_KEYS='acme:long-random-key'."
            )

    @property
    def tenant_keys(self) -> dict[str, str]:
        """API key -> tenant."""
        pairs = parse_pairs(self.api_keys, "JOBCAST_API_KEYS")
        for tenant, _ in pairs:
            if not TENANT_RE.fullmatch(tenant):
                raise ConfigError(
                    f"JOBCAST_API_KEYS: tenant name {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'."
                )
        return {key: tenant for tenant, key in pairs}

    @property
    def webhook_keys(self) -> dict[str | None, list[bytes]]:
        """Webhook signing keys by tenant (several during a rotation); ``None`` holds the fallback
        key of ``JOBCAST_WEBHOOK_SECRET``. Use :meth:`webhook_keys_for`."""
        keys: dict[str | None, list[bytes]] = {}
        sources: list[tuple[str | None, str, str]] = []
        if self.webhook_secret:
            sources.append((None, self.webhook_secret, "JOBCAST_WEBHOOK_SECRET"))
        for name, secret in parse_pairs(self.webhook_secrets, "JOBCAST_WEBHOOK_SECRETS"):
            sources.append((name, secret, f"JOBCAST_WEBHOOK_SECRETS (tenant {name!r})"))
        for tenant, secret, variable in sources:
            try:
                keys.setdefault(tenant, []).append(decode_secret(secret))
            except SecretFormatError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        return keys

    def webhook_keys_for(self, tenant: str) -> list[bytes]:
        """The keys that sign ``tenant``'s deliveries: its own, else the fallback; empty when neither is set."""
        keys = self.webhook_keys
        return keys.get(tenant) or keys.get(None) or []

    @property
    def webhook_retry_delays(self) -> list[float]:
        return parse_schedule(self.webhook_retry_schedule)

    @property
    def job_module_names(self) -> list[str]:
        return [name.strip() for name in self.job_modules.split(",") if name.strip()]
