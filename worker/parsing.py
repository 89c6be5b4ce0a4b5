"""Parsers of the ``JOBCAST_*`` values that are more than a number: tenant:value pairs (API keys,
webhook secrets), retry schedules, rates. :class:`jobcast.worker.settings.Settings` runs them once,
when it is validated; each raises :class:`ConfigError` saying which variable is wrong and how to
write it.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from .signatures import SecretFormatError, decode_secret

#: The Standard Webhooks schedule: seconds to wait before each retry after the first attempt.
STANDARD_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,50400,72000,86400"

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


#: ``N/S``: N events per S seconds (rates of JOBCAST_SUBMIT_RATE and the like).
RATE_RE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*")


def parse_rate(raw: str, variable: str = "JOBCAST_SUBMIT_RATE") -> tuple[int, float] | None:
    """``"N/S"`` -> (N, S); empty -> None (no limit). Raises ConfigError otherwise."""
    if not raw.strip():
        return None
    match = RATE_RE.fullmatch(raw)
    if match is None or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ConfigError(
            f"{variable}={raw!r} is not of the form N/S with N >= 1 and S > 0 "
            "(e.g. '100/60' for 100 submissions a minute per tenant), or empty for no limit."
        )
    return int(match[1]), float(match[2])


def parse_api_keys(raw: str) -> dict[str, str]:
    pairs = parse_pairs(raw, "JOBCAST_API_KEYS")
    for tenant, _ in pairs:
        if not TENANT_RE.fullmatch(tenant):
            raise ConfigError(
                f"JOBCAST_API_KEYS: tenant name {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'."
            )
    tenants: dict[str, str] = {}
    for tenant, key in pairs:
        other = tenants.setdefault(key, tenant)
        if other != tenant:
            # Which tenant would win is an accident of order: refuse rather than guess.
            raise ConfigError(
                f"JOBCAST_API_KEYS lists the same key for tenants {other!r} and {tenant!r}; "
                "a key belongs to one tenant. Give each tenant its own key."
            )
    return tenants


def parse_webhook_keys(secret: str, secrets: str) -> dict[str | None, list[bytes]]:
    keys: dict[str | None, list[bytes]] = {}
    sources: list[tuple[str | None, str, str]] = []
    if secret:
        sources.append((None, secret, "JOBCAST_WEBHOOK_SECRET"))
    for name, value in parse_pairs(secrets, "JOBCAST_WEBHOOK_SECRETS"):
        sources.append((name, value, f"JOBCAST_WEBHOOK_SECRETS (tenant {name!r})"))
    for tenant, value, variable in sources:
        try:
            keys.setdefault(tenant, []).append(decode_secret(value))
        except SecretFormatError as exc:
            raise ConfigError(f"{variable}: {exc}") from None
    return keys


def describe_invalid(exc: ValidationError) -> str:
    """One line per invalid variable, naming it as it is set: ``JOBCAST_MAX_QUEUED: ...``."""
    lines = []
    for error in exc.errors()[:5]:
        name = "JOBCAST_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "JOBCAST_*"
        lines.append(f"{name}: {error['msg']}")
    return "invalid setting: " + "; ".join(lines)
