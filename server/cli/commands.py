"""The client commands of ``jobcast``: submit, status, list, cancel, types, tail, and the webhook
destinations (``destinations``, ``enable-destination``).

They talk to a running server through :mod:`jobcast.cli.client`, configured by ``JOBCAST_URL`` and
``JOBCAST_API_KEY`` (or ``--url`` / ``--api-key``), and show what they get with
:mod:`jobcast.cli.terminal`: tables and a live progress bar for people. Scripts pass ``--json`` and get
JSON on stdout — one document, or for ``tail`` and ``submit --follow`` one event per line.

Errors end in one red line on stderr, never a traceback. The exit status says how things ended
(``EXIT_STATUSES`` below, shown by ``--help`` and in the README).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from jobcast.worker.models import JobStatus, Priority

from .client import Client, ClientError, Disconnected, RequestFailed, StreamEvent, UsageError
from .terminal import Output, TailView, describe_param, duration_text, local_time, render_job, status_text

DEFAULT_URL = "http://127.0.0.1:8000"


class ExitStatus(IntEnum):
    OK = 0  # the command did what it was asked; a followed job completed
    FAILED = 1  # the followed job failed
    USAGE = 2  # bad arguments or configuration (argparse uses 2 as well)
    CANCELLED = 3  # the followed job was cancelled
    REQUEST_FAILED = 4  # the server answered an error, or could not be reached
    INTERRUPTED = 130  # Ctrl-C


EXIT_STATUSES = """\
exit statuses of the client commands:
  0    success; for tail and submit --wait/--follow: the job completed
  1    the job failed (tail, submit --wait/--follow)
  2    usage or configuration error (bad arguments, no API key)
  3    the job was cancelled (tail, submit --wait/--follow)
  4    the request failed: an error answer from the server, or no answer
  130  interrupted (Ctrl-C)"""

OUTCOMES = {
    JobStatus.COMPLETED: ExitStatus.OK,
    JobStatus.FAILED: ExitStatus.FAILED,
    JobStatus.CANCELLED: ExitStatus.CANCELLED,
}


# --- arguments ------------------------------------------------------------------------------------


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the client commands on the ``jobcast`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=os.environ.get("JOBCAST_URL") or DEFAULT_URL, help=f"server URL (JOBCAST_URL; {DEFAULT_URL})"
    )
    common.add_argument("--api-key", default=os.environ.get("JOBCAST_API_KEY"), help="API key (JOBCAST_API_KEY)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name, help=help, description=help, parents=[common], epilog=EXIT_STATUSES, formatter_class=_Formatter
        )
        parser.set_defaults(func=func)
        return parser

    submit = command("submit", "submit a job", cmd_submit)
    submit.add_argument("type", help="job type (see `jobcast types`)")
    submit.add_argument(
        "assignments",
        nargs="*",
        metavar="key=value",
        help="a parameter; the value is read as JSON when it is valid JSON (5, true, [1,2]), else as a string",
    )
    submit.add_argument("--params", metavar="JSON", help="parameters as a JSON object (key=value pairs go on top)")
    submit.add_argument("--priority", choices=[p.value for p in Priority], help="default: the job type's priority")
    submit.add_argument("--webhook", metavar="URL", help="URL to notify when the job ends")
    submit.add_argument("--idempotency-key", metavar="KEY", help="resending with the same key returns the same job")
    then = submit.add_mutually_exclusive_group()
    then.add_argument("--wait", action="store_true", help="wait until the job ends, then show it")
    then.add_argument("--follow", action="store_true", help="follow the job live, as `jobcast tail` does")

    status = command("status", "show a job", cmd_status)
    status.add_argument("id", help="job id")

    listing = command("list", "list your jobs, newest first", cmd_list)
    listing.add_argument("--status", choices=[s.value for s in JobStatus])
    listing.add_argument("--type", help="only jobs of this type")
    listing.add_argument("--limit", type=int, default=20, help="jobs per page, 1 to 200 (default 20)")
    listing.add_argument("--cursor", help="the next page: the cursor printed under the previous one")
    listing.add_argument(
        "--created-after", metavar="TIME", help="jobs created at or after TIME (RFC 3339, e.g. 2026-12-02T10:00:00Z)"
    )
    listing.add_argument("--created-before", metavar="TIME", help="jobs created before TIME (RFC 3339)")
    listing.add_argument("--search", metavar="TEXT", help="jobs whose type or params contain TEXT (3+ characters)")

    cancel = command("cancel", "cancel a job", cmd_cancel)
    cancel.add_argument("id", help="job id")

    command("types", "list the job types and their parameters", cmd_types)

    tail = command("tail", "follow a job live until it ends", cmd_tail)
    tail.add_argument("id", help="job id")

    command("destinations", "list your webhook destinations and their health", cmd_destinations)
    enable = command("enable-destination", "enable a disabled webhook destination again", cmd_enable_destination)
    enable.add_argument("destination", help="scheme://host[:port], as `jobcast destinations` shows it")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def report_error(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"jobcast: {message}", style="red"))


def _client(args: argparse.Namespace) -> Client:
    if not args.api_key:
        raise UsageError("no API key: set JOBCAST_API_KEY or pass --api-key (`jobcast dev` prints one)")
    return Client(args.url, args.api_key)


# --- commands ---------------------------------------------------------------------------------------


def parse_params(params_json: str | None, assignments: Sequence[str]) -> dict[str, Any]:
    """``--params`` (a JSON object) with ``key=value`` pairs on top; a value is JSON when it parses."""
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--params is not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(loaded, dict):
            raise UsageError("--params must be a JSON object, e.g. --params '{\"seconds\": 5}'")
        params.update(loaded)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter {assignment!r} is not of the form key=value, e.g. seconds=5")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def cmd_submit(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    params = parse_params(args.params, args.assignments)
    with _client(args) as client:
        job = client.submit(
            args.type, params, priority=args.priority, webhook=args.webhook, idempotency_key=args.idempotency_key
        )
        if args.follow:
            return follow_job(client, job["id"], out)
        if args.wait:
            job = client.wait(job["id"])
            if out.json:
                out.document(job)
            else:
                out.console.print(render_job(job))
            return OUTCOMES.get(JobStatus(job["status"]), ExitStatus.OK)
    if out.json:
        out.document(job)
    else:
        out.console.print(
            Text.assemble("Submitted ", (job["id"], "bold"), f" ({job['type']}, {job['priority']} priority)")
        )
        out.console.print(Text(f"Follow it with: jobcast tail {job['id']}", style="dim"))
    return ExitStatus.OK


def cmd_status(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        job = client.job(args.id)
    if out.json:
        out.document(job)
    else:
        out.console.print(render_job(job))
    return ExitStatus.OK


def cmd_list(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    if not 1 <= args.limit <= 200:
        raise UsageError(f"--limit must be from 1 to 200 (got {args.limit})")
    with _client(args) as client:
        page = client.jobs(
            status=args.status,
            job_type=args.type,
            limit=args.limit,
            cursor=args.cursor,
            created_after=args.created_after,
            created_before=args.created_before,
            search=args.search,
        )
    if out.json:
        out.document(page)
        return ExitStatus.OK
    if not page["items"]:
        out.console.print("No jobs." if args.cursor is None else "No more jobs.")
        return ExitStatus.OK
    table = Table(box=None, header_style="bold dim", pad_edge=False)
    for name in ("ID", "TYPE", "STATUS", "PROGRESS", "CREATED", "DURATION"):
        table.add_column(name, justify="right" if name in ("PROGRESS", "DURATION") else "left", no_wrap=name == "ID")
    for job in page["items"]:
        table.add_row(
            job["id"],
            job["type"],
            status_text(job["status"]),
            f"{job['progress'].get('percent', 0):.0f}%",
            local_time(job["created_at"], with_date=True),
            duration_text(job),
        )
    out.console.print(table)
    if page.get("next_cursor"):
        out.console.print(Text(f"More: jobcast list --cursor {page['next_cursor']}", style="dim"))
    return ExitStatus.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        try:
            code, job = client.cancel(args.id)
        except RequestFailed as exc:
            if exc.status == 409:
                raise ClientError(
                    f"job {args.id} is already {exc.problem.get('job_status', 'finished')}; it cannot be cancelled"
                ) from None
            raise
    if out.json:
        out.document(job)
    elif code == 200:
        out.console.print(Text.assemble("Cancelled ", (job["id"], "bold"), "."))
    else:
        out.console.print(
            Text.assemble("Cancellation requested for ", (job["id"], "bold"), ": it is running and will stop shortly.")
        )
    return ExitStatus.OK


def cmd_types(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        types = client.job_types()
    if out.json:
        out.document({"items": types})
        return ExitStatus.OK
    for index, jt in enumerate(types):
        if index:
            out.console.print()
        out.console.print(
            Text.assemble(
                (jt["name"], "bold"),
                f"  {jt.get('description', '')}",
                (f"  (timeout {jt['timeout_s']:g} s, {jt['max_attempts']} attempts)", "dim"),
            )
        )
        schema = jt.get("params_schema", {})
        required = set(schema.get("required", []))
        rows = [
            (name, describe_param(prop, required=name in required), prop.get("description", ""))
            for name, prop in schema.get("properties", {}).items()
        ]
        if not rows:
            out.console.print(Text("  no parameters", style="dim"))
        name_width = max(len(r[0]) for r in rows) if rows else 0
        spec_width = max(len(r[1]) for r in rows) if rows else 0
        for name, spec, description in rows:
            line = Text(f"  {name:<{name_width}}  ", style="bold")
            line.append(f"{spec:<{spec_width}}  ", style="")
            line.append(description, style="dim")
            line.rstrip()
            out.console.print(line)
    return ExitStatus.OK


def cmd_tail(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        return follow_job(client, args.id, out)


# --- following a job --------------------------------------------------------------------------------


def follow_job(client: Client, job_id: str, out: Output) -> int:
    """Show the job's events until it ends; the exit status is its outcome."""
    last: StreamEvent | None = None
    with TailView(out) as view:
        for item in client.follow(job_id):
            if isinstance(item, Disconnected):
                view.disconnected(item)
                continue
            last = item
            view.event(item)
        final = last.data if last is not None and last.terminal else None
        if final is None or (final["status"] == JobStatus.COMPLETED and "result" not in final):
            # The stream ended before we saw the end (204), or the result was too large to inline.
            job = client.job(job_id)
            final = {**(final or {}), "status": job["status"], "result": job["result"], "error": job["error"]}
        view.finish(final)
    return OUTCOMES.get(JobStatus(final["status"]), ExitStatus.OK)


def cmd_destinations(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        items = client.destinations()
    if out.json:
        out.document({"items": items})
        return ExitStatus.OK
    table = Table(box=None, pad_edge=False)
    for column in ("DESTINATION", "STATE", "FAILURES", "LAST SUCCESS", "LAST ERROR"):
        table.add_column(column)
    for d in items:
        state = Text(d["state"], style="red" if d["state"] == "disabled" else "green")
        last = local_time(d["last_success_at"], with_date=True) if d["last_success_at"] else "never"
        table.add_row(d["destination"], state, str(d["consecutive_failures"]), last, d["last_error"] or "")
    out.console.print(table if items else Text("no webhook destinations yet", style="dim"))
    return ExitStatus.OK


def cmd_enable_destination(args: argparse.Namespace) -> int:
    out = Output(json_mode=args.json)
    with _client(args) as client:
        enabled = client.enable_destination(args.destination)
    if out.json:
        out.document(enabled)
    else:
        out.console.print(
            Text.assemble((enabled["destination"], "bold"), " enabled; replay its dead letters to send them")
        )
    return ExitStatus.OK


CLIENT_COMMANDS = frozenset(
    {cmd_submit, cmd_status, cmd_list, cmd_cancel, cmd_types, cmd_tail, cmd_destinations, cmd_enable_destination}
)


def run(args: argparse.Namespace) -> int:
    """Run a client command: its exit status, errors reported as one red line."""
    try:
        status: int = args.func(args)
        return status
    except UsageError as exc:
        report_error(str(exc))
        return ExitStatus.USAGE
    except ClientError as exc:  # RequestFailed, Unreachable and the rest
        report_error(str(exc))
        return ExitStatus.REQUEST_FAILED
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
