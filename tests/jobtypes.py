"""Job types used only by the tests (loaded through JOBCAST_JOB_MODULES=tests.jobtypes)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pydantic import BaseModel, Field

from jobcast import JobContext, job_type


class SpinParams(BaseModel):
    calls: int = Field(default=10_000, ge=1, le=1_000_000)


@job_type("spin", params=SpinParams, description="Calls ctx.progress() `calls` times without pausing.")
async def spin(ctx: JobContext, params: SpinParams) -> dict[str, Any]:
    for i in range(1, params.calls + 1):
        ctx.progress(100 * i / params.calls, message=f"call {i}")
        if i % 1000 == 0:
            await asyncio.sleep(0)
    return {"calls": params.calls}


class TimeoutParams(BaseModel):
    seconds: float = 60


@job_type(
    "too_slow",
    params=TimeoutParams,
    description="Sleeps past its 0.3 s timeout.",
    timeout_s=0.3,
    max_attempts=2,
    retry_backoff_s=0.05,
)
async def too_slow(ctx: JobContext, params: TimeoutParams) -> None:
    await asyncio.sleep(params.seconds)


class BigParams(BaseModel):
    size: int = Field(default=10_000, ge=0, le=1_000_000)


@job_type("big_result", params=BigParams, description="Returns a result of `size` characters.")
async def big_result(ctx: JobContext, params: BigParams) -> dict[str, Any]:
    return {"text": "x" * params.size}


class NoParams(BaseModel):
    pass


@job_type("unserialisable", params=NoParams, description="Returns something JSON cannot encode.", max_attempts=3)
async def unserialisable(ctx: JobContext, params: NoParams) -> object:
    return object()


@job_type("crash", params=NoParams, description="Raises a plain exception every attempt.", retry_backoff_s=0.05)
async def crash(ctx: JobContext, params: NoParams) -> None:
    raise ZeroDivisionError("boom")


class NapParams(BaseModel):
    seconds: float = Field(default=5, ge=0, le=600)


@job_type("fragile", params=NapParams, description="Sleeps; a single attempt only.", max_attempts=1)
async def fragile(ctx: JobContext, params: NapParams) -> dict[str, Any]:
    ctx.progress(10, step="napping")
    await asyncio.sleep(params.seconds)
    return {"slept": params.seconds}


@job_type("chatty", params=NoParams, description="Logs a line from inside its handler.")
async def chatty(ctx: JobContext, params: NoParams) -> None:
    logging.getLogger("tests.jobtypes").info("hello from the handler")


class CleanupFailed(RuntimeError):
    pass


@job_type(
    "messy_exit",
    params=NapParams,
    description="Sleeps past its 0.3 s timeout, and raises while being stopped.",
    timeout_s=0.3,
    max_attempts=1,
)
async def messy_exit(ctx: JobContext, params: NapParams) -> None:
    try:
        await asyncio.sleep(params.seconds)
    except asyncio.CancelledError:
        raise CleanupFailed("cleanup failed while stopping") from None


class GateParams(BaseModel):
    gate: str  # a file path


@job_type("gated", params=GateParams, description="Runs until file `gate` exists (the test opens it).")
async def gated(ctx: JobContext, params: GateParams) -> dict[str, Any]:
    ctx.progress(10, step="waiting for the gate")
    while not os.path.exists(params.gate):
        await asyncio.sleep(0.02)
    return {"gate": "opened"}
