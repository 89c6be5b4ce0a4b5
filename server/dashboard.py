"""The dashboard's routes: ``/`` (its page) and ``/static/...`` (its scripts, styles and icon).

The files are the package ``jobcast.static`` (the repository's ``static/`` folder), found through the
import system so that a wheel install serves them as well as a checkout. Only the dashboard's own
kinds of file are served: the folder is a Python package, and its ``__init__.py`` and byte-code are
not assets. Every answer carries :data:`SECURITY_HEADERS` (a strict Content-Security-Policy).

In development mode (``jobcast dev``) with its default key in effect, the page carries
``<meta name="jobcast-dev-key" content="dev-key">`` and the sign-in form offers that key: a new user
has nothing to look up. The key is the documented default, never one from ``JOBCAST_API_KEYS``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from jobcast.worker.settings import DEV_API_KEYS, Settings

from .problems import NotFound
from .services import services

PACKAGE = "jobcast.static"

#: Sent with the page and every one of its files. The dashboard has no inline script or style and
#: talks only to this origin, so the policy allows nothing else; it is never framed (clickjacking),
#: and its URLs (job ids) are not sent to other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
}
_RAW_SECURITY_HEADERS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
SERVED_SUFFIXES = frozenset({".html", ".css", ".js", ".svg", ".png", ".ico", ".map"})


def directory() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the dashboard's files (package {PACKAGE}) are not installed")
    return Path(spec.origin).parent


class DashboardFiles:
    """Starlette's ``StaticFiles`` over the package's folder, for the dashboard's kinds of file only."""

    def __init__(self, folder: Path) -> None:
        # Symlinks are followed: an editable install in setuptools' strict mode (the test command's)
        # is a tree of links to the checkout. The folder is Jobcast's own, not users' uploads.
        self._files = StaticFiles(directory=folder, follow_symlink=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if Path(path).suffix not in SERVED_SUFFIXES or "__pycache__" in path:
            raise NotFound("No such dashboard file.")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_RAW_SECURITY_HEADERS]}
            await send(message)

        await self._files(scope, receive, send_with_headers)


def development_key(settings: Settings) -> str | None:
    """The default key of ``jobcast dev``, when this server runs in development mode and accepts it."""
    key = DEV_API_KEYS.partition(":")[2]
    return key if settings.env == "development" and key in settings.tenant_keys else None


def routes() -> list[BaseRoute]:
    folder = directory()
    page = folder / "index.html"

    dev_page: str | None = None

    async def index(request: Request) -> Response:
        nonlocal dev_page
        key = development_key(services(request).settings)
        if key is None:
            return FileResponse(page, headers=SECURITY_HEADERS)
        if dev_page is None:
            meta = f'<meta name="jobcast-dev-key" content="{key}">'
            dev_page = page.read_text().replace("<head>\n", f"<head>\n  {meta}\n", 1)
        return HTMLResponse(dev_page, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", DashboardFiles(folder), name="static"),
    ]
