"""Job types: declared once, with everything the server and the worker need to know about them.

A module declares job types with the :func:`job_type` decorator::

    class ResizeParams(BaseModel):
        url: HttpUrl
        width: int = Field(gt=0, le=10_000)

    @job_type("resize", params=ResizeParams, description="Resize an image.", timeout_s=120)
    async def resize(ctx: JobContext, params: ResizeParams) -> dict[str, Any]:
        ctx.progress(50, step="downloading")
        ...
        return {"width": params.width}

and operators list such modules in ``JOBCAST_JOB_MODULES``; :func:`load_registry` imports them and
collects every :class:`JobType` they define. There is no global registry: the server and the
worker each build theirs from the same settings, so both agree on the types without shared state.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .models import Priority
from .settings import ConfigError, Settings

if TYPE_CHECKING:
    from .context import JobContext

Handler = Callable[["JobContext", Any], Awaitable[Any]]
CsvRenderer = Callable[[Any], str]

BUILTIN_MODULES = ("jobcast.worker.builtin", "jobcast.worker.report")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")


@dataclass(frozen=True)
class JobType:
    name: str
    params: type[BaseModel]
    handler: Handler
    description: str
    timeout_s: float = 300.0
    max_attempts: int = 3
    priority: Priority = Priority.NORMAL
    #: Base of the exponential backoff between attempts: base * 2**(attempt - 1), capped, jittered.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 600.0
    #: Renders a completed job's result as CSV for ``GET /jobs/{id}/result`` with ``Accept: text/csv``.
    csv: CsvRenderer | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.name or not set(self.name) <= NAME_CHARS:
            raise ConfigError(
                f"job type name {self.name!r} must be non-empty lowercase letters, digits, '_', '-' or '.'"
            )
        if self.max_attempts < 1 or self.timeout_s <= 0:
            raise ConfigError(f"job type {self.name!r}: max_attempts must be >= 1 and timeout_s > 0")

    def backoff_s(self, attempt: int) -> float:
        """Delay before the attempt after ``attempt``: exponential, with equal jitter."""
        ceiling = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempt - 1))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))

    def params_schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()


def job_type(
    name: str,
    *,
    params: type[BaseModel],
    description: str,
    timeout_s: float = 300.0,
    max_attempts: int = 3,
    priority: Priority = Priority.NORMAL,
    retry_backoff_s: float = 1.0,
    retry_backoff_max_s: float = 600.0,
    csv: CsvRenderer | None = None,
) -> Callable[[Handler], JobType]:
    """Declare a job type; the decorated handler becomes a :class:`JobType`."""

    def decorate(handler: Handler) -> JobType:
        return JobType(
            name=name,
            params=params,
            handler=handler,
            description=description,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            priority=priority,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
            csv=csv,
        )

    return decorate


class Registry:
    def __init__(self, types: list[JobType]) -> None:
        self._types: dict[str, JobType] = {}
        for jt in types:
            if jt.name in self._types and self._types[jt.name] is not jt:
                raise ConfigError(f"job type {jt.name!r} is declared twice; job type names must be unique")
            self._types[jt.name] = jt

    def get(self, name: str) -> JobType | None:
        return self._types.get(name)

    def __iter__(self) -> Iterator[JobType]:
        return iter(sorted(self._types.values(), key=lambda jt: jt.name))

    def __len__(self) -> int:
        return len(self._types)

    @property
    def max_timeout_s(self) -> float:
        return max((jt.timeout_s for jt in self._types.values()), default=300.0)


def load_registry(settings: Settings) -> Registry:
    """Import the built-in job types and those of ``JOBCAST_JOB_MODULES``."""
    types: list[JobType] = []
    for module_name in (*BUILTIN_MODULES, *settings.job_module_names):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"JOBCAST_JOB_MODULES: cannot import {module_name!r} ({exc}); "
                "list importable module names, comma separated, e.g. 'myapp.jobs'"
            ) from exc
        found = [value for value in vars(module).values() if isinstance(value, JobType)]
        if not found and module_name not in BUILTIN_MODULES:
            raise ConfigError(
                f"JOBCAST_JOB_MODULES: module {module_name!r} defines no job type; "
                "declare them with @jobcast.job_type(...)"
            )
        types += found
    return Registry(types)
