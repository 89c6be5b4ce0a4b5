"""The ``jobcast`` command.

    jobcast dev      server + worker + (unless JOBCAST_REDIS_URL is set) an embedded Redis
    jobcast web      the HTTP server only (what the Procfile's web line runs)
    jobcast worker   one arq worker process (the Procfile's worker line)
    jobcast keys     create, list and revoke API keys stored (hashed) in Redis (in cell 0)
    jobcast cells    where each known tenant lives, and the placement line that pins them

and the client commands of :mod:`jobcast.cli.commands`, which talk to a running server:

    jobcast submit TYPE [key=value ...]   jobcast status ID   jobcast list   jobcast cancel ID
    jobcast types                         jobcast tail ID
    jobcast destinations                  jobcast enable-destination DESTINATION

Configuration errors of dev, web, worker and keys end in a one-line message and exit status 1, never
a traceback, and so does a Redis that cannot be reached (the message names the URL, without its
password, and what to set); the client commands have their own exit statuses
(``commands.EXIT_STATUSES``).

``jobcast keys`` without ``JOBCAST_REDIS_URL`` uses the Redis of the ``jobcast dev`` running with
``--data-dir`` (``.jobcast-data`` in this folder by default), and says so on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobcast.worker.connections import redacted
from jobcast.worker.logs import configure_logging
from jobcast.worker.settings import ConfigError, Settings

from .. import __version__

#: The client commands (submit, tail, ...) need the ``cli`` extra (httpx, rich); a server install
#: without it still runs web, worker and keys, and says how to get the rest.
CLIENT_COMMAND_NAMES = ("submit", "status", "list", "cancel", "types", "tail", "destinations", "enable-destination")
try:
    from . import commands
except ModuleNotFoundError as exc:
    commands = None  # type: ignore[assignment]
    MISSING_FOR_CLIENT = exc.name

DEFAULT_DATA_DIR = ".jobcast-data"


class RedisUnreachable(ConfigError):
    """Redis did not answer: the message says where we looked and what to set."""

    def __init__(self, url: str | list[str], reason: object) -> None:
        where = " or ".join(redacted(u) for u in ([url] if isinstance(url, str) else url))
        super().__init__(
            f"cannot reach Redis at {where} ({reason}). Set JOBCAST_REDIS_URL (or JOBCAST_REDIS_URLS) to "
            "the Redis your Jobcast server uses, or start one with `jobcast dev` (then run this command in the "
            "same folder, or pass its --data-dir)"
        )


def _keys_settings(data_dir: Path) -> Settings:
    """Settings for ``jobcast keys``: JOBCAST_REDIS_URL (or the first cell of JOBCAST_REDIS_URLS, where
    the keys live) when set, else the Redis of a running ``jobcast dev``."""
    from .dev import running_dev_redis

    configured = os.environ.get("JOBCAST_REDIS_URL") or os.environ.get("JOBCAST_REDIS_URLS")
    found = None if configured else running_dev_redis(data_dir)
    if found is None:
        return Settings.from_env(require_secrets=False)
    print(f"jobcast: using the Redis of the `jobcast dev` running in {data_dir} ({found})", file=sys.stderr)
    return Settings.from_env(require_secrets=False, redis_url=found)


def cmd_web(args: argparse.Namespace) -> None:
    from .web import process_count, serve, supervise

    settings = Settings.from_env()
    configure_logging(settings)
    if args.shared_port:  # one of the processes of a supervisor (see jobcast.cli.web)
        serve(settings, args.host, args.port, shared_port=True)
        return
    _check_cells(settings)
    processes = process_count(settings, args.processes)
    if processes == 1:
        serve(settings, args.host, args.port, shared_port=False)
    else:
        supervise(args.host, args.port, processes)


def _check_cells(settings: Settings) -> None:
    """Refuse to start when JOBCAST_REDIS_URLS was reordered (jobcast.cli.cells.check_cells)."""
    import asyncio

    from .cells import check_cells

    asyncio.run(check_cells(settings.cell_urls))


def cmd_worker(args: argparse.Namespace) -> None:
    from jobcast.worker.main import run

    overrides = {"worker_cells": args.cells} if args.cells is not None else {}
    settings = Settings.from_env(**overrides)
    configure_logging(settings)
    _check_cells(settings)
    run(settings)


def cmd_keys(args: argparse.Namespace) -> None:
    """``jobcast keys create|list|revoke``: API keys stored hashed in Redis (server.keys)."""
    import asyncio
    import json

    from jobcast.worker.store import redis_client

    from ..keys import ApiKeyError, ApiKeys

    settings = _keys_settings(Path(args.data_dir))

    async def run() -> None:
        redis = redis_client(settings)
        keys = ApiKeys(redis)
        try:
            if args.keys_command == "create":
                info, key = await keys.create(args.tenant, args.name)
                if args.json:
                    print(json.dumps({**info.__dict__, "key": key}))
                else:
                    print(f"Created API key {info.id} for tenant {info.tenant}. It is shown only this once:\n{key}")
            elif args.keys_command == "list":
                infos = await keys.list(args.tenant)
                if args.json:
                    print(json.dumps([i.__dict__ for i in infos]))
                else:
                    for i in infos:
                        print(f"{i.id}  {i.tenant:<20} {i.created_at}  {i.name}")
            else:
                info = await keys.revoke(args.key_id)
                print(json.dumps(info.__dict__) if args.json else f"Revoked API key {info.id} of {info.tenant}.")
        except ApiKeyError as exc:
            raise ConfigError(str(exc)) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RedisUnreachable(settings.cell_urls[0], exc) from None
        finally:
            await redis.aclose()

    asyncio.run(run())


def cmd_cells(args: argparse.Namespace) -> None:
    """``jobcast cells``: each known tenant's cell, and the JOBCAST_CELL_PLACEMENT line pinning them."""
    from .cells import run_cells

    settings = Settings.from_env(require_secrets=False)
    cells = len(settings.cell_urls)
    if args.if_cells is not None and args.if_cells < cells:
        raise ConfigError(
            f"--if-cells {args.if_cells} is fewer than the {cells} cell(s) configured; cells are only ever appended."
        )
    run_cells(settings, if_cells=args.if_cells, as_json=args.json)


def cmd_migrate(args: argparse.Namespace) -> None:
    """``jobcast migrate``: bring the archive's schema (JOBCAST_ARCHIVE_URL) to this version's;
    ``--redis``: move a Redis written before 0.3 (JOBCAST_REDIS_URL) into cell 0's layout."""
    if args.redis:
        _migrate_redis()
        return
    from sqlalchemy.exc import SQLAlchemyError

    from jobcast.worker.archive import display_url, migrate_now

    url = Settings.from_env(require_secrets=False).archive_url
    try:
        before, after = migrate_now(url)
    except (SQLAlchemyError, OSError) as exc:
        raise ConfigError(f"the archive at {display_url(url)} cannot be migrated: {exc}") from None
    if before == after:
        print(f"The archive at {display_url(url)} is up to date (schema {after}).")
    else:
        print(f"Migrated the archive at {display_url(url)}: schema {before or 'empty'} -> {after}.")


def _migrate_redis() -> None:
    import asyncio

    from jobcast.worker.relayout import move_to_cells
    from jobcast.worker.store import redis_client

    settings = Settings.from_env(require_secrets=False)

    async def run() -> None:
        redis = redis_client(settings)
        try:
            moved = await move_to_cells(redis)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RedisUnreachable(settings.redis_url, exc) from None
        finally:
            await redis.aclose()
        if moved.conflicts:
            listed = "\n  ".join(moved.conflicts)
            raise ConfigError(f"moved {moved.keys} keys; these were left where they are:\n  {listed}")
        if moved.keys:
            print(f"Moved {moved.keys} keys into cell 0's layout (jobcast:{{c0}}:...).")
        else:
            print("Nothing to move: this Redis holds no key of the layout before 0.3.")

    asyncio.run(run())


def cmd_dev(args: argparse.Namespace) -> None:
    from .dev import run_dev

    run_dev(host=args.host, port=args.port, data_dir=args.data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jobcast",
        description="Jobcast: a server for long-running jobs.",
        epilog=commands.EXIT_STATUSES if commands else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jobcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run server, worker and an embedded Redis for local development")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    dev.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where the embedded Redis keeps its files")
    dev.set_defaults(func=cmd_dev)

    web = sub.add_parser("web", help="run the HTTP server")
    web.add_argument("--host", default="0.0.0.0")
    web.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    web.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="server processes sharing the port (default: JOBCAST_WEB_PROCESSES; 0 = one per core in production)",
    )
    web.add_argument("--shared-port", action="store_true", help=argparse.SUPPRESS)
    web.set_defaults(func=cmd_web)

    worker = sub.add_parser("worker", help="run a worker")
    worker.add_argument(
        "--cells",
        default=None,
        metavar="0,2",
        help="the cells to serve, by index (default: JOBCAST_WORKER_CELLS, else every cell)",
    )
    worker.set_defaults(func=cmd_worker)

    cells = sub.add_parser("cells", help="show where each tenant lives and how to pin them before adding a cell")
    cells.add_argument(
        "--if-cells", type=int, default=None, metavar="N", help="also show where tenants would go with N cells"
    )
    cells.add_argument("--json", action="store_true", help="machine-readable output")
    cells.set_defaults(func=cmd_cells)

    migrate = sub.add_parser("migrate", help="create or upgrade the archive's schema (JOBCAST_ARCHIVE_URL)")
    migrate.add_argument(
        "--redis",
        action="store_true",
        help="instead: move a Redis written before 0.3 (JOBCAST_REDIS_URL) into cell 0's key layout "
        "(stop every Jobcast process first)",
    )
    migrate.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="create, list and revoke API keys stored in Redis")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant (printed once)")
    create.add_argument("tenant")
    create.add_argument("--name", default="", help="a label, e.g. who the key is for")
    listing = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    revoke = keys_sub.add_parser("revoke", help="revoke a key at once, in every server")
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument(
            "--data-dir",
            default=DEFAULT_DATA_DIR,
            help="without JOBCAST_REDIS_URL: use the Redis of the `jobcast dev` running with this data dir",
        )
    keys.set_defaults(func=cmd_keys)

    if commands is not None:
        commands.add_client_commands(sub)
    else:
        for name in CLIENT_COMMAND_NAMES:
            sub.add_parser(name, help="(needs the cli extra)", add_help=False).set_defaults(func=None)

    args, extra = parser.parse_known_args(argv)
    if args.func is None:
        print(
            f"jobcast: `jobcast {args.command}` needs the command-line extra ({MISSING_FOR_CLIENT} is not installed): "
            "pip install 'jobcast[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if commands is not None and args.func in commands.CLIENT_COMMANDS:
        status = commands.run(args)
        if status:
            raise SystemExit(status)
        return
    try:
        args.func(args)
    except (RedisConnectionError, RedisTimeoutError) as exc:  # a worker that never reached its Redis
        print(f"jobcast: {RedisUnreachable(Settings.from_env(require_secrets=False).cell_urls, exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    except ConfigError as exc:
        print(f"jobcast: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
