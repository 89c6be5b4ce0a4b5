"""The ``sleep`` job type: for demos and for checking a deployment (docs/API.md, Built-in job types)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .context import JobContext
from .errors import PermanentError, RetryableError
from .types import job_type


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=1, ge=0, le=3600, description="Total time to sleep.")
    steps: int = Field(default=10, ge=1, le=1000, description="Progress is reported after each step.")
    fail_times: int = Field(default=0, ge=0, description="The first N attempts fail with a retryable error.")
    fail: bool = Field(default=False, description="Fail permanently (not retryable).")


@job_type(
    "sleep",
    params=SleepParams,
    description="Sleeps for `seconds`, reporting progress after each of `steps` steps.",
    timeout_s=3700,
    max_attempts=3,
    retry_backoff_s=0.5,
)
async def sleep(ctx: JobContext, params: SleepParams) -> dict[str, Any]:
    if params.fail:
        raise PermanentError("failed on purpose (params.fail is true)")
    if ctx.attempt <= params.fail_times:
        raise RetryableError(f"attempt {ctx.attempt} failed on purpose (params.fail_times={params.fail_times})")
    pause = params.seconds / params.steps
    for step in range(1, params.steps + 1):
        await asyncio.sleep(pause)
        ctx.progress(100 * step / params.steps, step=f"step {step} of {params.steps}")
    return {"slept": params.seconds}
