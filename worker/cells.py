"""Cells: several independent Redis deployments, each holding whole tenants.

``JOBCAST_REDIS_URLS`` lists the cells, comma-separated; a cell's index is its place in the list.
``JOBCAST_REDIS_URL`` is the one-cell form. A cell is everything Jobcast keeps in Redis for its
tenants — records, logs, indexes, its own arq queue, webhook queue, counters and worker registry —
so a transition never spans two cells and each cell is one Redis's CPU and one pub/sub firehose.

**Where a tenant lives** (:class:`Placement`): its override in ``JOBCAST_CELL_PLACEMENT``
(``bigcorp=2,acme=0``) when it has one, else the jump consistent hash (Lamping & Veach, 2014) of
the first 8 bytes of SHA-256 of its name over the number of cells. Jump hash moves the fewest
tenants when a cell is appended (about 1/N of them, all to the new cell) and none when the list is
unchanged; it is why the list is **append-only**: reordering or removing a cell re-homes tenants and
orphans the jobs of the removed one. ``jobcast cells`` prints each known tenant's cell and the
override line that pins them all before a cell is added (docs/design/cells.md).

**Where a job lives**: the cell its id names (:func:`jobcast.worker.ids.cell_of`), which is its
tenant's cell when it was made, so a tenant moved by an override still finds its older jobs.

**A reordered list is caught**: each Redis remembers the index it was first used as
(``schema.CELL_INDEX``), and ``jobcast web`` and ``jobcast worker`` refuse to start when a cell's
Redis says another index (:func:`jobcast.cli.cells.check_cells`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .ids import MAX_CELLS, cell_of, is_job_id
from .parsing import TENANT_RE, ConfigError


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket (0..buckets-1) of the 64-bit ``key``."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def tenant_hash(tenant: str) -> int:
    return int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:8], "big")


def parse_urls(redis_url: str, redis_urls: str, *, url_set: bool) -> list[str]:
    """The cells' URLs, from ``JOBCAST_REDIS_URLS`` or else ``JOBCAST_REDIS_URL`` (``url_set``: it
    was given explicitly; both at once is refused, as it could only mean a mistake)."""
    if not redis_urls.strip():
        return [redis_url]
    if url_set:
        raise ConfigError(
            "JOBCAST_REDIS_URL and JOBCAST_REDIS_URLS are both set; set one: JOBCAST_REDIS_URL for one "
            "Redis, or JOBCAST_REDIS_URLS='redis://a:6379/0,redis://b:6379/0' for several cells."
        )
    urls = _split_urls(redis_urls)
    if any(not url for url in urls):
        raise ConfigError(
            "JOBCAST_REDIS_URLS has an empty entry; list the cells' URLs separated by commas, e.g. "
            "JOBCAST_REDIS_URLS='redis://a:6379/0,redis://b:6379/0'."
        )
    if len(set(urls)) != len(urls):
        raise ConfigError("JOBCAST_REDIS_URLS names the same Redis twice; each cell is a Redis of its own.")
    if len(urls) > MAX_CELLS:
        raise ConfigError(f"JOBCAST_REDIS_URLS lists {len(urls)} cells; at most {MAX_CELLS} are supported.")
    return urls


def _split_urls(value: str) -> list[str]:
    """The comma-separated URLs of ``value``. A ``redis+sentinel://`` URL lists its sentinels with
    commas itself (``redis+sentinel://s1:26379,s2:26379/name``): a piece with no ``://`` of its own
    continues the URL before it."""
    urls: list[str] = []
    for piece in value.split(","):
        if urls and urls[-1] and piece.strip() and "://" not in piece:
            urls[-1] += "," + piece.strip()
        else:
            urls.append(piece.strip())
    return urls


def parse_placement(value: str, cells: int) -> dict[str, int]:
    """``tenant=cell,...`` of ``JOBCAST_CELL_PLACEMENT``; a cell that does not exist is refused."""
    placement: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        tenant, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not TENANT_RE.fullmatch(tenant) or not raw.isdigit():
            raise ConfigError(
                f"JOBCAST_CELL_PLACEMENT entry {item[:80]!r} is not tenant=cell; e.g. "
                "JOBCAST_CELL_PLACEMENT='bigcorp=2,acme=0'."
            )
        if int(raw) >= cells:
            raise ConfigError(
                f"JOBCAST_CELL_PLACEMENT places {tenant!r} in cell {raw}, but there are {cells} cell(s) "
                f"(0..{cells - 1}, the order of JOBCAST_REDIS_URLS). Fix the entry or add the cell."
            )
        if tenant in placement:
            raise ConfigError(f"JOBCAST_CELL_PLACEMENT places {tenant!r} twice; keep one entry.")
        placement[tenant] = int(raw)
    return placement


def parse_cell_list(value: str, cells: int, what: str) -> list[int] | None:
    """``0,2`` (``jobcast worker --cells`` / ``JOBCAST_WORKER_CELLS``): the cells to serve; None: all."""
    if not value.strip():
        return None
    chosen: list[int] = []
    for raw in (part.strip() for part in value.split(",")):
        if not raw.isdigit() or int(raw) >= cells:
            raise ConfigError(
                f"{what} names cell {raw[:20]!r}, but the cells are 0..{cells - 1} (the order of "
                "JOBCAST_REDIS_URLS); e.g. 0,2."
            )
        if int(raw) not in chosen:
            chosen.append(int(raw))
    return chosen


@dataclass(frozen=True)
class Placement:
    """Which cell a tenant, and a job, lives in."""

    cells: int
    overrides: Mapping[str, int]

    def tenant_cell(self, tenant: str) -> int:
        override = self.overrides.get(tenant)
        return override if override is not None else jump_hash(tenant_hash(tenant), self.cells)

    def job_cell(self, job_id: str) -> int | None:
        """The cell job ``job_id`` lives in; None when it is not a job id.

        An id naming a cell that does not exist was not made here, or was made before cells (random
        characters where the cell goes): it is looked for in cell 0, the Redis of a deployment that
        had one, and so in the archive, and is a 404 when it is in neither."""
        if not is_job_id(job_id):
            return None
        cell = cell_of(job_id, self.cells)
        return cell if cell < self.cells else 0

    def pinning_line(self, tenants: Iterable[str]) -> str:
        """The ``JOBCAST_CELL_PLACEMENT`` value that keeps every one of ``tenants`` where it is now
        (the current overrides included), whatever the number of cells becomes."""
        pinned = {tenant: self.tenant_cell(tenant) for tenant in tenants}
        pinned.update(self.overrides)
        return ",".join(f"{tenant}={cell}" for tenant, cell in sorted(pinned.items()))
