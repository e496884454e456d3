"""Policy versions on disk: one folder per version, each written under a temporary name and renamed in one step.

Layout of the store root::

    v0001/            config.json, model.safetensors, tokenizer files, card.json (and adapter/, see below)
    CURRENT           the version served by default, and the registry epoch that made it current (one line)
    REFERENCE         the SFT reference version (one line)

A reader never sees a half-written version: a folder exists under its final name only once complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.durable import fsync_path, fsync_tree, stale, write_text_atomic

REQUIRED_FILES = ("config.json", "tokenizer_config.json", "card.json")
# A version kept as a LoRA adapter on a base version too (card details `adapter`: base, rank) holds it here, in
# PEFT's folder format (learn.adapters writes it).
ADAPTER_FOLDER, ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter", "adapter_config.json", "adapter_model.safetensors"


class StoreError(RuntimeError):
    """A store operation that cannot proceed, phrased for the operator."""


@dataclass
class Card:
    """What a version is and how it was made; stored as card.json beside the weights."""

    version: str
    parent: str | None
    made_by: str
    created: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> Card:
        return cls(**json.loads((folder / "card.json").read_text()))


STALE_TMP_S = 3600.0  # a temporary version folder untouched this long has no writer left


class ModelStore:
    """Versions `<prefix>0001`, `<prefix>0002`…: policies are `v…` in data_dir/models, reward models `r…` in
    data_dir/reward_models."""

    def __init__(self, root: Path, prefix: str = "v") -> None:
        self.root = root
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d{{4,}})$")

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and self._pattern.match(p.name)]
        return sorted(found, key=lambda name: int(name[len(self.prefix) :]))

    def is_empty(self) -> bool:
        return not self.versions()

    def path(self, version: str) -> Path:
        folder = self.root / version
        if not self._pattern.match(version) or not folder.is_dir():
            known = ", ".join(self.versions()) or "none"
            raise StoreError(f"no version {version!r} in {self.root} (known: {known})")
        return folder

    def card(self, version: str) -> Card:
        return Card.read(self.path(version))

    def next_version(self) -> str:
        existing = self.versions()
        number = int(existing[-1][len(self.prefix) :]) + 1 if existing else 1
        return f"{self.prefix}{number:04d}"

    def _words(self, name: str) -> list[str]:
        file = self.root / name
        return file.read_text().split() if file.is_file() else []

    def _pointer(self, name: str) -> str | None:
        words = self._words(name)
        return words[0] if words else None

    def current(self) -> str | None:
        return self._pointer("CURRENT")

    def current_epoch(self) -> int:
        """The registry epoch that made `current()` current; 0 where none did (an import, an older store)."""
        words = self._words("CURRENT")
        return int(words[1]) if len(words) > 1 and words[1].isdigit() else 0

    def reference(self) -> str | None:
        return self._pointer("REFERENCE")

    def set_current(self, version: str, epoch: int = 0) -> None:
        """Make `version` the store's current, as of registry `epoch`. Changes that reach the store out of order (two
        promotions at once) keep the newest: an epoch lower than the one written is ignored."""
        self.path(version)
        with self._locked():
            if epoch and epoch < self.current_epoch():
                return
            write_text_atomic(self.root / "CURRENT", f"{version} {epoch}\n" if epoch else version + "\n")

    def _locked(self) -> AbstractContextManager[None]:
        """One writer of the pointers at a time, across processes."""
        return self._flocked(".lock")

    def importing(self) -> AbstractContextManager[None]:
        """One import at a time, across processes and machines that share the store: replicas that start together
        each run `rankloop model import --if-empty`, and the later ones must find the first one's version, not add
        theirs. Its own lock file: an import sets the pointers (`_locked`) while it holds this one."""
        return self._flocked(".import.lock")

    @contextmanager
    def _flocked(self, name: str) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / name).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def set_reference(self, version: str) -> None:
        self.path(version)
        write_text_atomic(self.root / "REFERENCE", version + "\n")

    @contextmanager
    def new_version(self, card: Card) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes ``card.version`` in one rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / card.version
        if final.exists():
            raise StoreError(f"version {card.version} already exists in {self.root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{card.version}-", dir=self.root))
        try:
            yield tmp
            (tmp / "card.json").write_text(card.to_json())
            missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
            if missing or not any(tmp.glob("*.safetensors")):
                raise StoreError(f"refusing to publish {card.version}: missing {missing or ['*.safetensors']}")
            tmp.chmod(0o755)  # mkdtemp makes it private; versions are read by other processes
            fsync_tree(tmp)
            os.rename(tmp, final)  # atomic on one filesystem; fails rather than overwrite
            fsync_path(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self, older_than_s: float = STALE_TMP_S) -> list[str]:
        """Remove what writers that died left behind (`.tmp-*` folders untouched for `older_than_s`); their
        names. A folder still being filled is newer than that, so a writer running beside this is left alone."""
        if not self.root.is_dir():
            return []
        swept = []
        for folder in sorted(self.root.glob(".tmp-*")):
            if folder.is_dir() and stale(folder, older_than_s):
                shutil.rmtree(folder, ignore_errors=True)
                swept.append(folder.name)
        return swept

    def publish(self, card: Card, fill: Callable[[Path], None]) -> Path:
        with self.new_version(card) as tmp:
            fill(tmp)
        return self.root / card.version
