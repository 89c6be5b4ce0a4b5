"""Whether a submission's webhook can be accepted, and how it is stored on the job.

The URL is normalised (no fragment), bounded, free of credentials, with a valid host name that
resolves to public addresses only (the SSRF guard of :mod:`jobcast.worker.egress`, unless the
operator lifts it), and the tenant must have a signing secret. :class:`WebhookRejected` says which
part is wrong; the server answers it as a 422 (what the resolver answered stays in the log).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import egress
from .models import WebhookSpec
from .settings import Settings

logger = logging.getLogger("jobcast.worker.webhooks")

MAX_URL_LENGTH = 2048


class WebhookRejected(Exception):
    """A submission's webhook cannot be accepted; ``field`` is the part of it that is wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


async def accept_webhook(
    spec: WebhookSpec, tenant: str, settings: Settings, *, resolver: egress.Resolver = egress.resolve
) -> dict[str, Any]:
    """The webhook as it is stored on the job, or :class:`WebhookRejected` saying why not."""
    parts = urlsplit(str(spec.url))
    url = urlunsplit(parts._replace(fragment=""))
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRejected(f"The webhook URL is longer than {MAX_URL_LENGTH} characters.", field="url")
    if parts.username is not None or parts.password is not None:
        raise WebhookRejected(
            "The webhook URL must not carry credentials (user:password@); receivers authenticate "
            "deliveries by their webhook-signature header instead.",
            field="url",
        )
    try:
        (parts.hostname or "").encode("idna")
    except UnicodeError:
        raise WebhookRejected(
            f"The webhook URL's host {parts.hostname!r} is not a valid host name "
            "(each dot-separated label 1 to 63 characters).",
            field="url",
        ) from None
    if not settings.webhook_keys_for(tenant):
        raise WebhookRejected(
            f"Webhooks are not set up for tenant {tenant!r}: no signing secret is configured, so deliveries "
            f"could not be signed. The operator sets JOBCAST_WEBHOOK_SECRETS='{tenant}:whsec_...' (or "
            "JOBCAST_WEBHOOK_SECRET); until then, submit without 'webhook' and follow the job's events."
        )
    if not settings.webhook_allow_private:
        host = parts.hostname or ""
        try:
            await egress.check_destination(host, parts.port or default_port(parts.scheme), resolver=resolver)
        except egress.DestinationRefused as exc:
            # What this server's resolver answers for internal names is the operator's business:
            # the client is told the rule, the log says which address and why.
            logger.info("webhook of a submission by tenant %s refused: %s", tenant, exc)
            raise WebhookRejected(
                "The webhook URL is refused: its host is not, or does not resolve to, a public address. "
                "Deliveries go to public addresses only, so that a webhook cannot reach services inside "
                "the operator's network; use a publicly reachable URL (JOBCAST_WEBHOOK_ALLOW_PRIVATE=1 "
                "lifts this on development servers).",
                field="url",
            ) from None
    return {"url": url, "events": [event.value for event in dict.fromkeys(spec.events)]}


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
