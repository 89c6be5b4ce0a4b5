"""A server that stops and starts again on the same port, as a restarted process would.

Clients that reconnect to the same URL (a browser's EventSource, ``jobcast tail``) must resume
from their last event id; this is how the tests restart the server under them.
"""

from __future__ import annotations

from jobcast.worker.settings import Settings

from .conftest import ServerHandle


class RestartableServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0  # any free port at the first start; the same one at every restart
        self.url = ""
        self.handle: ServerHandle | None = None

    async def start(self) -> None:
        handle = ServerHandle(self.settings, port=self.port)
        self.port, self.url = handle.port, handle.url
        await handle.start()
        self.handle = handle

    async def stop(self) -> None:
        """Like SIGTERM: streams are drained (their clients reconnect), then the server exits."""
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None
