"""TokenSigner: signed, expiring, read-only credentials (server/tokens.py)."""

from __future__ import annotations

import base64
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobcast.tokens import PREFIX, InvalidToken, Token, TokenSigner

SECRET = "unit-test-secret-key-0123456789-abcdefghijkl"
JOB_ID = "job_01JD0000000000000000000000"


@pytest.fixture
def signer() -> TokenSigner:
    return TokenSigner(SECRET)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _flip(text: str, index: int) -> str:
    """``text`` with the base64url character at ``index`` replaced by a different one."""
    replacement = "B" if text[index] != "B" else "C"
    return text[:index] + replacement + text[index + 1 :]


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def test_job_token_round_trip(signer: TokenSigner) -> None:
    before = int(time.time())
    token, expires_at = signer.mint("job", "acme", 600, JOB_ID)
    assert token.startswith(PREFIX) and token.count(".") == 2
    assert before + 600 <= expires_at <= int(time.time()) + 600
    assert signer.verify(token) == Token(scope="job", tenant="acme", job_id=JOB_ID, expires_at=expires_at)


def test_stream_token_round_trip_has_no_job(signer: TokenSigner) -> None:
    token, expires_at = signer.mint("stream", "globex", 3600)
    assert signer.verify(token) == Token(scope="stream", tenant="globex", job_id=None, expires_at=expires_at)
    assert "j" not in _claims(token)


def test_payload_is_the_documented_compact_json(signer: TokenSigner) -> None:
    token, expires_at = signer.mint("job", "acme", 60, JOB_ID)
    assert _claims(token) == {"s": "job", "t": "acme", "e": expires_at, "j": JOB_ID}


def test_a_fresh_signer_with_the_same_secret_accepts_the_token(signer: TokenSigner) -> None:
    token, _ = signer.mint("job", "acme", 60, JOB_ID)
    assert TokenSigner(SECRET).verify(token).job_id == JOB_ID


def test_token_expires_at_its_expiry(signer: TokenSigner) -> None:
    token, expires_at = signer.mint("stream", "acme", 60)
    assert signer.verify(token, now=expires_at - 1).tenant == "acme"
    assert signer.verify(token, now=expires_at - 0.001).tenant == "acme"
    for later in (expires_at, expires_at + 0.5, expires_at + 86400):
        with pytest.raises(InvalidToken, match="expired"):
            signer.verify(token, now=later)


def test_token_minted_with_a_past_expiry_is_rejected_now(signer: TokenSigner) -> None:
    token, expires_at = signer.mint("job", "acme", -10, JOB_ID)
    assert expires_at < time.time()
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token)


@pytest.mark.parametrize("part", ["payload", "signature"])
def test_tampering_with_any_character_is_rejected(signer: TokenSigner, part: str) -> None:
    token, _ = signer.mint("job", "acme", 600, JOB_ID)
    prefix, payload, signature = token.split(".")
    target = payload if part == "payload" else signature
    for index in range(len(target)):
        tampered = _flip(target, index)
        forged = f"{prefix}.{tampered}.{signature}" if part == "payload" else f"{prefix}.{payload}.{tampered}"
        with pytest.raises(InvalidToken):
            signer.verify(forged)


def test_rewritten_claims_without_the_key_are_rejected(signer: TokenSigner) -> None:
    token, expires_at = signer.mint("job", "acme", 600, JOB_ID)
    signature = token.rsplit(".", 1)[1]
    for claims in (
        {"s": "stream", "t": "acme", "e": expires_at},  # widen a job token to the tenant
        {"s": "job", "t": "globex", "e": expires_at, "j": JOB_ID},  # another tenant
        {"s": "job", "t": "acme", "e": expires_at + 10**6, "j": JOB_ID},  # longer life
    ):
        forged = PREFIX + _b64(orjson.dumps(claims)) + "." + signature
        with pytest.raises(InvalidToken, match="bad signature"):
            signer.verify(forged)


def test_token_signed_with_another_key_is_rejected(signer: TokenSigner) -> None:
    other, _ = TokenSigner(SECRET + "-rotated").mint("job", "acme", 600, JOB_ID)
    with pytest.raises(InvalidToken, match="bad signature"):
        signer.verify(other)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "jc1.",
        "jc1..",
        "jc1.a.b.c",
        "jc2.abc.def",
        "Bearer jc1.abc.def",
        "key-acme",
    ],
)
def test_malformed_tokens_are_rejected(signer: TokenSigner, token: str) -> None:
    with pytest.raises(InvalidToken):
        signer.verify(token)


@pytest.mark.parametrize(
    "claims",
    [
        [],
        "text",
        {"s": "job", "t": "acme", "e": 4102444800},  # job token without its job
        {"s": "stream", "t": "acme", "e": 4102444800, "j": JOB_ID},  # stream token bound to a job
        {"s": "admin", "t": "acme", "e": 4102444800},
        {"s": "stream", "t": 42, "e": 4102444800},
        {"s": "stream", "t": "acme", "e": "soon"},
        {"s": "stream", "t": "acme"},
        {"s": "job", "t": "acme", "e": 4102444800, "j": 7},
    ],
)
def test_correctly_signed_but_malformed_claims_are_rejected(signer: TokenSigner, claims: object) -> None:
    signed_part = PREFIX + _b64(orjson.dumps(claims))
    with pytest.raises(InvalidToken, match="malformed"):
        signer.verify(signed_part + "." + signer._sign(signed_part))


@pytest.mark.parametrize(
    "token", ["jc1.a.\u00e9", "jc1.\u00e9t\u00e9.sig", "jc1.abc.\u2603", "jc1.\ud800.sig", "jc1.abc.\udfff"]
)
def test_non_ascii_tokens_are_rejected_as_invalid(signer: TokenSigner, token: str) -> None:
    # Non-ASCII text arrives from ?token= (percent-decoded) and Authorization headers (latin-1);
    # lone surrogates from Python callers (e.g. text decoded with errors="surrogateescape").
    with pytest.raises(InvalidToken):
        signer.verify(token)


_TOKEN_ALPHABET = st.characters(exclude_characters=".")
_token_like = st.builds(
    lambda payload, signature: f"{PREFIX}{payload}.{signature}",
    st.text(_TOKEN_ALPHABET, max_size=80),
    st.text(_TOKEN_ALPHABET, max_size=80),
)


@given(st.one_of(st.text(), _token_like))
def test_verify_on_arbitrary_text_only_ever_raises_invalid_token(text: str) -> None:
    signer = TokenSigner(SECRET)
    with pytest.raises(InvalidToken):
        signer.verify(text)


@given(st.binary(max_size=200))
def test_verify_on_signed_arbitrary_payload_bytes_only_ever_raises_invalid_token(payload: bytes) -> None:
    # Even with a valid signature (only the key holder can make one), a payload that is not the
    # documented claims object must be refused as InvalidToken, never crash the caller.
    signer = TokenSigner(SECRET)
    signed_part = PREFIX + _b64(payload)
    try:
        token = signer.verify(signed_part + "." + signer._sign(signed_part))
    except InvalidToken:
        return
    assert token.scope in ("job", "stream") and isinstance(token.tenant, str)
