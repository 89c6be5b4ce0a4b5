"""Who is asking: an API key (full access to its tenant) or a signed read-only token.

Credentials come as ``Authorization: Bearer <key or token>`` or, for tokens only, as ``?token=``
(EventSource cannot set headers; API keys never belong in URLs, which end up in logs).

API keys come from ``JOBCAST_API_KEYS`` (compared by their SHA-256 digest, so lookup time does not
depend on how much of a guessed key is right) or from Redis (:mod:`jobcast.keys`, looked up on every
request so that a revocation holds at once). A token names the API key it was minted with and is
refused once that key is revoked or removed from the configuration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from starlette.requests import HTTPConnection

from .keys import PREFIX as KEY_PREFIX
from .keys import ApiKeys
from .problems import Forbidden, Unauthorized
from .tokens import InvalidToken, Scope, TokenSigner

Access = Literal["write", "read"]


@dataclass(frozen=True)
class Principal:
    tenant: str
    #: "key" (API key), "job" (job token), "stream" (stream token)
    kind: Literal["key", "job", "stream"]
    job_id: str | None = None
    #: The API key, as tokens name it (``jck:<id>`` or ``env:<hmac>``, see jobcast.tokens): for an
    #: API key, the one presented; for a token, the one it was minted with.
    key_ref: str | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    def __init__(self, api_keys: dict[str, str], signer: TokenSigner, stored_keys: ApiKeys) -> None:
        self._keys = {_digest(key): (tenant, signer.key_ref(key)) for key, tenant in api_keys.items()}
        self._key_refs = {ref: tenant for tenant, ref in self._keys.values()}
        self.signer = signer
        self.stored_keys = stored_keys

    def mint(self, principal: Principal, scope: Scope, ttl_s: int, job_id: str | None = None) -> tuple[str, int]:
        """A token for ``principal`` (an API key), which stops working when that key is revoked."""
        return self.signer.mint(scope, principal.tenant, ttl_s, job_id, key=principal.key_ref)

    async def _key_still_valid(self, key_ref: str, tenant: str) -> bool:
        kind, _, ident = key_ref.partition(":")
        if kind == "jck":
            return await self.stored_keys.tenant_of_id(ident) == tenant
        return self._key_refs.get(key_ref) == tenant

    def _credential(self, request: HTTPConnection) -> tuple[str, bool]:
        """The presented credential and whether it came from the query string."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized(
                    "The Authorization header must be 'Bearer <api key or token>'.",
                )
            return value.strip(), False
        token = request.query_params.get("token")
        if token:
            return token, True
        raise Unauthorized("No credentials: send 'Authorization: Bearer <api key>' (or ?token=<token> for reads).")

    async def authenticate(self, request: HTTPConnection) -> Principal:
        credential, from_query = self._credential(request)
        if not from_query:
            configured = self._keys.get(_digest(credential))
            if configured is not None:
                return Principal(configured[0], "key", key_ref=configured[1])
            if credential.startswith(KEY_PREFIX):
                tenant = await self.stored_keys.tenant_for(credential)
                if tenant is not None:
                    return Principal(tenant, "key", key_ref=f"jck:{credential.split('_')[1]}")
        try:
            token = self.signer.verify(credential)
        except InvalidToken as exc:
            hint = "" if from_query else " API keys are set by the operator in JOBCAST_API_KEYS."
            raise Unauthorized(
                f"The credential is not a valid API key or token ({exc}).{hint}",
                headers={"WWW-Authenticate": 'Bearer realm="jobcast", error="invalid_token"'},
            ) from None
        if token.key is not None and not await self._key_still_valid(token.key, token.tenant):
            raise Unauthorized(
                "This token was minted with an API key that has since been revoked; get a new token with a "
                "current API key.",
                headers={"WWW-Authenticate": 'Bearer realm="jobcast", error="invalid_token"'},
            )
        return Principal(token.tenant, token.scope, token.job_id, key_ref=token.key)

    async def require(self, request: HTTPConnection, access: Access, *, job_id: str | None = None) -> Principal:
        """Authenticate and check scope: writes need an API key; reads accept a stream token,
        or a job token for its own job."""
        principal = await self.authenticate(request)
        if principal.kind == "key":
            return principal
        if access == "write":
            raise Forbidden("This token is read-only; this operation needs 'Authorization: Bearer <api key>'.")
        if principal.kind == "job" and principal.job_id != job_id:
            raise Forbidden(
                "This job token is valid only for its own job "
                f"({principal.job_id}); use an API key or a stream token for other resources."
            )
        return principal
