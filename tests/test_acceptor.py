"""The standby acceptor (``jobcast.acceptor``): while the event loop is stalled, new connections are
taken out of the kernel's accept queue by a thread and served once the loop gets to them; the
listening socket closes with the server."""

from __future__ import annotations

import asyncio
import socket
import time

from jobcast.acceptor import accept_queue, accept_waiting
from jobcast.worker.settings import Settings

from .conftest import ServerHandle

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def test_the_accept_queue_is_read_from_the_kernel() -> None:
    """The queue's length and size as the standby acceptor reads them (struct tcp_info of a
    listening socket): a kernel or Python that lays it out otherwise fails here, not in production."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(100)
        assert accept_queue(listener) == (0, 100)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(7)]
        try:
            assert accept_queue(listener) == (7, 100)
            listener.accept()[0].close()
            assert accept_queue(listener) == (6, 100)
        finally:
            for client in clients:
                client.close()


def test_waiting_connections_are_taken_up_to_a_limit() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(100)
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        try:
            first, error = accept_waiting(listener, 3)
            assert (len(first), error) == (3, None)
            rest, error = accept_waiting(listener, 100)
            assert (len(rest), error) == (2, None)
            assert accept_waiting(listener, 100) == ([], None)
            assert [c.getblocking() for c in first + rest] == [False] * 5
            peers = {c.getpeername() for c in first + rest}
            assert peers == {c.getsockname() for c in clients}
            for connection in first + rest:
                connection.close()
        finally:
            for client in clients:
                client.close()


def _read_answer(client: socket.socket) -> bytes:
    client.settimeout(60)
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    client.close()
    return answer


async def test_connections_that_come_while_the_loop_is_stalled_are_accepted_and_served(server: ServerHandle) -> None:
    [acceptor] = server.server.acceptors
    count = 20
    # The loop is blocked from here until the thread has taken every connection: only the thread
    # can accept meanwhile (the loop's own accept runs between its turns).
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    for client in clients:
        client.sendall(REQUEST)
    deadline = time.monotonic() + 60
    while acceptor.taken < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acceptor.taken == count
    # The loop runs again: each connection is served by the server's own protocol.
    answers = await asyncio.gather(*(asyncio.to_thread(_read_answer, client) for client in clients))
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [b"HTTP/1.1 200 OK"] * count


async def test_the_listening_socket_closes_with_the_server(settings: Settings) -> None:
    """The acceptor holds a second descriptor of the listening socket: stopping the server lets go of
    it, so that connections are refused, not queued for nobody."""
    handle = ServerHandle(settings)
    await handle.start()
    assert len(handle.server.acceptors) == 1
    await handle.stop()
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.1", handle.port)) != 0
    finally:
        probe.close()
