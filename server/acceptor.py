"""A standby acceptor: when the event loop falls behind, a thread takes the listening socket's new
connections out of the kernel's queue, so that none is dropped.

uvloop accepts every waiting connection once per loop turn. A server that falls behind has long
turns (each serves what came during the last), and the kernel's accept queue must hold everything
that arrives meanwhile: ``LISTEN_BACKLOG`` connections at most (``net.core.somaxconn`` caps it).
Past that the kernel drops the handshake's last packet, the client believes it is connected, and
its request waits in TCP's retransmission backoff: seconds, even tens of seconds, which can outlast
the head timeout (closed unanswered) or the client's patience. The soak showed it (BENCHMARKS.md §8):
hundreds of thousands of overflows, and a stream that got nothing.

So each listening socket of ``jobcast web`` has a thread that stands by, and costs nothing while
the loop keeps up:

- it waits (no GIL held) until a connection is waiting to be accepted;
- it then asks the loop for a sign of life (``call_soon_threadsafe``) and watches the queue;
- if the loop has not answered within :data:`GRACE_S`, or the queue is :data:`FULL_SHARE` full, the
  loop is behind: the thread accepts every waiting connection itself and hands them to the loop in
  one call (``loop.connect_accepted_socket``, asyncio's public way to serve a socket accepted
  elsewhere), with the protocol uvicorn would have made. They wait in the loop's queue (in order,
  with their requests already in their own socket buffers) instead of the kernel's, and are served
  when the loop gets to them, by the same protocol, under the same limits and head timeout.

While the loop keeps up it accepts everything itself and the thread only watches (at most
``1 / POLL_S`` checks a second while connections keep coming). What the thread accepted is counted
(:attr:`StandbyAcceptor.taken`) and logged once a minute at most, since it means the server is
short of CPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("jobcast.acceptor")

#: The loop is behind when a sign of life asked of it is this old and unanswered.
GRACE_S = 0.25
#: ... or when the accept queue is this share of its size full (a burst: a reconnect storm fills the
#: queue faster than any grace).
FULL_SHARE = 0.25
#: How often the thread looks again while connections are waiting.
POLL_S = 0.01
#: The most connections taken in one go (one hand-over to the loop).
TAKE_MOST = 4096
#: At most one log line about taking over per this many seconds.
LOG_EVERY_S = 60.0

# struct tcp_info (linux/tcp.h): for a listening socket, tcpi_unacked is the accept queue's length
# and tcpi_sacked its size (the backlog the kernel applied). Eight one-byte fields, then u32s:
# rto, ato, snd_mss, rcv_mss, unacked, sacked.
_TCP_INFO_QUEUE = struct.Struct("8x4xIIIII")


# accept4(2) called with the GIL held (ctypes.PyDLL): ``socket.accept()`` lets go of the GIL for each
# call and must win it back from a busy event loop after, up to the switch interval (5 ms) each
# time: a thread could then take only a few hundred connections a second from a loop that is
# behind, which is when it must take them all. Measured with a busy main thread: 3,000 waiting
# connections taken in 5.2 s with socket.accept(), in 0.16 s (the client's own pace) with this.
_libc = ctypes.PyDLL(None, use_errno=True)
_accept4 = _libc.accept4
_accept4.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_accept4.restype = ctypes.c_int
_ACCEPT_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def accept_waiting(listener: socket.socket, most: int) -> tuple[list[socket.socket], OSError | None]:
    """The connections waiting on non-blocking ``listener``, at most ``most``, accepted without letting
    go of the GIL in between, as non-blocking sockets (here, in the acceptor's thread: not on the loop
    that is behind); and the error that stopped it, if not "none left"."""
    taken: list[socket.socket] = []
    fd = listener.fileno()
    while len(taken) < most:
        connection = _accept4(fd, None, None, _ACCEPT_FLAGS)
        if connection < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return taken, None
            if code in (errno.EINTR, errno.ECONNABORTED):
                continue
            return taken, OSError(code, os.strerror(code))
        taken.append(accepted := socket.socket(fileno=connection))
        accepted.setblocking(False)  # (the descriptor is, SOCK_NONBLOCK; the socket object must know it)
    return taken, None


def accept_queue(sock: socket.socket) -> tuple[int, int]:
    """(connections waiting to be accepted, the queue's size) of listening TCP socket ``sock`` (Linux)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_QUEUE.size + 4)
    _ato, _snd_mss, _rcv_mss, waiting, size = _TCP_INFO_QUEUE.unpack_from(raw.ljust(_TCP_INFO_QUEUE.size, b"\0"))
    return waiting, size


class StandbyAcceptor:
    """Accepts for ``loop`` from listening socket ``fd`` while the loop is behind (module docstring).
    ``protocol_factory`` makes each connection's protocol, as the loop's own server does."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, protocol_factory: Callable[[], asyncio.BaseProtocol]
    ) -> None:
        self._loop = loop
        # The same listening socket (a second descriptor of it): closed by stop(), so that the
        # listener closes when the server's own descriptor does.
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        self._factory = protocol_factory
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False  # (set by stop(), or by the thread when the loop is gone)
        self._stopped = False
        #: When the sign of life asked of the loop was asked (None: answered).
        self._asked_at: float | None = None
        self._serving: set[asyncio.Task[object]] = set()
        self._logged_at = -LOG_EVERY_S
        #: Connections the thread accepted (the loop was behind).
        self.taken = 0
        self._thread = threading.Thread(target=self._run, name="jobcast-standby-acceptor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and let go of the listening socket (call on the loop; idempotent).
        Connections it handed over that the loop has not yet connected are closed, as uvicorn's own
        queue is at shutdown; those connected already are served (and drained) as every other."""
        if self._stopped:
            return
        self._stopped = self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            ready = poller.poll()  # (without the GIL) until a connection waits, or stop()
            if self._stopping:
                return
            if not any(fd == self._sock.fileno() for fd, _ in ready):
                continue
            if self._loop_is_behind():
                self._take()
            # The loop may accept meanwhile; or more arrive, to be taken together: look again then.
            self._pause(POLL_S)

    def _loop_is_behind(self) -> bool:
        now = time.monotonic()
        if self._asked_at is None:
            self._asked_at = now
            try:
                self._loop.call_soon_threadsafe(self._answer)
            except RuntimeError:  # the loop is closed: the server is gone
                self._stopping = True
                return False
            return False
        if now - self._asked_at >= GRACE_S:
            return True
        try:
            waiting, size = accept_queue(self._sock)
        except OSError:
            return False
        return waiting >= max(1, int(size * FULL_SHARE))

    def _answer(self) -> None:
        self._asked_at = None

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if stop() is called."""
        select.select([self._wake_r], [], [], seconds)

    def _take(self) -> None:
        taken, error = accept_waiting(self._sock, TAKE_MOST)
        if error is not None:  # out of descriptors, say: leave the rest queued, look again later
            logger.warning("the standby acceptor could not accept: %s", error)
            self._pause(GRACE_S)
        if not taken:
            return
        self.taken += len(taken)
        try:
            self._loop.call_soon_threadsafe(self._serve, taken)
        except RuntimeError:  # the loop is closed: the server is gone
            for connection in taken:
                connection.close()
            self._stopping = True

    # --- on the loop -----------------------------------------------------------------------------

    def _serve(self, taken: list[socket.socket]) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            logger.warning(
                "this server process is behind: %d connections accepted for it so far by its standby "
                "acceptor (served in turn, later than they came); it is short of CPU: run more server "
                "processes (JOBCAST_WEB_PROCESSES) on more cores",
                self.taken,
            )
        for connection in taken:
            task = self._loop.create_task(self._connect(connection))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _connect(self, connection: socket.socket) -> None:
        if self._stopping:  # the server stopped listening: as uvicorn's own queue is, these are closed
            connection.close()
            return
        try:
            await self._loop.connect_accepted_socket(self._factory, connection)
        except OSError:  # the client went away meanwhile
            connection.close()
