"""Signed, expiring, read-only credentials (docs/API.md, Authentication).

- a **job token** reads one job (``GET /jobs/{id}``, its events, its result);
- a **stream token** reads all of one tenant's jobs and its feed (``GET /events``).

Format: ``jc1.<payload>.<signature>``, both unpadded base64url; the payload is compact JSON
``{"s": "job"|"stream", "t": tenant, "j": job id (job tokens), "e": expiry (Unix seconds),
"k": the API key it was minted with}`` and the signature HMAC-SHA256 over ``jc1.<payload>`` with
``JOBCAST_SECRET_KEY``. Tokens outlive sessions and server restarts; rotating the secret key revokes
them all, and revoking (or removing) the API key a token was minted with revokes that token
(:class:`jobcast.auth.Authenticator` checks ``k`` on every use).

``k`` names the key without revealing it (the payload is readable by whoever holds the token):
``jck:<key id>`` for a stored key (ids are not secret), ``env:<HMAC of the key>`` for a key of
``JOBCAST_API_KEYS`` (:meth:`TokenSigner.key_ref`, keyed by the secret key, so not a hash anyone
could test guesses against). Tokens minted before ``k`` existed carry none and stay valid until
they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Literal

import orjson

PREFIX = "jc1."
Scope = Literal["job", "stream"]


class InvalidToken(ValueError):
    """The token is malformed, tampered with, signed with another key, or expired."""


@dataclass(frozen=True)
class Token:
    scope: Scope
    tenant: str
    job_id: str | None
    expires_at: int
    #: The API key it was minted with (see the module docstring); None for tokens older than that.
    key: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret_key: str) -> None:
        self._key = hashlib.sha256(b"jobcast-tokens:" + secret_key.encode()).digest()

    def _sign(self, signed_part: str) -> str:
        return _b64(hmac.new(self._key, signed_part.encode(), hashlib.sha256).digest())

    def key_ref(self, api_key: str) -> str:
        """How a token names a configured API key: an HMAC of it, short, and keyed by the secret key."""
        return "env:" + _b64(hmac.new(self._key, b"api-key:" + api_key.encode(), hashlib.sha256).digest()[:12])

    def mint(
        self, scope: Scope, tenant: str, ttl_s: int, job_id: str | None = None, *, key: str | None = None
    ) -> tuple[str, int]:
        """A new token and its expiry (Unix seconds); ``key`` names the API key it is minted with."""
        expires_at = int(time.time()) + ttl_s
        claims: dict[str, object] = {"s": scope, "t": tenant, "e": expires_at}
        if job_id is not None:
            claims["j"] = job_id
        if key is not None:
            claims["k"] = key
        signed_part = PREFIX + _b64(orjson.dumps(claims))
        return signed_part + "." + self._sign(signed_part), expires_at

    def verify(self, token: str, *, now: float | None = None) -> Token:
        if not token.isascii() or not token.startswith(PREFIX) or token.count(".") != 2:
            raise InvalidToken("not a Jobcast token")
        signed_part, _, signature = token.rpartition(".")
        if not hmac.compare_digest(self._sign(signed_part).encode(), signature.encode()):
            raise InvalidToken("bad signature")
        try:
            claims = orjson.loads(_unb64(signed_part[len(PREFIX) :]))
            scope, tenant, expires_at = claims["s"], claims["t"], int(claims["e"])
            job_id, key = claims.get("j"), claims.get("k")
        except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidToken("malformed payload") from exc
        if scope not in ("job", "stream") or not isinstance(tenant, str) or (scope == "job") != isinstance(job_id, str):
            raise InvalidToken("malformed claims")
        if key is not None and not isinstance(key, str):
            raise InvalidToken("malformed claims")
        if expires_at <= (time.time() if now is None else now):
            raise InvalidToken("expired")
        return Token(scope, tenant, job_id, expires_at, key)
