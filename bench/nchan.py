"""The reference for event streams: nginx with the nchan module, as configured for the comparison.

Debian packages it: ``apt-get install -y nginx-light libnginx-mod-nchan``. nginx runs in the
foreground from the run's temporary folder (its own config, pid file, logs, temp paths), listening
on 127.0.0.1 only:

- ``GET /sub/<channel>``  ``nchan_subscriber eventsource`` (SSE), every message sent as an
  ``event: job.progress`` block, like Jobcast's;
- ``POST /pub/<channel>`` the publisher, reachable from loopback only; each channel keeps a buffer
  of the last 1000 messages for an hour (``nchan_message_buffer_length``, ``nchan_message_timeout``),
  which is what a late or reconnecting subscriber would be replayed from.

One worker process by default: Jobcast's server is one process too, so both sides have one event loop
on one core (``--nginx-workers`` changes it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jobcast.cli.embedded_redis import free_port

from .harness import Proc, Processes, wait_http

MODULE_PATHS = (
    Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
    Path("/usr/share/nginx/modules/ngx_nchan_module.so"),
)
INSTALL_HINT = "install it with: apt-get update && apt-get install -y nginx-light libnginx-mod-nchan"

CONFIG = """\
worker_processes {workers};
worker_rlimit_nofile 60000;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
load_module {module};

events {{
    worker_connections 50000;
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256m;

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location = /healthz {{
            return 200 "ok";
        }}
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_eventsource_event job.progress;
        }}
        location ~ ^/pub/(\\w+)$ {{
            allow 127.0.0.1;
            deny all;
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 1h;
        }}
    }}
}}
"""


def find() -> tuple[str, Path] | None:
    """(nginx binary, nchan module) when both are installed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    module = next((p for p in MODULE_PATHS if p.exists()), None)
    if nginx is None or module is None:
        return None
    return nginx, module


def start(procs: Processes, *, workers: int | str = 1) -> tuple[Proc, int]:
    """Start nginx+nchan; returns the master process and the port."""
    found = find()
    if found is None:
        raise RuntimeError(f"nginx with the nchan module is not installed; {INSTALL_HINT}")
    nginx, module = found
    folder = procs.log_dir / "nginx"
    folder.mkdir(exist_ok=True)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(CONFIG.format(workers=workers, dir=folder, module=module, port=port))
    proc = procs.start("nginx", [nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)])
    wait_http(port, proc)
    return proc, port


def worker_pids(master_pid: int) -> list[int]:
    """The worker processes of an nginx master (where connections and their memory live)."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []
