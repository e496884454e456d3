"""Which policy version this server is serving, and the switch from one to the next without a mixed answer.

Every generation runs inside `ServedVersion.use()`, which hands it the version it runs on. A swap closes the gate
(new requests wait), drains the generations already inside (they finish on the old weights), loads the new weights,
sets the version and opens the gate. So no answer mixes two versions, every answer names the version that produced
it, and no request fails: at worst it waits for the drain and the load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class SwapTimes:
    drain_s: float  # waiting for the answers in flight to finish on the old weights
    load_s: float  # the engine loading the new weights (and clearing its cache)
    total_s: float
    check_s: float = 0.0  # validating the folder before the gate closes (answers keep flowing meanwhile)
    started_at: float = 0.0  # wall-clock time the server took up the swap (to tell how fast it noticed)


class ServedVersion:
    def __init__(self, version: str, epoch: int = 0) -> None:
        self.version = version
        self.epoch = epoch  # the registry epoch this version was served for
        self.last_error: str | None = None  # the last swap that failed, for /healthz
        self.last_swap: SwapTimes | None = None
        self.in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()

    @property
    def swapping(self) -> bool:
        return not self._open.is_set()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[str]:
        """Run one generation on the served version; waits while a swap is under way."""
        await self._open.wait()
        self.in_flight += 1
        self._idle.clear()
        try:
            yield self.version
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def swap(
        self,
        version: str,
        epoch: int,
        load: Callable[[], Awaitable[None]],
        check_s: float = 0.0,
        started_at: float = 0.0,
    ) -> SwapTimes:
        """Drain, `load()` the new weights, then serve `version`. If `load` raises, the old version stays served.
        `check_s` and `started_at`: the caller's check of the folder before, kept with the swap's times."""
        async with self._lock:
            started = time.monotonic()
            self._open.clear()
            try:
                await self._idle.wait()
                drained = time.monotonic()
                await load()
                self.version, self.epoch, self.last_error = version, epoch, None
            finally:
                self._open.set()
            done = time.monotonic()
            self.last_swap = SwapTimes(drained - started, done - drained, done - started, check_s, started_at)
            return self.last_swap
