import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deploy.redis_server import EmbeddedRedis, RedisDataError, check_data_dir
from tests.conftest import free_port


def test_runs_with_aof_on_loopback(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, free_port()) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.set("k", "v")
    # Restarted on the same directory, the data is still there (the AOF was replayed).
    with EmbeddedRedis(tmp_path, free_port()) as server:
        assert redis.Redis.from_url(server.url).get("k") == b"v"


def test_refuses_a_directory_written_by_redis_7(tmp_path: Path) -> None:
    (tmp_path / "appendonlydir").mkdir()
    with pytest.raises(RedisDataError, match="Redis 7 or newer"):
        check_data_dir(tmp_path, "6.2.12")


def test_refuses_an_rdb_of_a_newer_format(tmp_path: Path) -> None:
    (tmp_path / "dump.rdb").write_bytes(b"REDIS0011" + b"\x00" * 16)
    with pytest.raises(RedisDataError, match="Redis 7 or newer"):
        check_data_dir(tmp_path, "6.2.12")


def test_refuses_another_major_version_by_its_marker(tmp_path: Path) -> None:
    check_data_dir(tmp_path, "7.2.4")
    check_data_dir(tmp_path, "7.0.1")  # same major: fine
    with pytest.raises(RedisDataError, match=r"written by Redis 7\.2\.4; this server is Redis 6\.2\.12"):
        check_data_dir(tmp_path, "6.2.12")


def test_dies_with_its_parent(tmp_path: Path) -> None:
    port = free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from deploy.redis_server import EmbeddedRedis; "
            f"s = EmbeddedRedis(Path({str(tmp_path)!r}), {port}); s.start(); print(s.process.pid, flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup code of the parent runs
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child_pid}").exists():
        status = Path(f"/proc/{child_pid}/status").read_text() if Path(f"/proc/{child_pid}").exists() else ""
        if "State:\tZ" in status:
            break
        time.sleep(0.1)
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)).ping()
