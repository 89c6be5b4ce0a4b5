"""Prove the wheel: installed outside the checkout, Jobcast runs from any directory.

Run by .ci/run after the test suite: ``python3 .ci/wheel_smoke.py``. It builds the wheel, installs
it (the server install, no extras) into a fresh virtualenv in a temporary folder, and from another
folder checks that

- ``python -c "import jobcast"`` works and no top-level ``server`` or ``worker`` is importable,
- ``python -m jobcast --version`` and ``jobcast --version`` agree with the package,
- ``jobcast web`` serves the dashboard at ``/`` and ``/healthz``,
- ``jobcast worker`` runs a job of the README's example job module to completion,
- a client command without the ``cli`` extra says how to install it (no traceback).

Standard library only; Redis is a redis-server of its own on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"wheel smoke: {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None)
    request.add_header("Authorization", "Bearer dev-key")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"wheel smoke: the process exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.2)  # polling a process that has no other readiness signal
    sys.exit(f"wheel smoke: {url} did not answer within {WAIT_S} s:\n{log.read_text()}")


def readme_job_module() -> str:
    """The example job module of the README, exactly as users copy it."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# myapp/jobs\.py\n.*?)```", readme, re.S)
    if match is None:
        sys.exit("wheel smoke: README.md has no '# myapp/jobs.py' example block")
    return match.group(1)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="jobcast-wheel-") as tmp_name:
        tmp = Path(tmp_name)
        dist, venv, elsewhere = tmp / "dist", tmp / "venv", tmp / "elsewhere"
        elsewhere.mkdir()
        # Built from a copy: setuptools builds in the source tree's build/, where files of an older
        # layout could linger and slip into the wheel; a clean clone has none, and neither has this.
        source = tmp / "source"
        shutil.copytree(
            ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", ".jobcast-data")
        )
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source, cwd=tmp)
        wheel = next(dist.glob("jobcast-*.whl"))
        run(sys.executable, "-m", "venv", venv, cwd=tmp)
        run(venv / "bin" / "pip", "install", "-q", wheel, cwd=tmp)
        python, jobcast = venv / "bin" / "python", venv / "bin" / "jobcast"

        version = run(python, "-c", "import jobcast; print(jobcast.__version__)", cwd=elsewhere).strip()
        assert run(jobcast, "--version", cwd=elsewhere).strip() == f"jobcast {version}"
        assert run(python, "-m", "jobcast", "--version", cwd=elsewhere).strip() == f"jobcast {version}"
        for name in ("server", "worker", "static", "cli", "tests"):
            found = run(
                python, "-c", f"import importlib.util as u; print(u.find_spec({name!r}) is None)", cwd=elsewhere
            )
            assert found.strip() == "True", f"the wheel installs a top-level {name!r} module"
        client = subprocess.run([jobcast, "status", "job_x"], cwd=elsewhere, capture_output=True, text=True)
        assert client.returncode == 2 and "jobcast[cli]" in client.stderr and "Traceback" not in client.stderr, client

        (elsewhere / "myapp").mkdir()
        (elsewhere / "myapp" / "__init__.py").write_text("")
        (elsewhere / "myapp" / "jobs.py").write_text(readme_job_module())
        redis_port, web_port = free_port(), free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        env = {
            **os.environ,
            "JOBCAST_ENV": "development",
            "JOBCAST_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "JOBCAST_JOB_MODULES": "myapp.jobs",
            "PYTHONPATH": str(elsewhere),
        }
        processes = [redis]
        try:
            web_log, worker_log = tmp / "web.log", tmp / "worker.log"
            with open(web_log, "wb") as out:
                web = subprocess.Popen(
                    [jobcast, "web", "--host", "127.0.0.1", "--port", str(web_port)],
                    cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(web)
            base = f"http://127.0.0.1:{web_port}"
            wait_until_up(base + "/healthz", web, web_log)
            status, page = http("GET", base + "/")
            assert status == 200 and b"<html" in page.lower(), (status, page[:200])
            status, body = http("GET", base + "/healthz")
            assert status == 200 and json.loads(body) == {"status": "ok"}, (status, body)

            with open(worker_log, "wb") as out:
                worker = subprocess.Popen(
                    [jobcast, "worker"], cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            processes.append(worker)
            status, body = http(
                "POST", base + "/jobs", {"type": "thumbnails", "params": {"images": ["a.png", "b.png"]}}
            )
            assert status == 202, (status, body)
            job_id = json.loads(body)["id"]
            job: dict[str, object] = {}
            deadline = time.monotonic() + WAIT_S
            while job.get("status") != "completed" and time.monotonic() < deadline:
                status, body = http("GET", f"{base}/jobs/{job_id}?wait=30")
                job = json.loads(body)
                assert job["status"] in ("queued", "processing", "completed"), job
            assert job.get("status") == "completed", f"{job}\n{worker_log.read_text()}"
            assert job["result"] == {"images": 2, "bytes": 2 * 320 * 320 * 3 // 4}, job
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(dist)
    print(f"wheel smoke: jobcast {version} installs, serves and runs jobs from any directory")


if __name__ == "__main__":
    main()
