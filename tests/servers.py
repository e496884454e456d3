"""`rankloop serve` in its own process for the tests that go through the real HTTP API, and nginx in front of
several (Debian's nginx, with the proxying of deploy/docker/nginx.conf)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from deploy.launcher import stop_group, wait_healthy
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def start_server(data: Path, redis_url: str, engine: str, port: int, **settings: object) -> subprocess.Popen[bytes]:
    """`rankloop serve` on `data` and `port` with `engine` (`fake`, `hf`), other settings as keyword arguments, in
    a process group of its own (stop_group stops the engine's processes with it)."""
    env = {
        **os.environ,
        "RANKLOOP_DATA_DIR": str(data),
        "RANKLOOP_PORT": str(port),
        "REDIS_URL": redis_url,
        "RANKLOOP_ENGINE": engine,
        **{f"RANKLOOP_{k.upper()}": str(v) for k, v in settings.items()},
    }
    return subprocess.Popen([sys.executable, "-m", "rankloop", "serve"], env=env, cwd=REPO, start_new_session=True)


@contextmanager
def server_process(data: Path, redis_url: str, engine: str, **settings: object) -> Iterator[str]:
    """A server on `data` with `engine` (`fake`, `hf`), other settings as keyword arguments; yields its URL."""
    port = free_port()
    process = start_server(data, redis_url, engine, port, **settings)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=120)
        yield url
    finally:
        stop_group(process)


def nginx_executable() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


def nginx_conf(replicas: list[int], port: int, folder: Path) -> str:
    """deploy/docker/nginx.conf's proxying, its upstream the replicas' ports (no DNS here), as a whole config."""
    shipped = (REPO / "deploy" / "docker" / "nginx.conf").read_text()
    location = re.search(r"^    location / \{\n.*?^    \}\n", shipped, re.M | re.S)
    if location is None:
        raise ValueError("deploy/docker/nginx.conf has no `location / {...}` block")
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in replicas)
    return (
        f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
        "events { worker_connections 512; }\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {folder}/body;\n"
        f"    proxy_temp_path {folder}/proxy;\n"
        f"    upstream rankloop_serve {{\n{servers}        keepalive 32;\n    }}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n{location.group(0)}    }}\n}}\n"
    )


@contextmanager
def balancer(nginx: str, replicas: list[int], folder: Path) -> Iterator[str]:
    """nginx (`nginx_conf`) in front of the replicas on these ports, in the foreground; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "nginx.conf").write_text(nginx_conf(replicas, port, folder))
    process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(folder / "nginx.conf")], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)
