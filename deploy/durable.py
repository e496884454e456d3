"""Writes that survive a power cut: a rename makes a file appear whole or not at all, but only fsync makes its bytes
and the rename itself reach the disk. Without it a crash soon after a publish can leave CURRENT naming a version
whose weights are zero-length files, or a checkpoint that a resume then fails to read."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder's: the names in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder, deepest first, so that all of it is on disk before a rename
    publishes it."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fsync_path(path)
    for each in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(each)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """`path` written by `write` whole or not at all, and on disk when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda file: file.write(text.encode()))


def stale(folder: Path, older_than_s: float, now: float | None = None) -> bool:
    """Nothing in `folder` (nor the folder) changed for `older_than_s`: no writer is filling it any more."""
    newest = max((p.stat().st_mtime for p in [folder, *folder.rglob("*")]), default=0.0)
    return (now if now is not None else time.time()) - newest > older_than_s
