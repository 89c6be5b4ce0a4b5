"""Standard Webhooks signatures, byte for byte (https://www.standardwebhooks.com).

A secret is written ``whsec_<base64 key>``; the signature of a delivery is
``v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>``. A tenant with several
secrets (during a rotation) gets one signature per secret, space separated, so a receiver that knows
either the old or the new secret accepts the delivery.

The reference ``standardwebhooks`` library verifies these in the tests; nothing here is tested
against itself only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"
#: The specification asks for keys of 24 to 64 bytes; shorter ones are refused.
MIN_KEY_BYTES = 24
EXAMPLE = "whsec_$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')"


class SecretFormatError(ValueError):
    """A webhook secret is not ``whsec_<base64 of 24+ bytes>``; the message says how to make one."""


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (padding optional, as the reference library allows)."""
    if not secret.startswith(PREFIX):
        raise SecretFormatError(f"a webhook secret must look like 'whsec_<base64>'; generate one with {EXAMPLE}")
    encoded = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretFormatError(f"the part after 'whsec_' is not base64; generate a secret with {EXAMPLE}") from None
    if len(key) < MIN_KEY_BYTES:
        raise SecretFormatError(
            f"a webhook secret must decode to at least {MIN_KEY_BYTES} bytes (this one has {len(key)}); "
            f"generate one with {EXAMPLE}"
        )
    return key


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<signature>`` per key, space separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)
