"""The ``jobcast`` command.

    jobcast dev      server + worker + (unless JOBCAST_REDIS_URL is set) an embedded Redis
    jobcast web      the HTTP server only (what the Procfile's web line runs)
    jobcast worker   one arq worker process (the Procfile's worker line)
    jobcast keys     create, list and revoke API keys stored (hashed) in Redis

and the client commands of :mod:`jobcast.cli.commands`, which talk to a running server:

    jobcast submit TYPE [key=value ...]   jobcast status ID   jobcast list   jobcast cancel ID
    jobcast types                         jobcast tail ID

Configuration errors of dev, web and worker end in a one-line message and exit status 1, never a
traceback; the client commands have their own exit statuses (``commands.EXIT_STATUSES``).
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from jobcast.worker.logs import configure_logging
from jobcast.worker.settings import ConfigError, Settings

from .commands import CLIENT_COMMANDS, EXIT_STATUSES, add_client_commands
from .commands import run as run_client_command


def _settings() -> Settings:
    try:
        settings = Settings()
        settings.check_production()
        return settings
    except ValidationError as exc:
        raise ConfigError(f"invalid JOBCAST_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def cmd_web(args: argparse.Namespace) -> None:
    import uvicorn

    from ..app import JobcastServer, create_app, tune_gc_for_streaming

    settings = _settings()
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
        log_config=None,  # our handlers (worker.logs), so JOBCAST_LOG_FORMAT applies to uvicorn's lines too
    )
    tune_gc_for_streaming()
    JobcastServer(config, app).run()


def cmd_worker(args: argparse.Namespace) -> None:
    from jobcast.worker.main import run

    settings = _settings()
    configure_logging(settings)
    run(settings)


def cmd_keys(args: argparse.Namespace) -> None:
    """``jobcast keys create|list|revoke``: API keys stored hashed in Redis (server.keys)."""
    import asyncio
    import json

    from jobcast.worker.store import redis_client

    from ..keys import ApiKeyError, ApiKeys

    async def run() -> None:
        try:
            settings = Settings()
        except ValidationError as exc:
            raise ConfigError(f"invalid JOBCAST_* setting: {exc.errors()[0]['msg']}") from None
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
        finally:
            await redis.aclose()

    asyncio.run(run())


def cmd_migrate(args: argparse.Namespace) -> None:
    """``jobcast migrate``: bring the archive's schema (JOBCAST_ARCHIVE_URL) to this version's."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobcast.worker.archive import display_url, migrate_now

    try:
        url = Settings().archive_url
    except ValidationError as exc:
        raise ConfigError(f"invalid JOBCAST_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    try:
        before, after = migrate_now(url)
    except (SQLAlchemyError, OSError) as exc:
        raise ConfigError(f"the archive at {display_url(url)} cannot be migrated: {exc}") from None
    if before == after:
        print(f"The archive at {display_url(url)} is up to date (schema {after}).")
    else:
        print(f"Migrated the archive at {display_url(url)}: schema {before or 'empty'} -> {after}.")


def cmd_dev(args: argparse.Namespace) -> None:
    from .dev import run_dev

    run_dev(host=args.host, port=args.port, data_dir=args.data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jobcast",
        description="Jobcast: a server for long-running jobs.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run server, worker and an embedded Redis for local development")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    dev.add_argument("--data-dir", default=".jobcast-data", help="where the embedded Redis keeps its files")
    dev.set_defaults(func=cmd_dev)

    web = sub.add_parser("web", help="run the HTTP server")
    web.add_argument("--host", default="0.0.0.0")
    web.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    web.set_defaults(func=cmd_web)

    worker = sub.add_parser("worker", help="run a worker")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="create or upgrade the archive's schema (JOBCAST_ARCHIVE_URL)")
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
    keys.set_defaults(func=cmd_keys)

    add_client_commands(sub)

    args = parser.parse_args(argv)
    if args.func in CLIENT_COMMANDS:
        status = run_client_command(args)
        if status:
            raise SystemExit(status)
        return
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"jobcast: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
