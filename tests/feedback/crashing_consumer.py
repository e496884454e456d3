"""A consumer that SIGKILLs itself at a chosen point of a chosen batch: the fault tests run it as a child.

    python -m tests.feedback.crashing_consumer REDIS_URL DATASET NAME POINT BATCH_NUMBER

POINT is `mid-insert` (rows written inside the open transaction, not committed) or `before-ack` (committed,
not acknowledged).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from redis import Redis

from feedback.consumer import FeedbackConsumer
from feedback.dataset import Dataset


class CrashingDataset(Dataset):
    def __init__(self, path: Path, point: str, batch: int) -> None:
        super().__init__(path)
        self.point, self.batch, self.seen = point, batch, 0

    def insert(self, events: list[tuple[str, str, str]]) -> int:
        self.seen += 1
        if self.seen == self.batch and self.point == "mid-insert":
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR IGNORE INTO events (id, ms, seq, kind, data) VALUES (?, 0, 0, ?, ?)",
                events[: len(events) // 2],
            )
            os.kill(os.getpid(), signal.SIGKILL)
        added = super().insert(events)
        if self.seen == self.batch and self.point == "before-ack":
            os.kill(os.getpid(), signal.SIGKILL)
        return added


def main() -> None:
    url, path, name, point, batch = sys.argv[1:6]
    dataset = CrashingDataset(Path(path), point, int(batch))
    FeedbackConsumer(Redis.from_url(url), dataset, name, batch=10, claim_idle_ms=0).drain()
    sys.exit("the consumer finished without reaching its crash point")


if __name__ == "__main__":
    main()
