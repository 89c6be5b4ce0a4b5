"""API keys kept in Redis, hashed: created, listed and revoked with ``jobcast keys``.

They complement ``JOBCAST_API_KEYS`` (fixed at deploy time) with keys an operator can hand out and
take back while the system runs. A key reads ``jck_<key id>_<secret>``; Redis holds, per key id,
the tenant, a label, the creation time and the SHA-256 of the whole key — never the key itself,
which is shown once, at creation. Every request with such a key looks its id up (one HGET), so
a revocation takes effect at once in every server process: there is no cache to expire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import asdict, dataclass

import orjson
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.clock import now
from jobcast.worker.settings import TENANT_RE

PREFIX = "jck_"
KEY_RE = re.compile(r"jck_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")


class ApiKeyError(ValueError):
    """A key operation that cannot be done (unknown key id, bad tenant name)."""


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant: str
    name: str
    created_at: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, tenant: str, name: str = "") -> tuple[KeyInfo, str]:
        """A new key for ``tenant``: its description and the key itself (shown once)."""
        if not TENANT_RE.fullmatch(tenant):
            raise ApiKeyError(f"tenant {tenant!r} must be 1-64 letters, digits, '_', '.' or '-'")
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        info = KeyInfo(key_id, tenant, name, now()[0])
        record = orjson.dumps({**asdict(info), "digest": _digest(key)}).decode()
        await self.redis.hset(schema.API_KEYS, key_id, record)  # type: ignore[misc]
        return info, key

    async def list(self, tenant: str | None = None) -> list[KeyInfo]:
        stored = await self.redis.hgetall(schema.API_KEYS)  # type: ignore[misc]
        infos = []
        for raw in stored.values():
            fields = orjson.loads(raw)
            fields.pop("digest", None)
            infos.append(KeyInfo(**fields))
        return sorted((i for i in infos if tenant is None or i.tenant == tenant), key=lambda i: i.created_at)

    async def revoke(self, key_id: str) -> KeyInfo:
        raw = await self.redis.hget(schema.API_KEYS, key_id)  # type: ignore[misc]
        if raw is None or not await self.redis.hdel(schema.API_KEYS, key_id):  # type: ignore[misc]
            raise ApiKeyError(f"no API key with id {key_id!r}; `jobcast keys list` shows them")
        fields = orjson.loads(raw)
        fields.pop("digest", None)
        return KeyInfo(**fields)

    async def tenant_of_id(self, key_id: str) -> str | None:
        """The tenant of the stored key with this id, or None once it is revoked."""
        raw = await self.redis.hget(schema.API_KEYS, key_id)  # type: ignore[misc]
        return None if raw is None else str(orjson.loads(raw)["tenant"])

    async def tenant_for(self, key: str) -> str | None:
        """The tenant of a stored key, or None (unknown, revoked or not of this form)."""
        match = KEY_RE.fullmatch(key)
        if match is None:
            return None
        raw = await self.redis.hget(schema.API_KEYS, match[1])  # type: ignore[misc]
        if raw is None:
            return None
        fields = orjson.loads(raw)
        if not hmac.compare_digest(fields["digest"], _digest(key)):
            return None
        return str(fields["tenant"])
