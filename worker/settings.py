"""Jobcast's configuration: one typed object read from ``JOBCAST_*`` environment variables.

It is built once at the edge with :meth:`Settings.from_env` (every command: web, worker, dev, keys)
and passed in; nothing reads the environment anywhere else. Values that need parsing (API keys,
webhook secrets, the retry schedule) are parsed once, when the settings are validated, so a
malformed one is a start-up error and reading them later costs nothing.

The parsers of values that are more than a number are in :mod:`jobcast.worker.parsing`.

Two modes: ``production`` (the default) refuses to start without real secrets, so a forgotten
``JOBCAST_SECRET_KEY`` is a startup error and never a silently guessable default;
``development`` (what ``jobcast dev`` sets) fills them with local defaults.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .cells import Placement, parse_cell_list, parse_placement, parse_urls
from .parsing import (
    RATE_RE,
    STANDARD_RETRY_SCHEDULE,
    TENANT_RE,
    ConfigError,
    describe_invalid,
    parse_api_keys,
    parse_pairs,
    parse_rate,
    parse_schedule,
    parse_webhook_keys,
)
from .rates import Rate, parse_delivery_rate, parse_rates
from .signatures import SecretFormatError, decode_secret

#: Re-exported from :mod:`jobcast.worker.parsing`, where the value parsers live.
__all__ = [
    "RATE_RE",
    "STANDARD_RETRY_SCHEDULE",
    "TENANT_RE",
    "ConfigError",
    "Settings",
    "parse_pairs",
    "parse_rate",
    "parse_schedule",
]

DEV_SECRET_KEY = "jobcast-development-secret-do-not-use-in-production"
DEV_API_KEYS = "dev:dev-key"
#: What ``jobcast dev`` signs webhooks with when no secret is set (README, Webhooks).
DEV_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"jobcast-development-webhook-key!").decode()


#: The archive of the Procfile's processes when JOBCAST_ARCHIVE_URL is not set: a SQLite file in
#: the working directory (beside Redis's dump.rdb). Production sets a PostgreSQL URL.
DEFAULT_ARCHIVE_URL = "sqlite:///jobcast-archive.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBCAST_", extra="ignore")

    env: Literal["production", "development"] = "production"
    #: One cell's Redis; several cells: ``redis_urls`` (comma-separated, append-only), not both.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_urls: str = ""
    #: ``tenant=cell,...``: tenants placed by the operator instead of by the hash (worker.cells).
    cell_placement: str = ""
    #: Worker: the cells it serves (``0,2``; ``jobcast worker --cells``); empty: all of them.
    worker_cells: str = ""
    api_keys: str = ""
    secret_key: str = ""
    job_modules: str = ""
    webhook_secret: str = ""
    webhook_secrets: str = ""
    webhook_allow_private: bool = False
    webhook_retry_schedule: str = STANDARD_RETRY_SCHEDULE
    submit_rate: str = ""
    max_queued: int = Field(default=100_000, ge=1)
    #: Jobs one tenant may have queued (0: no share, only the global cap); unset, a tenth of
    #: ``max_queued`` (see :attr:`tenant_queue_share`).
    max_queued_per_tenant: int | None = Field(default=None, ge=0)

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

    #: Server: ``jobcast web`` server processes sharing the port (0: one per core in production,
    #: one in development).
    web_processes: int = Field(default=0, ge=0, le=256)
    #: Server: open event streams allowed in one server process (503 beyond).
    sse_max_streams: int = Field(default=20_000, ge=1)
    #: Open event streams allowed per tenant, across all server processes (429 beyond; 0: no cap).
    sse_max_streams_per_tenant: int = Field(default=10_000, ge=0)
    #: Server: seconds a client has to send a request head (request line and headers), from the
    #: connection's opening or the head's first byte; then the connection is closed.
    http_head_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Server: the largest request head accepted, in bytes (431 and closed beyond).
    http_max_head_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Server: channels one WebSocket (``GET /ws``) may be subscribed to at once.
    ws_max_subscriptions: int = Field(default=1_000, ge=1)
    #: Webhooks: seconds one delivery attempt may take, everything included (resolving the host,
    #: connecting, sending, the answer's status and headers).
    webhook_timeout_s: float = Field(default=15.0, gt=0, le=300)
    #: Worker: deliveries one worker process makes at once, on their own queue beside the jobs.
    webhook_concurrency: int = Field(default=20, ge=1)
    #: Webhooks: deliveries to one destination (scheme://host:port), N per S seconds, across all workers
    #: and cells (one cell keeps each destination's turns); the excess waits its turn. Per destination: JOBCAST_WEBHOOK_RATES='https://a.example=10/1,...'.
    webhook_rate: str = "50/1"
    webhook_rates: str = ""
    #: Webhooks: attempts in flight to one destination at once, across all workers.
    webhook_destination_concurrency: int = Field(default=5, ge=1)
    #: Webhooks: a destination with nothing but failures for this long is disabled for its tenant (0: never).
    webhook_disable_after_s: float = Field(default=5 * 24 * 3600, ge=0)
    #: The API's public base URL (https://jobs.example.com); webhook and alert links are absolute when set.
    public_url: str = ""

    #: Operator alerts are POSTed here (Slack-compatible "text" plus structured fields); empty: none.
    alert_webhook_url: str = ""
    #: Signs alerts like deliveries (whsec_...); JOBCAST_WEBHOOK_SECRET when empty.
    alert_webhook_secret: str = ""
    #: At most one alert per kind and tenant per this many seconds (resolutions are always sent).
    alert_window_s: float = Field(default=3600.0, gt=0)
    #: Seconds between evaluations of the alert conditions.
    alert_check_s: float = Field(default=15.0, gt=0)
    #: Alert when jobs wait and no worker has been alive for this many seconds.
    alert_no_worker_s: float = Field(default=120.0, gt=0)
    #: Alert when more than this many jobs stay queued for JOBCAST_ALERT_QUEUE_FOR_S (0: never).
    alert_queue_threshold: int = Field(default=10_000, ge=0)
    alert_queue_for_s: float = Field(default=300.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: "text" for people, "json" (one object per line) for log pipelines.
    log_format: Literal["text", "json"] = "text"
    #: When set, GET /metrics requires "Authorization: Bearer <this>".
    metrics_token: str = ""

    # Parsed once, by _parse (below).
    _tenant_keys: dict[str, str] = PrivateAttr(default_factory=dict)
    _webhook_keys: dict[str | None, list[bytes]] = PrivateAttr(default_factory=dict)
    _retry_delays: list[float] = PrivateAttr(default_factory=list)
    _submit_rate: tuple[int, float] | None = PrivateAttr(default=None)
    _webhook_rate: Rate = PrivateAttr(default=Rate(50, 1.0))
    _webhook_rates: dict[str, Rate] = PrivateAttr(default_factory=dict)
    _alert_keys: list[bytes] = PrivateAttr(default_factory=list)
    _cell_urls: list[str] = PrivateAttr(default_factory=list)
    _placement: Placement = PrivateAttr(default=Placement(1, {}))
    _worker_cells: list[int] | None = PrivateAttr(default=None)

    @classmethod
    def from_env(cls, *, require_secrets: bool = True, **overrides: Any) -> Settings:
        """The settings of ``JOBCAST_*`` (``overrides`` on top), checked as a process needs them:
        any problem is a :class:`ConfigError` whose message names the variable and how to fix it.

        ``require_secrets=False`` is for commands that only talk to Redis (``jobcast keys``): they
        need no token secret or API keys, even in production."""
        try:
            settings = cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(describe_invalid(exc)) from None
        if require_secrets:
            settings.check_production()
        return settings

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` applied and validated again, so parsed values follow it."""
        values = {**self.model_dump(), **(update or {})}
        if values["redis_urls"] and "redis_url" not in (update or {}):
            del values["redis_url"]  # its default, not a second setting beside the list
        return self.model_validate(values)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_schedule(value)
        return value

    @field_validator("public_url", "alert_webhook_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError(
                f"{value[:100]!r} is not an absolute http(s) URL without query, e.g. https://jobs.example.com"
            )
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _parse(self) -> Settings:
        if self.env == "development":
            self.secret_key = self.secret_key or DEV_SECRET_KEY
            self.api_keys = self.api_keys or DEV_API_KEYS
            if not self.webhook_secret and not self.webhook_secrets:
                self.webhook_secret = DEV_WEBHOOK_SECRET
        # A malformed key or secret is a start-up error, in every mode.
        self._tenant_keys = parse_api_keys(self.api_keys)
        self._webhook_keys = parse_webhook_keys(self.webhook_secret, self.webhook_secrets)
        self._retry_delays = parse_schedule(self.webhook_retry_schedule)
        self._submit_rate = parse_rate(self.submit_rate)
        try:
            self._webhook_rate = parse_delivery_rate(self.webhook_rate, "JOBCAST_WEBHOOK_RATE")
            self._webhook_rates = parse_rates(self.webhook_rates)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._alert_keys = self._parse_alert_keys()
        self._parse_cells()
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

    def _parse_cells(self) -> None:
        self._cell_urls = parse_urls(self.redis_url, self.redis_urls, url_set="redis_url" in self.model_fields_set)
        cells = len(self._cell_urls)
        self._placement = Placement(cells, parse_placement(self.cell_placement, cells))
        self._worker_cells = parse_cell_list(self.worker_cells, cells, "JOBCAST_WORKER_CELLS")

    def _parse_alert_keys(self) -> list[bytes]:
        if self.alert_webhook_secret:
            try:
                keys = [decode_secret(self.alert_webhook_secret)]
            except SecretFormatError as exc:
                raise ConfigError(f"JOBCAST_ALERT_WEBHOOK_SECRET: {exc}") from None
        else:
            keys = self._webhook_keys.get(None, [])
        if self.alert_webhook_url and not keys:
            raise ConfigError(
                "JOBCAST_ALERT_WEBHOOK_URL is set but nothing would sign the alerts: set "
                "JOBCAST_ALERT_WEBHOOK_SECRET='whsec_...' (or JOBCAST_WEBHOOK_SECRET)."
            )
        return keys

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
        return self._tenant_keys

    @property
    def webhook_keys(self) -> dict[str | None, list[bytes]]:
        """Webhook signing keys by tenant (several during a rotation); ``None`` holds the fallback
        key of ``JOBCAST_WEBHOOK_SECRET``. Use :meth:`webhook_keys_for`."""
        return self._webhook_keys

    def webhook_keys_for(self, tenant: str) -> list[bytes]:
        """The keys that sign ``tenant``'s deliveries: its own, else the fallback; empty when neither is set."""
        keys = self.webhook_keys
        return keys.get(tenant) or keys.get(None) or []

    @property
    def submit_rate_limit(self) -> tuple[int, float] | None:
        """(N, S) of ``JOBCAST_SUBMIT_RATE``: N submissions per S seconds per tenant; None: no limit."""
        return self._submit_rate

    @property
    def tenant_queue_share(self) -> int:
        """Jobs one tenant may have queued (0: no limit but the global one). By default a tenth of
        ``JOBCAST_MAX_QUEUED``: one tenant cannot fill the queue and lock every other out, and ten
        busy tenants still can use all of it."""
        if self.max_queued_per_tenant is not None:
            return self.max_queued_per_tenant
        return max(1, self.max_queued // 10)

    @property
    def webhook_retry_delays(self) -> list[float]:
        return self._retry_delays

    def webhook_rate_for(self, destination: str) -> Rate:
        """The rate of deliveries to ``destination``: its own (JOBCAST_WEBHOOK_RATES), else JOBCAST_WEBHOOK_RATE."""
        return self._webhook_rates.get(destination) or self._webhook_rate

    @property
    def webhook_rate_default(self) -> Rate:
        return self._webhook_rate

    @property
    def webhook_rate_overrides(self) -> dict[str, Rate]:
        return self._webhook_rates

    @property
    def alert_keys(self) -> list[bytes]:
        """What signs alerts: JOBCAST_ALERT_WEBHOOK_SECRET, else the fallback webhook secret."""
        return self._alert_keys

    @property
    def cell_urls(self) -> list[str]:
        """The Redis URL of each cell, by index (one: JOBCAST_REDIS_URL)."""
        return self._cell_urls

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def served_cells(self) -> list[int]:
        """Worker: the cells this worker serves (JOBCAST_WORKER_CELLS, by default all)."""
        return self._worker_cells if self._worker_cells is not None else list(range(len(self._cell_urls)))

    @property
    def job_module_names(self) -> list[str]:
        return [name.strip() for name in self.job_modules.split(",") if name.strip()]
