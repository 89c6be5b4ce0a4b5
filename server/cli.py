"""The ``jobcast`` command.

    jobcast dev      server + worker + (unless JOBCAST_REDIS_URL is set) an embedded Redis
    jobcast web      the HTTP server only (what the Procfile's web line runs)
    jobcast worker   one arq worker process (the Procfile's worker line)

and the client commands of :mod:`server.commands`, which talk to a running server:

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

from worker.settings import ConfigError, Settings

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

    from .app import JobcastServer, create_app

    app = create_app(_settings())
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
        log_level="info",
    )
    JobcastServer(config, app).run()


def cmd_worker(args: argparse.Namespace) -> None:
    import logging

    from worker.main import run

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(settings)


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
