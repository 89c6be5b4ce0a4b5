"""Property tests of the small parsers that face untrusted input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobcast.problems import BadRequest
from jobcast.requests import decode_cursor
from jobcast.streamids import order, parse
from jobcast.streamids import valid as valid_stream_id
from jobcast.worker.ids import is_job_id, new_job_id


@given(st.text(max_size=60))
def test_a_cursor_is_a_job_id_or_a_400(raw: str) -> None:
    try:
        assert decode_cursor(raw) == raw and is_job_id(raw)
    except BadRequest:
        assert not is_job_id(raw)


def test_real_job_ids_are_valid_cursors_and_sort_by_creation() -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert all(decode_cursor(i) == i for i in ids)
    assert ids == sorted(ids)


@given(st.text(max_size=50))
def test_last_event_ids_are_validated_before_use(raw: str) -> None:
    left, dash, right = raw.partition("-")
    well_formed = bool(dash) and all(p.isascii() and p.isdigit() and len(p) <= 20 for p in (left, right))
    assert valid_stream_id(raw) == well_formed
    if well_formed:
        assert parse(raw) == order(raw) == (int(left), int(right))


@given(st.integers(0, 2**63), st.integers(0, 2**63), st.integers(0, 2**63), st.integers(0, 2**63))
def test_stream_ids_order_numerically(a_ms: int, a_seq: int, b_ms: int, b_seq: int) -> None:
    a, b = f"{a_ms}-{a_seq}", f"{b_ms}-{b_seq}"
    assert (order(a) < order(b)) == ((a_ms, a_seq) < (b_ms, b_seq))


@pytest.mark.parametrize("raw", ["", "1", "1-", "-1", "a-1", "1-a", "1-2-3", "1 -2", "\u0661-\u0662"])
def test_malformed_stream_ids(raw: str) -> None:
    assert not valid_stream_id(raw)


@pytest.mark.parametrize("raw", ["1-2\n", "job_01M8M3Z1FT6N65KKCCWTA6289N\n"])
def test_a_trailing_newline_is_not_part_of_a_valid_id(raw: str) -> None:
    assert not valid_stream_id(raw)
    assert not is_job_id(raw)


@pytest.mark.parametrize(
    "raw", ["18446744073709551616-0", "0-18446744073709551616", "18446744073709551615-18446744073709551615"]
)
def test_stream_ids_beyond_what_redis_can_hold_are_invalid(raw: str) -> None:
    assert not valid_stream_id(raw)
    assert valid_stream_id("18446744073709551615-18446744073709551614")
