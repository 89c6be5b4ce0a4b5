"""The ``report`` job type: the aggregation, its progress and cancellation, and the CSV rendering."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

import jobcast.worker.report as report_module
from jobcast.worker.report import (
    CATEGORIES,
    CSV_HEADER,
    GROUPS,
    REGIONS,
    ReportParams,
    ReportResult,
    build_report,
    render_csv,
)
from jobcast.worker.types import JobType


class Recorder:
    """A progress callback that keeps every call, and signals the first one."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str | None, str | None]] = []
        self.first = asyncio.Event()

    def __call__(self, percent: float, *, step: str | None = None, message: str | None = None) -> None:
        self.calls.append((percent, step, message))
        self.first.set()


async def report_of(rows: int, seed: int = 0, *, chunk_rows: int = report_module.CHUNK_ROWS) -> ReportResult:
    return await build_report(rows, seed, Recorder(), chunk_rows=chunk_rows)


def cents(amount: float) -> int:
    return int(Decimal(f"{amount:.2f}") * 100)


async def test_same_seed_gives_the_same_report() -> None:
    assert await report_of(50_000, seed=7) == await report_of(50_000, seed=7)


async def test_different_seeds_give_different_reports() -> None:
    first, second = await report_of(50_000, seed=7), await report_of(50_000, seed=8)
    assert first["groups"] != second["groups"]
    assert first["totals"]["revenue"] != second["totals"]["revenue"]


async def test_report_is_stable_across_releases() -> None:
    # The records are part of the contract: a seed must give the same report on every release.
    # 35,000 rows span four generator blocks.
    report = await report_of(35_000, seed=42)
    assert report["totals"] == {
        "count": 35_000,
        "quantity": 298_127,
        "revenue": 16_965_984.97,
        "average_price": 56.91,
    }


@pytest.mark.parametrize("chunk_rows", [1_000, 7_919, 10_000, 33_333, 250_000])
async def test_chunk_size_does_not_change_the_report(chunk_rows: int) -> None:
    # 7_919 and 33_333 cut through generator blocks; 250_000 is one chunk for the whole report.
    expected = await report_of(123_457, seed=3)
    assert await report_of(123_457, seed=3, chunk_rows=chunk_rows) == expected


async def test_counts_add_up_to_rows() -> None:
    report = await report_of(54_321, seed=1)
    assert report["rows"] == 54_321
    assert report["seed"] == 1
    assert sum(group["count"] for group in report["groups"]) == 54_321
    assert report["totals"]["count"] == 54_321


async def test_totals_are_the_sum_of_the_groups() -> None:
    report = await report_of(40_000, seed=5)
    groups, totals = report["groups"], report["totals"]
    assert totals["quantity"] == sum(group["quantity"] for group in groups)
    assert cents(totals["revenue"]) == sum(cents(group["revenue"]) for group in groups)


async def test_average_price_is_revenue_per_unit() -> None:
    report = await report_of(20_000, seed=9)
    for row in [*report["groups"], report["totals"]]:
        assert row["average_price"] == pytest.approx(row["revenue"] / row["quantity"], abs=0.005)


async def test_every_group_appears_once_in_region_then_category_order() -> None:
    report = await report_of(20_000)
    keys = [(group["region"], group["category"]) for group in report["groups"]]
    assert keys == [(region, category) for region in sorted(REGIONS) for category, _ in sorted(CATEGORIES)]
    assert len(keys) == GROUPS


async def test_a_tiny_report_leaves_out_empty_groups() -> None:
    report = await report_of(1, seed=11)
    assert len(report["groups"]) == 1
    group = report["groups"][0]
    assert group["count"] == 1
    assert group["revenue"] == pytest.approx(group["quantity"] * group["average_price"], abs=0.01)


async def test_result_survives_a_json_round_trip() -> None:
    report = await report_of(10_000, seed=2)
    assert json.loads(json.dumps(report)) == report


async def test_progress_is_monotonic_and_ends_at_100() -> None:
    recorder = Recorder()
    await build_report(25_000, 4, recorder, chunk_rows=10_000)
    percents = [percent for percent, _, _ in recorder.calls]
    assert percents == [40.0, 80.0, 100.0]
    assert recorder.calls[-1] == (100.0, "aggregating", "25,000 of 25,000 rows")


async def test_chunks_are_computed_off_the_event_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    aggregate = report_module._aggregate

    def spy(seed: int, start: int, stop: int) -> Any:
        threads.append(threading.get_ident())
        return aggregate(seed, start, stop)

    monkeypatch.setattr(report_module, "_aggregate", spy)
    await report_of(30_000, chunk_rows=10_000)
    assert len(threads) == 3
    assert threading.get_ident() not in threads


async def test_cancelling_stops_between_chunks() -> None:
    recorder = Recorder()
    task = asyncio.create_task(build_report(report_module.MAX_ROWS, 0, recorder))
    await asyncio.wait_for(recorder.first.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    reported = len(recorder.calls)
    await asyncio.sleep(0.2)  # a chunk takes tens of ms: long enough for a stray one to show up
    assert len(recorder.calls) == reported
    assert recorder.calls[-1][0] < 100


async def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await report_of(0)
    with pytest.raises(ValueError, match="at least 1"):
        await report_of(10, chunk_rows=0)


def test_params_bound_rows_and_default_the_seed() -> None:
    assert ReportParams(rows=1).seed == 0
    assert ReportParams(rows=10_000_000, seed=2**63 - 1).rows == 10_000_000
    for bad in ({"rows": 0}, {"rows": 10_000_001}, {}, {"rows": 5, "seed": -1}, {"rows": 5, "color": "red"}):
        with pytest.raises(ValidationError):
            ReportParams.model_validate(bad)


async def test_csv_parses_back_to_the_report() -> None:
    report = await report_of(30_000, seed=6)
    lines = list(csv.reader(io.StringIO(render_csv(json.loads(json.dumps(report))))))
    assert tuple(lines[0]) == CSV_HEADER
    assert len(lines) == 1 + len(report["groups"]) + 1
    for line, group in zip(lines[1:-1], report["groups"], strict=True):
        assert line[:4] == [group["region"], group["category"], str(group["count"]), str(group["quantity"])]
        assert Decimal(line[4]) == Decimal(f"{group['revenue']:.2f}")
        assert float(line[5]) == group["average_price"]
    totals = report["totals"]
    assert lines[-1][:4] == ["TOTAL", "", str(totals["count"]), str(totals["quantity"])]
    assert sum(Decimal(line[4]) for line in lines[1:-1]) == Decimal(lines[-1][4])


def test_csv_keeps_cents_and_quotes_what_needs_quoting() -> None:
    result = {
        "groups": [
            {
                "region": 'North, "East"',
                "category": "Toys",
                "count": 1,
                "quantity": 2,
                "revenue": 7.5,
                "average_price": 3.75,
            }
        ],
        "totals": {"count": 1, "quantity": 2, "revenue": 7.5, "average_price": 3.75},
    }
    text = render_csv(result)
    assert '"North, ""East""",Toys,1,2,7.50,3.75\r\n' in text
    assert text.endswith("TOTAL,,1,2,7.50,3.75\r\n")


def test_module_declares_exactly_the_report_job_type() -> None:
    declared = [value for value in vars(report_module).values() if isinstance(value, JobType)]
    assert [jt.name for jt in declared] == ["report"]
    (report,) = declared
    assert report.params is ReportParams
    assert report.csv is render_csv
    assert report.max_attempts == 3
    assert report.timeout_s >= 600
