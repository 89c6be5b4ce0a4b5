"""The SSRF guard: which addresses webhooks may reach, at submission and at delivery.

Only loopback traffic ever leaves these tests. Cases about other addresses (10.0.0.1,
169.254.169.254, ...) run against a stand-in network backend that records where it was asked to
connect and connects nowhere, or are refused by the server before any delivery exists; the
end-to-end delivery cases use receivers on 127.0.0.1 and ::1 and assert that nothing connected.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.worker import egress
from jobcast.worker.settings import Settings

from .conftest import running_worker, serving, submit, wait_for_deliveries
from .receiver import Receiver


class NowhereBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the network: records each connection asked for, and makes none."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.calls.append((host, port))
        return httpcore.AsyncMockStream([])


def resolver(answers: dict[str, list[str]], asked: list[str] | None = None) -> egress.Resolver:
    """A stand-in DNS: ``answers`` by name; other names do not exist."""

    async def resolve(host: str, port: int) -> list[str]:
        if asked is not None:
            asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "not globally routable"),
        ("192.0.2.1", "private"),  # documentation
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
        ("::ffff:169.254.169.254", "link-local (IPv4 169.254.169.254 inside IPv6)"),
        ("2002:a00:1::", "private (IPv4 10.0.0.1 inside IPv6)"),  # 6to4
        ("64:ff9b::7f00:1", "reserved"),
        ("3fff::1", "documentation"),  # RFC 9637 (2024): unknown to Python 3.11's ipaddress
        ("3fff:fff::1", "documentation"),
        ("192.0.0.8", "IETF protocol assignments"),
        ("192.88.99.1", "deprecated 6to4 relay anycast"),
        ("64:ff9b:1::1", "reserved"),
        ("1.1.1.1", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:1.1.1.1", None),
    ],
)
def test_which_addresses_are_public(address: str, reason: str | None) -> None:
    assert egress.refusal(address) == reason


@pytest.mark.parametrize(("network", "reason", "source"), egress.SPECIAL_PURPOSE)
def test_every_range_of_the_special_purpose_table_is_refused_with_its_source(
    network: egress.IPNetwork, reason: str, source: str
) -> None:
    assert source.startswith(("RFC ", "IANA "))
    for address in (network.network_address, network.broadcast_address):
        assert egress.refusal(str(address)) is not None, address


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "fd00:ec2::254", "internal.corp"]
)
async def test_the_backend_refuses_before_connecting(host: str) -> None:
    network = NowhereBackend()
    backend = egress.GuardedBackend(inner=network, resolver=resolver({"internal.corp": ["10.1.2.3", "127.0.0.1"]}))
    with pytest.raises(egress.DestinationRefused, match=r"not a public address|only to non-public"):
        await backend.connect_tcp(host, 443)
    assert network.calls == []


async def test_the_backend_connects_to_the_address_it_checked_without_resolving_again() -> None:
    network, asked = NowhereBackend(), []
    answers = {"rebinding.example": ["127.0.0.1", "10.0.0.7", "93.184.215.14", "1.1.1.1"]}
    backend = egress.GuardedBackend(inner=network, resolver=resolver(answers, asked))
    await backend.connect_tcp("rebinding.example", 443)
    assert network.calls == [("93.184.215.14", 443)]  # the first public answer, by address
    assert asked == ["rebinding.example"]  # resolved once: nothing left for a rebinding to change


async def test_the_backend_tries_the_next_checked_address_when_one_fails() -> None:
    class FirstFails(NowhereBackend):
        async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
            stream = await super().connect_tcp(host, port)
            if len(self.calls) == 1:
                raise httpcore.ConnectError("connection refused")
            return stream

    network = FirstFails()
    answers = {"two.example": ["93.184.215.14", "10.0.0.1", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}
    backend = egress.GuardedBackend(inner=network, resolver=resolver(answers))
    await backend.connect_tcp("two.example", 80)
    assert network.calls == [("93.184.215.14", 80), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", 80)]


async def test_allow_private_lets_every_address_through() -> None:
    network = NowhereBackend()
    backend = egress.GuardedBackend(allow_private=True, inner=network, resolver=resolver({}))
    await backend.connect_tcp("10.0.0.1", 80)
    assert network.calls == [("10.0.0.1", 80)]


async def test_the_submission_check_refuses_what_it_can_know_and_lets_the_rest_through() -> None:
    answers = {"internal.corp": ["10.0.0.5", "fd00::5"], "mixed.example": ["10.0.0.5", "1.1.1.1"]}
    refused = r"internal\.corp resolves only to non-public addresses: 10\.0\.0\.5 \(private\)"
    with pytest.raises(egress.DestinationRefused, match=refused):
        await egress.check_destination("internal.corp", 443, resolver=resolver(answers))
    with pytest.raises(egress.DestinationRefused, match=r"169\.254\.169\.254 is not a public address"):
        await egress.check_destination("169.254.169.254", 80, resolver=resolver(answers))
    # Checked again, on the address connected to, at every attempt:
    await egress.check_destination("mixed.example", 443, resolver=resolver(answers))  # one public answer
    await egress.check_destination("not-yet.example", 443, resolver=resolver(answers))  # no such name (yet)

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["10.0.0.1"]

    await egress.check_destination("slow.example", 443, resolver=slow, timeout_s=0.05)  # unknown: let through


# --- through the API ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "mentions"),
    [
        ("http://127.0.0.1/hook", ["127.0.0.1", "loopback"]),
        ("http://[::1]:8080/hook", ["::1", "loopback"]),
        ("http://10.0.0.1/hook", ["10.0.0.1", "private"]),
        ("http://169.254.169.254/latest/meta-data/", ["169.254.169.254", "link-local"]),
        ("http://localhost:9/hook", ["localhost resolves only to non-public", "loopback"]),
        ("http://[::ffff:127.0.0.1]/", ["loopback", "inside IPv6"]),
        ("http://0.0.0.0/", ["unspecified"]),
        ("http://2130706433/", ["127.0.0.1", "loopback"]),  # the URL parser normalises it
        ("https://[fe80::1]/", ["link-local"]),
        ("http://224.0.0.1/", ["multicast"]),
    ],
)
async def test_submissions_to_non_public_destinations_are_422(
    client: httpx.AsyncClient, redis: Redis, url: str, mentions: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The client learns that the URL is refused and why in general; what the server's resolver
    answered, and which kind of address it is, go to the server's log only."""
    before = set(await redis.keys("*"))
    with caplog.at_level("INFO", logger="jobcast.worker.webhooks"):
        response = await client.post("/jobs", json={"type": "sleep", "webhook": {"url": url}})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["errors"][0]["loc"] == ["body", "webhook", "url"]
    for mention in ["public address", "JOBCAST_WEBHOOK_ALLOW_PRIVATE"]:
        assert mention in body["detail"], body["detail"]
    for mention in [*mentions, "127.0.0.1", "resolves"]:
        assert mention not in body["detail"], body["detail"]
        assert mention not in orjson.dumps(body).decode()
    logged = [r.getMessage() for r in caplog.records if r.name == "jobcast.worker.webhooks"]
    assert any(all(m in line for m in mentions) for line in logged), logged
    assert set(await redis.keys("*")) == before  # nothing written


async def test_credentials_in_the_url_are_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"type": "sleep", "webhook": {"url": "https://me:pw@127.0.0.1/"}})
    assert response.status_code == 422 and "credentials" in response.json()["detail"]


@pytest.fixture
async def loopback_receivers() -> AsyncIterator[list[Receiver]]:
    receivers = [await Receiver("127.0.0.1").start(), await Receiver("::1").start()]
    yield receivers
    for r in receivers:
        await r.stop()


async def test_deliveries_to_non_public_addresses_are_refused_without_connecting(
    settings: Settings, redis: Redis, loopback_receivers: list[Receiver]
) -> None:
    """Submitted while private destinations were allowed; delivered by a worker that does not allow them."""
    v4, v6 = loopback_receivers
    urls = [v4.url, v6.url, f"http://localhost:{v4.port}/hook"]
    async with serving(settings.model_copy(update={"webhook_allow_private": True})) as client:
        tickets = [await submit(client, params={"seconds": 0, "steps": 1}, webhook={"url": url}) for url in urls]
        async with running_worker(settings):  # JOBCAST_WEBHOOK_ALLOW_PRIVATE is off here
            for ticket, url in zip(tickets, urls, strict=True):
                [delivery] = await wait_for_deliveries(client, ticket["id"], "dead")
                [attempt] = delivery["attempts"]  # not retried: it could not help
                assert attempt["status_code"] is None
                assert attempt["error"].startswith("refused, nothing sent: ") and "loopback" in attempt["error"]
                assert url == delivery["url"]
        dead = (await client.get("/webhooks/dead-letters")).json()["items"]
        assert len(dead) == 3 and all("loopback" in d["last_error"] for d in dead)
    assert v4.connections == 0 and v6.connections == 0
