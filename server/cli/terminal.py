"""How jobs read in a terminal: status colours, times and durations, the job card of
``jobcast status``, and the live view of ``jobcast tail``.

Everything goes through rich, which drops the colours when stdout is not a terminal (or when
``NO_COLOR`` is set). ``tail`` draws a live progress bar only on a terminal; elsewhere it prints a
line per event, so that its output can be logged and read back.

Times in ``tail`` are the server's: its clock runs from the job's first ``processing`` event and
stops at the terminal event's time, so it ends on the very figure of the "after N s" line. Time
left is ``progress.eta - at`` of the latest update (free of clock skew), counted down locally.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TaskProgressColumn, TextColumn
from rich.table import Column
from rich.text import Text

from jobcast.worker.models import JobStatus

from .client import Disconnected, Job, StreamEvent

STATUS_STYLES = {
    JobStatus.QUEUED: "cyan",
    JobStatus.PROCESSING: "blue",
    JobStatus.COMPLETED: "green",
    JobStatus.FAILED: "red",
    JobStatus.CANCELLED: "yellow",
}


class Output:
    """Where a command writes: people's rendering on stdout, notes and errors on stderr."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json = json_mode
        # Piped output is read by programs and people alike: do not cut it at 80 columns.
        width = None if sys.stdout.isatty() else 200
        self.console = Console(highlight=False, soft_wrap=True, width=width)
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def document(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")

    def line(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def note(self, message: str) -> None:
        self.errors.print(Text(message, style="dim"))


class JobClockColumn(ProgressColumn):
    """How long the job has run: from its first start (server time) to now, or to its end."""

    def render(self, task: Task) -> Text:
        started: float | None = task.fields.get("started")
        ended: float | None = task.fields.get("ended")
        if started is None:
            return Text("")
        seconds = (ended if ended is not None else time.time()) - started
        return Text(format_seconds(max(0.0, seconds)), style="progress.elapsed")


class TimeLeftColumn(ProgressColumn):
    """``about 12 s left``, counted down from the latest estimate."""

    def render(self, task: Task) -> Text:
        estimate: tuple[float, float] | None = task.fields.get("left")
        if estimate is None:
            return Text("")
        seconds_left, received = estimate
        return Text(time_left_text(seconds_left - (time.monotonic() - received)), style="progress.remaining")


class TailView:
    """How ``tail`` shows a job: transitions as lines, progress as a live bar on a terminal (a
    line per update elsewhere), then the result or the error. With ``--json``: the events as JSON
    lines and nothing else on stdout."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.live = out.console.is_terminal and not out.json
        self.progress = Progress(
            TextColumn("{task.description}", table_column=Column(width=12)),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[step]}"),
            JobClockColumn(),
            TimeLeftColumn(),
            console=out.console,
            disable=not self.live,
        )
        self.task: TaskID | None = None
        self.started_at: str | None = None

    def __enter__(self) -> TailView:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def _print(self, *parts: str | tuple[str, str] | Text) -> None:
        self.progress.console.print(Text.assemble(*parts))

    def disconnected(self, item: Disconnected) -> None:
        self.out.note(f"{item.reason}; reconnecting in {item.delay_s:.1f} s")
        if self.task is not None:
            self.progress.update(self.task, description="[yellow]reconnecting")

    def event(self, item: StreamEvent) -> None:
        if self.out.json:
            self.out.line({"id": item.id, "event": item.event, "data": item.data})
            return
        data = item.data
        progress = data.get("progress") or {}
        percent = float(progress.get("percent", 0.0))
        step = " · ".join(str(progress[k]) for k in ("step", "message") if progress.get(k))
        if self.task is None:
            self._print((data["job_id"], "bold"), f"  {data['type']}")
            self.task = self.progress.add_task(data["status"], total=100, step="", started=None, ended=None, left=None)
        if item.event == "job.processing" and self.started_at is None:
            self.started_at = data["at"]
        left = seconds_between(data["at"], progress.get("eta"))
        self.progress.update(
            self.task,
            completed=percent,
            step=step,
            description=data["status"],
            started=parse_time(self.started_at).timestamp() if self.started_at else None,
            ended=parse_time(data["at"]).timestamp() if item.terminal else None,
            left=(left, time.monotonic()) if left is not None else None,
        )
        at = local_time(data["at"])
        name = item.event.removeprefix("job.")
        if item.event == "job.progress":
            if not self.live:
                eta = f"  ({time_left_text(left)})" if left is not None else ""
                self._print(f"{at}  ", f"{name:<11}", f"{percent:3.0f}%", f"  {step}" if step else "", eta)
            return
        detail = f"attempt {data['attempt']}"
        if item.event == "job.retrying":
            error = data.get("error") or {}
            retry_in = data.get("retry_in_s")
            detail = f"attempt {data['attempt'] - 1} failed: {error.get('type')}: {error.get('message')}"
            if retry_in is not None:
                detail += f"; retrying in {float(retry_in):.1f} s"
        elif item.terminal:
            detail = f"after {format_seconds(seconds_between(self.started_at, data['at']))}" if self.started_at else ""
        style = STATUS_STYLES.get(JobStatus(data["status"]), "") if name != "retrying" else "yellow"
        self._print(f"{at}  ", (f"{name:<11}", style), f"{percent:3.0f}%  ", detail)

    def finish(self, final: dict[str, Any]) -> None:
        if self.out.json:
            return
        self.progress.stop()
        status = JobStatus(final["status"])
        if status is JobStatus.COMPLETED:
            self._print(("result ", "bold"), json.dumps(final.get("result")))
        elif status is JobStatus.FAILED:
            self._print(Text("error  " + error_text(final.get("error")), style="red"))
        else:
            self._print(Text("cancelled", style="yellow"))


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(JobStatus(status), ""))


def error_text(error: dict[str, Any] | None) -> str:
    if not error:
        return "no details"
    retry = "retryable" if error.get("retryable") else "not retryable"
    return f"{error.get('type')}: {error.get('message')} (attempt {error.get('attempt')}, {retry})"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def local_time(value: str | None, *, with_date: bool = False) -> str:
    if not value:
        return "-"
    moment = parse_time(value).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (parse_time(end) - parse_time(start)).total_seconds()


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def time_left_text(seconds: float) -> str:
    """An estimate of time left, as rounded as an estimate deserves: ``about 12 s left``."""
    if seconds < 1:
        return "finishing"
    if seconds < 60:
        return f"about {seconds:.0f} s left"
    if seconds < 3600:
        return f"about {seconds / 60:.0f} min left"
    return f"about {seconds / 3600:.1f} h left"


def duration_text(job: Job) -> str:
    """How long the job ran (or has been running); ``-`` while queued."""
    if not job.get("started_at"):
        return "-"
    end = job.get("finished_at") or datetime.now().astimezone().isoformat()
    return format_seconds(seconds_between(job["started_at"], end))


def describe_param(prop: dict[str, Any], *, required: bool) -> str:
    """A JSON Schema property in a few words: ``number 0..3600, default 1``."""
    kind = prop.get("type") or next(
        (alt.get("type") for alt in prop.get("anyOf", []) if alt.get("type") != "null"), "value"
    )
    words = [str(kind)]
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        words.append(f"{low}..{high}")
    elif low is not None:
        words.append(f">= {low}")
    elif high is not None:
        words.append(f"<= {high}")
    if "default" in prop:
        words.append(f"default {json.dumps(prop['default'])}")
    elif required:
        words.append("required")
    return ", ".join(words)


def render_job(job: Job) -> Text:
    """``jobcast status``: the job's fields, its outcome and its history, one per line."""
    lines: list[tuple[str, str | Text]] = [
        ("id", Text(job["id"], style="bold")),
        ("type", job["type"]),
        ("status", status_text(job["status"])),
    ]
    progress = job.get("progress") or {}
    step = " · ".join(str(progress[k]) for k in ("step", "message") if progress.get(k))
    left = seconds_between(datetime.now().astimezone().isoformat(), progress.get("eta"))
    eta = f"  ({time_left_text(left)})" if left is not None else ""
    lines.append(("progress", f"{progress.get('percent', 0):.0f}%" + (f"  {step}" if step else "") + eta))
    lines.append(("attempt", f"{job['attempt']} of {job['max_attempts']}"))
    lines.append(("priority", job["priority"]))
    lines.append(("params", json.dumps(job.get("params", {}))))
    lines.append(("created", local_time(job["created_at"], with_date=True)))
    if job.get("started_at"):
        lines.append(("started", local_time(job["started_at"], with_date=True)))
    if job.get("finished_at"):
        lines.append(("finished", local_time(job["finished_at"], with_date=True)))
    lines.append(("duration", duration_text(job)))
    if job.get("result") is not None:
        lines.append(("result", json.dumps(job["result"])))
    if job.get("error"):
        lines.append(("error", Text(error_text(job["error"]), style="red")))
    for index, entry in enumerate(job.get("history", [])):
        moment = Text(f"{local_time(entry['at'])}  ")
        moment.append(f"{entry['status']:<12}", style=STATUS_STYLES.get(JobStatus(entry["status"]), ""))
        moment.append(f"attempt {entry['attempt']}", style="dim")
        lines.append(("history" if index == 0 else "", moment))
    text = Text()
    for index, (label, value) in enumerate(lines):
        if index:
            text.append("\n")
        text.append(f"{label:<10}", style="dim")
        text.append(value)
    return text
