"""Follow the registry: when the current version changes, hot-swap it into this server.

On start it reads the current version, the epoch and the events stream's last id in one transaction, then blocks
on XREAD from that id: an event appended while this replica was away (or restarting) is still read, which pub/sub
would have lost. Events for an epoch it already serves are ignored; several queued events lead to one swap, to the
newest current version. A folder that fails the check never reaches the engine (a bad reload kills vLLM's engine):
the server keeps the old version and the registry marks the target `failed` with the reason. A version kept as an
adapter on the weights the engine holds is switched to without a reload (serve.swap.ServedVersion.switch).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.metrics import ServeMetrics
from deploy.canary import running_canary
from deploy.model_store import ADAPTER_FOLDER, ModelStore
from deploy.promotion import check_adapter, check_folder
from deploy.registry import AsyncRegistry
from serve.engine import AdapterRef, Engine
from serve.swap import CanaryServing, ServedVersion

log = logging.getLogger(__name__)
RETRY_S = 1.0


def serving_plan(store: ModelStore, version: str, adapters: bool) -> tuple[str, AdapterRef | None]:
    """(the version whose full weights to load, the adapter to serve on them) for `version`: its base and its
    adapter where the engine serves adapters and the version has one, else its own merged weights."""
    adapter = store.card(version).details.get("adapter") if adapters else None
    folder = store.path(version) / ADAPTER_FOLDER
    if adapter is None or not folder.is_dir() or adapter["base"] not in store.versions():
        return version, None
    return str(adapter["base"]), AdapterRef(version, folder)


class RegistryFollower:
    def __init__(
        self, redis: Redis, served: ServedVersion, engine: Engine, store: ModelStore, metrics: ServeMetrics
    ) -> None:
        self.registry, self.served, self.engine, self.store, self.metrics = (
            AsyncRegistry(redis),
            served,
            engine,
            store,
            metrics,
        )

    async def state(self) -> tuple[str | None, int, str]:
        """(current version, epoch, last event id), read in one transaction."""
        return await self.registry.state()

    async def run(self, block_ms: int = 1000) -> None:
        """Follow until cancelled; reconnect after Redis errors, re-reading the state so nothing is missed."""
        while True:
            try:
                current, epoch, last_id = await self.state()
                await self.catch_up(current, epoch)
                await self.follow_canary()
                while True:
                    newest = await self.registry.wait_for_events(last_id, block_ms)
                    if newest is None:
                        continue
                    last_id = newest
                    current, epoch, _ = await self.state()
                    await self.catch_up(current, epoch)
                    await self.follow_canary()
            except RedisError as exc:
                log.warning("registry unavailable (%s); retrying in %.0f s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def catch_up(self, current: str | None, epoch: int) -> None:
        """Swap to `current` if the registry's epoch is newer than the one served."""
        if current is None or epoch <= self.served.epoch:
            return
        if current == self.served.version and self.served.broken is None:  # a broken server loads it again
            self.served.epoch = epoch  # e.g. a rollback to what this replica never left
            return
        await self.swap(current, epoch)

    async def follow_canary(self) -> None:
        """Mix comparisons for the registry's canary where this server can: its candidate an adapter on the weights
        served, judged against the version served here (a replica not caught up yet mixes nothing)."""
        canary = await running_canary(self.registry.redis)
        if canary is None or canary.current != self.served.version or not self.engine.supports_adapters:
            self.served.canary = None
            return
        serving = self.served.canary
        if serving is not None and (serving.version, serving.started) == (canary.version, canary.started):
            return
        try:
            base, adapter = await asyncio.to_thread(serving_plan, self.store, canary.version, True)
            if base != self.served.base:
                raise ValueError(f"{canary.version} does not run on {self.served.base}'s weights")
            if adapter is not None:
                await asyncio.to_thread(check_adapter, adapter.folder)
                await self.engine.add_adapter(adapter)
        except Exception as exc:  # the canary collects nothing here; the current version is served as before
            log.error("cannot serve canary %s beside %s: %s", canary.version, self.served.version, exc)
            self.served.canary = None
            return
        self.served.canary = CanaryServing(canary.version, adapter, canary.share, canary.split, canary.started)
        log.info("canary %s: %.0f%% of comparisons mixed", canary.version, 100 * canary.share)

    async def swap(self, version: str, epoch: int) -> None:
        try:
            started_at, started = time.time(), time.monotonic()
            base, adapter = await asyncio.to_thread(serving_plan, self.store, version, self.engine.supports_adapters)
            if base == self.served.base and self.served.broken is None:
                # Same weights: only the adapter changes (or goes, to serve the base itself).
                if adapter is not None:
                    await asyncio.to_thread(check_adapter, adapter.folder)
                    await self.engine.add_adapter(adapter)
                times = await self.served.switch(version, epoch, adapter, time.monotonic() - started, started_at)
            else:
                folder, serving = self.store.path(base), self.store.path(self.served.base)
                # Reading the headers is file I/O: off the event loop, so answers keep flowing meanwhile.
                await asyncio.to_thread(check_folder, folder, serving)
                if adapter is not None:
                    await asyncio.to_thread(check_adapter, adapter.folder)
                checked = time.monotonic() - started
                times = await self.served.swap(
                    version,
                    epoch,
                    lambda: self._load(folder, adapter),
                    checked,
                    started_at,
                    restore=lambda: self.engine.load_weights(serving),  # a failed load may have left part of it
                    base=base,
                    adapter=adapter,
                )
        except Exception as exc:  # any failure: keep serving the old version, say so everywhere
            await self._failed(version, epoch, exc)
            return
        self.metrics.swap_seconds.labels("drain").observe(times.drain_s)
        self.metrics.swap_seconds.labels("load").observe(times.load_s)
        self.metrics.served_version.set(int(version.lstrip("v") or 0))
        log.info("now serving %s (epoch %d): drain %.3f s, load %.3f s", version, epoch, times.drain_s, times.load_s)

    async def _load(self, folder: Path, adapter: AdapterRef | None) -> None:
        await self.engine.load_weights(folder)
        if adapter is not None:
            await self.engine.add_adapter(adapter)

    async def _failed(self, version: str, epoch: int, exc: Exception) -> None:
        message = f"swap to {version} failed: {exc}"
        log.error("%s; still serving %s", message, self.served.version)
        self.served.last_error = message
        self.served.epoch = epoch  # do not retry the same decision forever; a new promote or rollback moves on
        self.metrics.swap_failures.inc()
        try:
            await self.registry.mark_failed(version, message)
        except RedisError:
            log.exception("could not mark %s failed in the registry", version)
