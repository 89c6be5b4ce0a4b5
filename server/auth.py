"""Who is asking: an API key (full access to its tenant) or a signed read-only token.

Credentials come as ``Authorization: Bearer <key or token>`` or, for tokens only, as ``?token=``
(EventSource cannot set headers; API keys never belong in URLs, which end up in logs).

API keys are compared by their SHA-256 digest, so lookup time does not depend on how much of a
guessed key is right.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from .problems import Forbidden, Unauthorized
from .tokens import InvalidToken, TokenSigner

Access = Literal["write", "read"]


@dataclass(frozen=True)
class Principal:
    tenant: str
    #: "key" (API key), "job" (job token), "stream" (stream token)
    kind: Literal["key", "job", "stream"]
    job_id: str | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    def __init__(self, api_keys: dict[str, str], signer: TokenSigner) -> None:
        self._keys = {_digest(key): tenant for key, tenant in api_keys.items()}
        self.signer = signer

    def _credential(self, request: Request) -> tuple[str, bool]:
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

    def authenticate(self, request: Request) -> Principal:
        credential, from_query = self._credential(request)
        tenant = None if from_query else self._keys.get(_digest(credential))
        if tenant is not None:
            return Principal(tenant, "key")
        try:
            token = self.signer.verify(credential)
        except InvalidToken as exc:
            hint = "" if from_query else " API keys are set by the operator in JOBCAST_API_KEYS."
            raise Unauthorized(
                f"The credential is not a valid API key or token ({exc}).{hint}",
                headers={"WWW-Authenticate": 'Bearer realm="jobcast", error="invalid_token"'},
            ) from None
        return Principal(token.tenant, token.scope, token.job_id)

    def require(self, request: Request, access: Access, *, job_id: str | None = None) -> Principal:
        """Authenticate and check scope: writes need an API key; reads accept a stream token,
        or a job token for its own job."""
        principal = self.authenticate(request)
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
