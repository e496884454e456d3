"""What a training run shows and keeps: a progress bar on the terminal and one JSON line per step on disk.

The JSONL file is the record an operator plots (`rankloop report`, pandas, jq): every line has `step`, `time`
and the run's figures. Of several learner processes (learn.distributed), rank 0 alone writes and shows them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from learn.distributed import world


class MetricsLog:
    """Append-only JSONL metrics; each line flushed at once, so a crash keeps every step logged before it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        if path is not None and world().main:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, **figures: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **figures}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class StepProgress:
    """A progress bar over training steps with the latest figures beside it; silent when `enabled` is False."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, **figures: float) -> None:
        if self._progress is not None and self._task is not None:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in figures.items())
            self._progress.update(self._task, advance=1, figures=shown)


@contextmanager
def step_progress(description: str, total: int, enabled: bool = True) -> Iterator[StepProgress]:
    if not enabled or not world().main:
        yield StepProgress(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[figures]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield StepProgress(progress, progress.add_task(description, total=total, figures=""))
