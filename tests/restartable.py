"""A server that stops and starts again on the same port, as a restarted process would.

Clients that reconnect to the same URL (a browser's EventSource, ``jobcast tail``) must resume
from their last event id; this is how the tests restart the server under them.
"""

from __future__ import annotations

from jobcast.cli.embedded_redis import free_port
from jobcast.worker.settings import Settings

from .conftest import ServerHandle


class RestartableServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.handle: ServerHandle | None = None

    async def start(self) -> None:
        handle = ServerHandle(self.settings)
        # ServerHandle picks a fresh port; a restart keeps the old one.
        handle.port, handle.url, handle.server.config.port = self.port, self.url, self.port
        await handle.start()
        self.handle = handle

    async def stop(self) -> None:
        """Like SIGTERM: streams are drained (their clients reconnect), then the server exits."""
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None
