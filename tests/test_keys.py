"""API keys stored in Redis: created, used, listed and revoked with `jobcast keys`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.keys import ApiKeys
from jobcast.worker import schema
from jobcast.worker.settings import Settings

from .conftest import ROOT, ServerHandle, make_settings, serving


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


async def test_tokens_minted_with_a_stored_key_stop_working_when_it_is_revoked(
    settings: Settings, redis: Redis, redis_server: RedisProcess
) -> None:
    keys = ApiKeys(redis)
    info, key = await keys.create("initech")
    _, other_key = await keys.create("initech")
    async with serving(settings, headers={"Authorization": f"Bearer {key}"}) as c:
        job = (await c.post("/jobs", json={"type": "sleep"})).json()
        stream_token = (await c.post("/tokens")).json()["token"]
        other_token = (await c.post("/tokens", headers={"Authorization": f"Bearer {other_key}"})).json()["token"]
        reads = [
            (f"/jobs/{job['id']}", job["token"]),
            ("/jobs", stream_token),
            (f"/jobs/{job['id']}/deliveries", stream_token),
        ]
        async with httpx.AsyncClient(base_url=c.base_url) as anonymous:  # the token is the only credential
            for path, token in reads:
                assert (await anonymous.get(path, params={"token": token})).status_code == 200

            await keys.revoke(info.id)
            for path, token in reads:
                refused = await anonymous.get(path, params={"token": token})
                assert refused.status_code == 401, (path, refused.text)
                assert "revoked" in refused.json()["detail"]
            # Tokens of the tenant's other key are not affected.
            assert (await anonymous.get("/jobs", params={"token": other_token})).status_code == 200


async def test_tokens_minted_with_a_configured_key_stop_working_when_it_is_removed(
    redis: Redis, redis_server: RedisProcess
) -> None:
    rotating = make_settings(redis_server.url, api_keys="acme:key-old,acme:key-new")
    async with serving(rotating, headers={"Authorization": "Bearer key-old"}) as c:
        old_token = (await c.post("/tokens")).json()["token"]
        new_token = (await c.post("/tokens", headers={"Authorization": "Bearer key-new"})).json()["token"]
    assert "key-old" not in old_token and "key-new" not in new_token  # nor its hash in the clear

    rotated = make_settings(redis_server.url, api_keys="acme:key-new")  # the same secret key signs
    async with serving(rotated, headers={}) as c:
        refused = await c.get("/jobs", params={"token": old_token})
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
        assert (await c.get("/jobs", params={"token": new_token})).status_code == 200
    removed = make_settings(redis_server.url, api_keys="globex:key-globex")  # the tenant is gone
    async with serving(removed, headers={}) as c:
        assert (await c.get("/jobs", params={"token": new_token})).status_code == 401
