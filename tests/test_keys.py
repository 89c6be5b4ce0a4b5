"""API keys stored in Redis: created, used, listed and revoked with `jobcast keys`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.settings import Settings

from .conftest import ROOT, ServerHandle


def jobcast_keys(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
    env.update(JOBCAST_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "jobcast", "keys", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_created_key_works_everywhere_and_a_revoked_one_nowhere(
    settings: Settings, redis: Redis, redis_server: RedisProcess
) -> None:
    created = jobcast_keys(redis_server.url, "create", "initech", "--name", "ci pipeline", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    key = info.pop("key")
    assert key.startswith(f"jck_{info['id']}_") and info["tenant"] == "initech"
    # Stored hashed: the key itself is nowhere in Redis.
    stored = await redis.hget(schema.API_KEYS, info["id"])
    assert stored is not None and key not in stored and info["id"] in stored

    a, b = ServerHandle(settings), ServerHandle(settings)
    await a.start()
    await b.start()
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as c:
            submitted = await c.post(f"{a.url}/jobs", json={"type": "sleep"})
            assert submitted.status_code == 202
            listed = await c.get(f"{b.url}/jobs")
            assert [j["id"] for j in listed.json()["items"]] == [submitted.json()["id"]]

            listing = jobcast_keys(redis_server.url, "list", "--json")
            assert [k["id"] for k in json.loads(listing.stdout)] == [info["id"]]
            assert key not in listing.stdout

            revoked = jobcast_keys(redis_server.url, "revoke", info["id"])
            assert revoked.returncode == 0 and info["id"] in revoked.stdout
            for server in (a, b):  # at once, in every process
                refused = await c.get(f"{server.url}/jobs")
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"].startswith("Bearer")
            # A key of the right shape with a wrong secret is refused too.
            forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
            assert (await c.get(f"{a.url}/jobs", headers={"Authorization": f"Bearer {forged}"})).status_code == 401
    finally:
        await a.stop()
        await b.stop()


async def test_key_commands_report_mistakes_in_one_line(redis: Redis, redis_server: RedisProcess) -> None:
    bad_tenant = jobcast_keys(redis_server.url, "create", "no spaces allowed")
    assert bad_tenant.returncode == 1
    assert bad_tenant.stderr.startswith("jobcast: tenant 'no spaces allowed' must be")
    assert "Traceback" not in bad_tenant.stderr
    unknown = jobcast_keys(redis_server.url, "revoke", "nosuchkey000")
    assert unknown.returncode == 1 and "jobcast keys list" in unknown.stderr
    assert await redis.exists(schema.API_KEYS) == 0
