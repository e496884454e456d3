"""Which policy version this server is serving, and the switch from one to the next without a mixed answer.

Every generation runs inside `ServedVersion.use()`, which hands it the version it runs on. A swap closes the gate
(new requests wait), drains the generations already inside (they finish on the old weights), loads the new weights,
sets the version and opens the gate. So no answer mixes two versions, every answer names the version that produced
it, and no request fails: at worst it waits for the drain and the load.

A generation holds the gate only while the engine writes it: answers are handed to their clients through a queue
(serve.chat), so a client that stops reading holds its connection, never the swap. The drain has a deadline
(`drain_timeout_s`): generations still running then are aborted (their unfinished choices end with
finish_reason "abort" and the comparison is not stored), so one very long answer cannot hold every new request
waiting behind a promotion.

A version kept as a LoRA adapter on the weights the engine already holds is served by `switch` instead: the next
generation takes the new adapter, those under way keep theirs (each lease holds its own), with no gate, no drain
and no reload; each answer is still labelled with the version that wrote it.

A load that fails may leave the engine with part of the new weights: the old weights are loaded back (`restore`),
and where that fails too the server is `broken`: it answers 503 (never an answer labelled with a version it is not
running) and /healthz says so, until a later swap loads a version whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from api.errors import ApiError
from serve.engine import AdapterRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapTimes:
    drain_s: float  # waiting for the answers in flight to finish on the old weights
    load_s: float  # the engine loading the new weights (and clearing its cache)
    total_s: float
    check_s: float = 0.0  # validating the folder before the gate closes (answers keep flowing meanwhile)
    started_at: float = 0.0  # wall-clock time the server took up the swap (to tell how fast it noticed)


@dataclass(frozen=True)
class CanaryServing:
    """A canary this server can answer with: its candidate as an adapter on the served weights, the share of
    comparisons to mix and how many of their answers the candidate writes (deploy.canary)."""

    version: str
    adapter: AdapterRef | None  # None: the candidate is the served weights' own version (the current an adapter)
    share: float
    split: int
    started: float  # the registry's canary it serves (a restarted one with other figures is another)


@dataclass(eq=False)  # by identity: two generations on one version are two leases
class Lease:
    """One generation's hold on the served version: the version it runs on (and its adapter, where it is served
    as one), the canary beside it when one runs, and the signal to stop early."""

    version: str
    adapter: AdapterRef | None = None
    canary: CanaryServing | None = None
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class ServedVersion:
    def __init__(
        self,
        version: str,
        epoch: int = 0,
        drain_timeout_s: float = 30.0,
        base: str | None = None,
        adapter: AdapterRef | None = None,
    ) -> None:
        self.version = version
        self.base = base or version  # the version whose full weights the engine holds
        self.adapter = adapter  # the version as an adapter on them; None: the base itself is served
        self.canary: CanaryServing | None = None  # set by the follower while a canary it can serve runs
        self.epoch = epoch  # the registry epoch this version was served for
        self.drain_timeout_s = drain_timeout_s
        self.last_error: str | None = None  # the last swap that failed, for /healthz
        self.last_swap: SwapTimes | None = None
        self.aborted = 0  # generations cut short by a drain deadline, since start
        self.broken: str | None = None  # why no version can be named for the engine's weights (see the docstring)
        self._leases: set[Lease] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()

    @property
    def swapping(self) -> bool:
        return not self._open.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._leases)

    def check(self) -> None:
        """Raise a 503 ApiError while the server is `broken`."""
        if self.broken is not None:
            raise ApiError(503, self.broken, code="no_weights", headers={"Retry-After": "30"})

    @asynccontextmanager
    async def use(self) -> AsyncIterator[Lease]:
        """Run one generation on the served version; waits while a swap is under way. The holder must stop
        generating soon after `lease.aborted` is set."""
        await self._open.wait()
        self.check()
        lease = Lease(self.version, self.adapter, self.canary)
        self._leases.add(lease)
        self._idle.clear()
        try:
            yield lease
        finally:
            self._leases.discard(lease)
            if not self._leases:
                self._idle.set()

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
            return
        except TimeoutError:
            stragglers = list(self._leases)
        log.warning(
            "%d generation(s) still running after the %g s drain deadline: aborting them",
            len(stragglers),
            self.drain_timeout_s,
        )
        self.aborted += len(stragglers)
        for lease in stragglers:
            lease.aborted.set()
        await self._idle.wait()  # an aborted generation stops at its next step

    async def swap(
        self,
        version: str,
        epoch: int,
        load: Callable[[], Awaitable[None]],
        check_s: float = 0.0,
        started_at: float = 0.0,
        restore: Callable[[], Awaitable[None]] | None = None,
        base: str | None = None,
        adapter: AdapterRef | None = None,
    ) -> SwapTimes:
        """Drain, `load()` the new weights (`base`'s, default `version`'s), then serve `version` (as `adapter` on
        them, where given). If `load` raises, `restore()` loads the old weights back and the old version stays
        served; if that raises too, the server is `broken`. `check_s` and `started_at`: the caller's check of the
        folder before, kept with the swap's times."""
        async with self._lock:
            started = time.monotonic()
            self._open.clear()
            try:
                await self._drain()
                drained = time.monotonic()
                try:
                    await load()
                except Exception as exc:
                    await self._restore(version, exc, restore)
                    raise
                self.version, self.epoch, self.last_error, self.broken = version, epoch, None, None
                self.base, self.adapter, self.canary = base or version, adapter, None  # the registry ended it
            finally:
                self._open.set()
            done = time.monotonic()
            self.last_swap = SwapTimes(drained - started, done - drained, done - started, check_s, started_at)
            return self.last_swap

    async def switch(
        self, version: str, epoch: int, adapter: AdapterRef | None, load_s: float = 0.0, started_at: float = 0.0
    ) -> SwapTimes:
        """Serve `version` as `adapter` on the weights the engine holds (None: those weights' own version) from
        the next generation on, with no pause and no drain: generations under way finish with the adapter they
        started with (their lease keeps it) and are labelled with their own version. `load_s`: the caller's
        loading of the adapter beforehand, kept with the swap's times."""
        async with self._lock:  # never in the middle of a reload
            self.version, self.epoch, self.adapter, self.last_error = version, epoch, adapter, None
            self.canary = None  # any change of the current version ends a canary (the follower reads it again)
            self.last_swap = SwapTimes(0.0, load_s, load_s, 0.0, started_at)
            return self.last_swap

    async def _restore(self, version: str, failure: Exception, restore: Callable[[], Awaitable[None]] | None) -> None:
        if restore is None:
            return
        try:
            await restore()
            self.broken = None  # the old weights are whole again, whatever an earlier failure left
        except Exception as again:
            self.broken = (
                f"loading {version} failed ({failure}) and loading {self.version} back failed too ({again}): this "
                "server serves nothing until a promotion or rollback loads a version whole, or it is restarted"
            )
            log.error("%s", self.broken)
