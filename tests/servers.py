"""`rankloop serve` in its own process for the tests that go through the real HTTP API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deploy.launcher import stop_group, wait_healthy
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def server_process(data: Path, redis_url: str, engine: str, **settings: object) -> Iterator[str]:
    """A server on `data` with `engine` (`fake`, `hf`), other settings as keyword arguments; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "RANKLOOP_DATA_DIR": str(data),
        "RANKLOOP_PORT": str(port),
        "REDIS_URL": redis_url,
        "RANKLOOP_ENGINE": engine,
        **{f"RANKLOOP_{k.upper()}": str(v) for k, v in settings.items()},
    }
    process = subprocess.Popen([sys.executable, "-m", "rankloop", "serve"], env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=120)
        yield url
    finally:
        stop_group(process)
