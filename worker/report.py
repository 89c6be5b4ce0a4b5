"""The ``report`` job type: real CPU work over synthetic sales records (docs/API.md, Built-in job types).

A report groups ``rows`` synthetic sales records by region x category and gives, per group and in
total, the number of records, units sold, revenue and the average unit price. The result is a small
JSON summary (at most 48 groups, whatever ``rows`` is) that :func:`render_csv` turns into the CSV
download behind ``GET /jobs/{id}/result`` with ``Accept: text/csv``.

Decisions that are not obvious from the code:

- **Records are a pure function of (seed, index).** Record ``i`` comes from block ``i // BLOCK_ROWS``,
  whose generator is ``random.Random`` seeded with ``(seed << 32) | block``. Chunks (the unit of
  work and of progress) may start and stop anywhere, so the chunk size never changes the report,
  and the Mersenne Twister stream for an integer seed is stable across Python versions, so a seed
  gives the same report on every release. Each record is one 64-bit word from ``randbytes``, cut
  into bit fields: cheaper than a ``randrange`` call per field (about 0.3 s per million rows here).
- **Money is integer cents** until the summary is built, so sums are exact and independent of
  the order of addition; the JSON carries currency units rounded to cents (exact in a float up to
  far beyond the largest possible total).
- **Chunks run in a thread** (``asyncio.to_thread``) so the event loop keeps serving heartbeats,
  progress writes and cancellation while a chunk is computed. Progress is reported on the loop
  between chunks, and cancellation lands at the next ``await``; a chunk already running in its
  thread finishes (tens of milliseconds) and its result is dropped.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from .context import JobContext
from .types import job_type

MAX_ROWS = 10_000_000
#: Rows per unit of work: one thread hop and one progress report each (about 30 ms of CPU).
CHUNK_ROWS = 100_000
#: Rows drawn from one seeded generator; part of the data definition, changing it changes reports.
BLOCK_ROWS = 10_000

# Alphabetical, so group index order (region-major) is also the report's sort order.
REGIONS = ("Africa", "Asia Pacific", "Europe", "Latin America", "Middle East", "North America")
#: Category and its typical unit price in cents; a record's price is 50%..150% of it.
CATEGORIES = (
    ("Books", 1_500),
    ("Clothing", 3_500),
    ("Electronics", 25_000),
    ("Garden", 4_500),
    ("Grocery", 800),
    ("Health", 2_000),
    ("Sports", 6_000),
    ("Toys", 2_500),
)
GROUPS = len(REGIONS) * len(CATEGORIES)
_BASE_PRICE = tuple(cents for _ in REGIONS for _, cents in CATEGORIES)

CSV_HEADER = ("region", "category", "count", "quantity", "revenue", "average_price")


class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: int = Field(ge=1, le=MAX_ROWS, description="Number of synthetic sales records to aggregate.")
    seed: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="Seed of the synthetic records: the same rows and seed always give the same report.",
    )


class GroupSummary(TypedDict):
    region: str
    category: str
    count: int
    quantity: int
    #: Currency units, rounded to cents.
    revenue: float
    #: Revenue per unit sold, rounded to cents.
    average_price: float


class Totals(TypedDict):
    count: int
    quantity: int
    revenue: float
    average_price: float


class ReportResult(TypedDict):
    rows: int
    seed: int
    groups: list[GroupSummary]
    totals: Totals


class ProgressCallback(Protocol):
    """What :func:`build_report` reports progress to; :meth:`JobContext.progress` is one."""

    def __call__(self, percent: float, *, step: str | None = None, message: str | None = None) -> None: ...


@dataclass
class _Sums:
    """Per-group sums, indexed by ``region * len(CATEGORIES) + category``."""

    count: list[int] = field(default_factory=lambda: [0] * GROUPS)
    quantity: list[int] = field(default_factory=lambda: [0] * GROUPS)
    revenue_cents: list[int] = field(default_factory=lambda: [0] * GROUPS)

    def add(self, other: _Sums) -> None:
        for mine, theirs in (
            (self.count, other.count),
            (self.quantity, other.quantity),
            (self.revenue_cents, other.revenue_cents),
        ):
            for g in range(GROUPS):
                mine[g] += theirs[g]


def _block_words(seed: int, block: int) -> array[int]:
    """The BLOCK_ROWS 64-bit words of one block: one word per record."""
    words = array("Q", random.Random((seed << 32) | block).randbytes(8 * BLOCK_ROWS))
    if sys.byteorder == "big":  # randbytes is little-endian; keep records identical everywhere
        words.byteswap()
    return words


def _aggregate(seed: int, start: int, stop: int) -> _Sums:
    """Sum records ``start`` (inclusive) to ``stop`` (exclusive). CPU-bound: runs in a thread."""
    sums = _Sums()
    count, quantity, revenue, base = sums.count, sums.quantity, sums.revenue_cents, _BASE_PRICE
    for block in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1):
        offset = block * BLOCK_ROWS
        words = _block_words(seed, block)[max(start - offset, 0) : min(stop - offset, BLOCK_ROWS)]
        for word in words:
            # Bits 32..63: group; 0..3: quantity 1..16; 4..13: price factor 512/1024..1535/1024.
            g = (word >> 32) % GROUPS
            units = (word & 15) + 1
            count[g] += 1
            quantity[g] += units
            revenue[g] += units * (base[g] * (512 + (word >> 4 & 1023)) >> 10)
    return sums


def _money(cents: int) -> float:
    return cents / 100


def _unit_price(revenue_cents: int, quantity: int) -> float:
    # Integer round-half-up to whole cents, so the figure does not depend on float division.
    return _money((2 * revenue_cents + quantity) // (2 * quantity))


def _summarise(rows: int, seed: int, sums: _Sums) -> ReportResult:
    groups: list[GroupSummary] = []
    for g in range(GROUPS):
        if not sums.count[g]:
            continue  # only tiny reports have empty groups; leave them out rather than carry nulls
        region, (category, _) = REGIONS[g // len(CATEGORIES)], CATEGORIES[g % len(CATEGORIES)]
        groups.append(
            GroupSummary(
                region=region,
                category=category,
                count=sums.count[g],
                quantity=sums.quantity[g],
                revenue=_money(sums.revenue_cents[g]),
                average_price=_unit_price(sums.revenue_cents[g], sums.quantity[g]),
            )
        )
    groups.sort(key=lambda group: (group["region"], group["category"]))
    quantity, revenue_cents = sum(sums.quantity), sum(sums.revenue_cents)
    totals = Totals(
        count=sum(sums.count),
        quantity=quantity,
        revenue=_money(revenue_cents),
        average_price=_unit_price(revenue_cents, quantity),
    )
    return ReportResult(rows=rows, seed=seed, groups=groups, totals=totals)


async def build_report(
    rows: int, seed: int, on_progress: ProgressCallback, *, chunk_rows: int = CHUNK_ROWS
) -> ReportResult:
    """Build the report over ``rows`` records from ``seed``, one chunk at a time in a thread.

    ``on_progress`` is called on the event loop after each chunk, ending with 100. ``chunk_rows``
    only changes how the work is cut up, never the report.
    """
    if rows < 1 or chunk_rows < 1:
        raise ValueError(f"rows and chunk_rows must be at least 1, got rows={rows}, chunk_rows={chunk_rows}")
    sums = _Sums()
    for start in range(0, rows, chunk_rows):
        done = min(start + chunk_rows, rows)
        sums.add(await asyncio.to_thread(_aggregate, seed, start, done))
        on_progress(100 * done / rows, step="aggregating", message=f"{done:,} of {rows:,} rows")
    return _summarise(rows, seed, sums)


def render_csv(result: Mapping[str, Any]) -> str:
    """The report as CSV: a header, one row per group, then a ``TOTAL`` row.

    Takes the result as stored (decoded JSON), so it relies only on the documented result shape.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for group in result["groups"]:
        writer.writerow(
            (
                group["region"],
                group["category"],
                group["count"],
                group["quantity"],
                f"{group['revenue']:.2f}",
                f"{group['average_price']:.2f}",
            )
        )
    totals = result["totals"]
    writer.writerow(
        (
            "TOTAL",
            "",
            totals["count"],
            totals["quantity"],
            f"{totals['revenue']:.2f}",
            f"{totals['average_price']:.2f}",
        )
    )
    return out.getvalue()


@job_type(
    "report",
    params=ReportParams,
    description=(
        "Builds a sales report (count, units, revenue and average price per region x category, "
        "and in total) over `rows` synthetic records made from `seed`, reporting progress per chunk. "
        "The result is also available as CSV."
    ),
    timeout_s=1800,
    max_attempts=3,
    csv=render_csv,
)
async def report(ctx: JobContext, params: ReportParams) -> ReportResult:
    return await build_report(params.rows, params.seed, ctx.progress)
