"""What every benchmark needs: its own processes, their cost, and figures printed the same way.

Each benchmark starts everything it measures itself, on 127.0.0.1 only: a private redis-server
(:class:`jobcast.cli.embedded_redis.RedisProcess`), Jobcast servers and workers as subprocesses, nginx
when it compares against nchan. Subprocesses log to files in the run's temporary folder, which is
printed when something fails. Every process started here is stopped by :class:`Processes` on exit,
by its own pid.

Figures are printed as Markdown tables, so they can be pasted into BENCHMARKS.md as they are.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from jobcast.cli.embedded_redis import RedisProcess, find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
API_KEY = "bench-key-0123456789"
SECRET = "bench-secret-key-0123456789-0123456789-abcdef"
AUTH = f"Bearer {API_KEY}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (inherited by subprocesses)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def jobcast_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a Jobcast server or worker under test.

    Logs at WARNING (INFO logs one line per transition), the bench job types loaded, the queue cap
    raised so that a long run never answers 503, and the stream caps (20k per process, 10k per
    tenant by default) raised so that the fan-out can open more than 10k streams for one tenant;
    the per-tenant cap stays on, so its Redis round trip per stream is measured.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
    env.update(
        {
            "JOBCAST_ENV": "production",
            "JOBCAST_REDIS_URL": redis_url,
            "JOBCAST_API_KEYS": f"{TENANT}:{API_KEY}",
            "JOBCAST_SECRET_KEY": SECRET,
            "JOBCAST_JOB_MODULES": "bench.jobtypes",
            "JOBCAST_LOG_LEVEL": "WARNING",
            "JOBCAST_MAX_QUEUED": "10000000",
            "JOBCAST_SSE_MAX_STREAMS": "1000000",
            "JOBCAST_SSE_MAX_STREAMS_PER_TENANT": "1000000",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


class Proc:
    """A subprocess under test, logging to a file; CPU time and memory read from /proc."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(args), env=dict(env) if env is not None else None, cwd=ROOT, stdout=self._log, stderr=self._log
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def log_size(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def gc_pauses(self, since: int = 0) -> list[float]:
        """Garbage collections of 5 ms or more logged since byte ``since`` (``BENCH_GC_LOG``), in ms."""
        with self.log_path.open("rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
        return [float(line.split()[2]) for line in lines if line.startswith("gc: gen")]

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


class Processes:
    """Everything a benchmark started; stopped in reverse order when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []
        self._redis: list[RedisProcess] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(name, args, self.log_dir, env)
        self._procs.append(proc)
        return proc

    def redis(self, name: str = "redis") -> RedisProcess:
        server = RedisProcess(self.log_dir / name)
        server.start()
        self._redis.append(server)
        return server

    def jobcast_web(
        self, redis_url: str, name: str = "web", *, processes: int = 1, port: int | None = None, **env: str
    ) -> tuple[Proc, int]:
        """A Jobcast server as ``jobcast web`` runs it (uvloop, httptools), minus access log and INFO
        logs; with ``processes`` > 1, that many sharing the port (see :func:`server_pids`)."""
        port = port if port is not None else free_port()
        env = {"BENCH_GC_LOG": "1", **env}
        command = [sys.executable, "-m", "bench.serve", "jobcast", "--port", str(port), "--processes", str(processes)]
        proc = self.start(name, command, jobcast_env(redis_url, **env))
        wait_http(port, proc)
        if processes > 1:
            deadline = time.monotonic() + 30
            while len(server_pids(proc.pid)) < processes and time.monotonic() < deadline:
                time.sleep(0.1)
            for _ in range(20 * processes):  # until each has answered (the kernel spreads connections)
                wait_http(port, proc)
        return proc, port

    def bare_web(self, redis_url: str, name: str = "bare") -> tuple[Proc, int]:
        port = free_port()
        proc = self.start(
            name, [sys.executable, "-m", "bench.serve", "bare", "--port", str(port)], jobcast_env(redis_url)
        )
        wait_http(port, proc)
        return proc, port

    def jobcast_worker(self, redis_url: str, name: str = "worker", **env: str) -> Proc:
        """A worker as ``jobcast worker`` runs it."""
        return self.start(name, [sys.executable, "-m", "jobcast", "worker"], jobcast_env(redis_url, **env))

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()
        for server in reversed(self._redis):
            server.kill()  # the data is throwaway: no need to flush the append-only file
        self._redis.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(port: int, proc: Proc | None = None, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Wait until ``GET path`` on 127.0.0.1:port answers (any status)."""
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(request)
            if s.recv(12).startswith(b"HTTP/1."):
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"nothing answered on 127.0.0.1:{port} within {timeout}s" + (f":\n{proc.tail()}" if proc else "")
    )


# --- measuring processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def server_pids(pid: int) -> list[int]:
    """The server processes of a ``bench.serve`` process: its children when it supervises some."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except OSError:
        children = []
    return children or [pid]


class CpuMeter:
    """CPU seconds each of a set of processes spent between ``start()`` and ``stop()``, and what
    the rest of the machine (processes not ours: another engineer's tests...) used meanwhile."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.others = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_s()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self._t0
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        self.others = max(0.0, machine_busy_s() - self._busy0 - sum(self.used.values()))
        return self.used

    def summary(self) -> str:
        parts = [f"{name} {used:.2f}" for name, used in self.used.items()]
        return f"CPU-s over {self.wall:.1f}s: " + ", ".join(parts) + f"; not ours {self.others:.2f}"


def machine() -> dict[str, str]:
    """The facts BENCHMARKS.md records about the machine a run was made on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        [find_redis_server(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "redis": next((w.split("=", 1)[1] for w in redis_version if w.startswith("v=")), "?"),
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


# --- figures --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ratio(value: float, reference: float) -> str:
    if reference == 0 or value != value or reference != reference:  # NaN-safe
        return "n/a"
    return f"{value / reference:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, rule, *body])


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    print(f"\n## {title}\n", flush=True)
    t0 = time.monotonic()
    yield
    print(f"\n({title}: {time.monotonic() - t0:.0f}s)", flush=True)


def say(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


# --- profiling ------------------------------------------------------------------------------------


class Profiler:
    """``py-spy record`` of one process, summarised as the functions where its samples fall.

    Raw (collapsed-stack) output, one line per distinct stack with its sample count; ``top()``
    gives each function's share of the samples by itself (self) and with what it calls
    (inclusive). Idle time (the event loop waiting in epoll) is not sampled.
    """

    def __init__(self, pid: int, out: Path, *, rate: int = 250, native: bool = False) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            raise RuntimeError("py-spy is not installed in this venv: .venv/bin/pip install py-spy")
        self.out = out
        args = [str(spy), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        args += ["--nolineno", "--nonblocking", "--output", str(out)] + (["--native"] if native else [])
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # attach before the measured phase begins

    def stop(self) -> None:
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def top(self, count: int = 15) -> tuple[int, list[tuple[str, float, float]]]:
        """(samples, [(function, self %, inclusive %)]) for the ``count`` largest by self time."""
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        if not self.out.exists():
            return 0, []
        for line in self.out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            samples = int(n)
            frames = stack.split(";")
            total += samples
            own[frames[-1]] = own.get(frames[-1], 0) + samples
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + samples
        ranked = sorted(own.items(), key=lambda kv: -kv[1])[:count]
        return total, [(f, 100 * s / total, 100 * inclusive[f] / total) for f, s in ranked]

    def inclusive_top(self, names: Sequence[str]) -> list[tuple[str, float]]:
        """Inclusive share of the functions whose name contains one of ``names``."""
        found: dict[str, int] = {}
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            total += int(n)
            for frame in set(stack.split(";")):
                if any(name in frame for name in names):
                    found[frame] = found.get(frame, 0) + int(n)
        return sorted(((f, 100 * s / max(total, 1)) for f, s in found.items()), key=lambda kv: -kv[1])

    def report(self, title: str, count: int = 15) -> str:
        total, rows = self.top(count)
        lines = [f"py-spy, {title}: {total} samples (self % / inclusive %), raw stacks in {self.out}"]
        lines += [f"  {own:5.1f}% {inc:5.1f}%  {name}" for name, own, inc in rows]
        return "\n".join(lines)
