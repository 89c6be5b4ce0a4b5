"""The arq seam (worker/doorbell.py): what Jobcast relies on inside arq, checked against arq itself.

arq offers no public hook for how a worker picks jobs up, so ``DoorbellWorker`` overrides and calls
some of its internals, and Jobcast's Lua writes arq's queue entries in arq's own format. These tests
fail loudly when an arq upgrade changes any of them: re-read each changed function against what
``ARQ_INTERNALS`` says Jobcast does with it (docs/DESIGN.md, "The arq seam"), adapt doorbell.py, and
then record the new fingerprints here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import tomllib
from pathlib import Path

import arq.constants
import arq.jobs
import arq.worker
import orjson
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.doorbell import ARQ_INTERNALS
from jobcast.worker.models import Priority
from jobcast.worker.store import Store

#: sha256 (first 16 hex digits) of the source of each internal, as of arq 0.28.0.
FINGERPRINTS = {
    "Worker.__init__": "edfb0cd7e05e77cf",
    "Worker._poll_iteration": "f8d39d823a0a59f2",
    "Worker.start_jobs": "b45797cfa40bed7f",
    "Worker._release_sem_dec_counter_on_complete": "0ed101482e942c33",
    "Worker.run_job": "589a19059ff84ee7",
    "Worker.handle_sig_wait_for_completion": "8f161d86834cc74e",
    "Worker.close": "5bcc9cb356680829",
    "arq.jobs.deserialize_job_raw": "f330dfaff8e2160f",
}
ROOT = Path(__file__).resolve().parent.parent


def fingerprint(name: str) -> str:
    target: object = arq.jobs if name.startswith("arq.jobs.") else arq.worker
    for part in name.removeprefix("arq.jobs.").split("."):
        target = getattr(target, part)
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def test_every_arq_internal_jobcast_relies_on_is_unchanged() -> None:
    assert set(FINGERPRINTS) == set(ARQ_INTERNALS), "fingerprint exactly what ARQ_INTERNALS lists"
    changed = {name: ARQ_INTERNALS[name] for name in FINGERPRINTS if fingerprint(name) != FINGERPRINTS[name]}
    assert not changed, (
        f"arq {importlib.metadata.version('arq')} changed internals that worker/doorbell.py relies on; "
        "re-check each against what Jobcast does with it, then record the new fingerprints:\n"
        + "\n".join(f"  {name}: {why} (now {fingerprint(name)})" for name, why in changed.items())
    )


def test_the_installed_arq_is_the_one_the_seam_was_checked_against() -> None:
    requirement = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if r.startswith("arq"))  # fmt: skip
    assert requirement == "arq>=0.28.0,<0.29", "widen the pin only after this file's checks pass on the new arq"
    assert importlib.metadata.version("arq").startswith("0.28.")


async def test_arq_reads_the_runs_jobcast_queues_in_its_own_format(redis: Redis, store: Store) -> None:
    """lua/jobs.lua writes arq's job payload itself; arq's own reader must understand it."""
    created = await store.create(
        tenant="acme", job_type="sleep", params={"seconds": 1}, priority=Priority.NORMAL, max_attempts=3
    )
    run_id = schema.arq_run_id(created.job_id or "", 1)
    assert await redis.zscore(schema.ARQ_QUEUE, run_id) is not None
    raw = await redis.get(arq.constants.job_key_prefix + run_id)
    function, args, kwargs, tries, enqueued_ms = arq.jobs.deserialize_job_raw(raw, deserializer=orjson.loads)
    assert (function, list(args), kwargs, tries) == (schema.ARQ_FUNCTION, [created.job_id, 1], {}, 1)
    assert enqueued_ms > 1_700_000_000_000
