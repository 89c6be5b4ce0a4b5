"""A cell that Redis Sentinel manages, on local ports: a primary, ``replicas`` replicas and one sentinel.

The sentinel is ``redis-server <conf> --sentinel`` (the redis-sentinel binary is the same program).
:meth:`SentinelCell.failover` forces a failover and returns once the sentinel has announced the
switch (``+switch-master``) and the new primary answers ``ROLE`` as a master: waited on, not slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import find_redis_server, free_port

from .children import redis_process, spawn

SERVICE = "cell0"


class SentinelCell:
    def __init__(self, root: Path, replicas: int = 1) -> None:
        self.root = root
        self.nodes = [redis_process(root / f"node{i}") for i in range(1 + replicas)]
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> None:
        primary, *replicas = self.nodes
        for node in self.nodes:
            node.start()
            with redis.Redis(port=node.port) as r:
                r.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not after 5 s
        for replica in replicas:
            with redis.Redis(port=replica.port) as r:
                r.replicaof("127.0.0.1", primary.port)
        # The replicas in sync before the sentinel looks at them: it reads a replica's INFO when it
        # finds it, then every 10 s, and promotes only a replica it has seen with its link up.
        self._wait(timeout, "replicas in sync", lambda: all(self._link_up(r.port) for r in replicas))
        conf = self.root / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.root}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 5000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self.sentinel = spawn(
            [find_redis_server(), str(conf), "--sentinel", "--logfile", str(self.root / "sentinel.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait(timeout, "the sentinel sees the replicas in sync", self._sentinel_ready)

    def _wait(self, timeout: float, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel cell: not {what} within {timeout}s: {self.log()}")
            time.sleep(0.02)

    @staticmethod
    def _link_up(port: int) -> bool:
        with redis.Redis(port=port, decode_responses=True) as r:
            return bool(r.info("replication").get("master_link_status") == "up")

    def _sentinel_ready(self) -> bool:
        try:
            with redis.Redis(port=self.sentinel_port, decode_responses=True) as s:
                replicas = s.sentinel_slaves(SERVICE)
        except redis.RedisError:
            return False
        good = [r for r in replicas if r["is_slave"] and not r["is_sdown"] and r.get("master-link-status") == "ok"]
        return len(good) == len(self.nodes) - 1

    def primary_port(self) -> int:
        with redis.Redis(port=self.sentinel_port, decode_responses=True) as s:
            return int(s.sentinel_get_master_addr_by_name(SERVICE)[1])

    async def failover(self, timeout: float = 30.0) -> int:
        """``SENTINEL FAILOVER``; returns the new primary's port once it is one."""
        old = self.primary_port()
        sentinel = Redis(port=self.sentinel_port, decode_responses=True)
        pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(timeout):
                await pubsub.subscribe("+switch-master")
                await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
                async for message in pubsub.listen():
                    name, _, _, _, port = str(message["data"]).split()
                    if name == SERVICE:
                        new = int(port)
                        break
                assert new != old
                async with Redis(port=new, decode_responses=True) as primary:
                    while (await primary.execute_command("ROLE"))[0] != "master":
                        await asyncio.sleep(0.02)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await sentinel.aclose()
        return new

    def log(self) -> str:
        path = self.root / "sentinel.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
