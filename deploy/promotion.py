"""What operators do with versions: check a folder, register the store's versions, promote and roll back.

A folder is checked before it can become current, because the engine's weight reload from a bad folder kills the
engine: the files must be there, and every tensor must have the name and shape the serving architecture expects
(read from the safetensors headers, without loading the weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from deploy.model_store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelStore, StoreError
from deploy.registry import Conflict, Registry, RegistryError

REQUIRED = ("config.json", "tokenizer_config.json")
log = logging.getLogger(__name__)


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118  (safe_open has no __iter__)
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return shapes


def check_folder(folder: Path, like: Path | None) -> None:
    """Raise RegistryError unless `folder` is a complete model whose tensors match those of `like`."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise RegistryError(f"{folder} lacks {', '.join(missing)}")
    try:
        json.loads((folder / "config.json").read_text())
        shapes = tensor_shapes(folder)
    except Exception as exc:  # any unreadable file: the folder is unusable
        raise RegistryError(f"{folder} is not a readable model: {exc}") from exc
    if not shapes:
        raise RegistryError(f"{folder} has no weights (*.safetensors)")
    if like is None:
        return
    expected = tensor_shapes(like)
    wrong = sorted(n for n in expected if shapes.get(n) != expected[n] and not n.endswith("lm_head.weight"))
    extra = sorted(set(shapes) - set(expected))
    if wrong or extra:
        names = ", ".join((wrong + extra)[:5])
        raise RegistryError(
            f"{folder} does not fit the served architecture: tensors {names} are missing, extra or of another shape"
        )


def check_adapter(folder: Path) -> None:
    """A version's adapter folder is whole (its config and weights, a config that names its rank): raises
    RegistryError saying what is missing, before an engine is asked to load it."""
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise RegistryError(f"{folder} lacks {', '.join(missing)}: the version's adapter is incomplete")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        rank = int(config["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{folder / ADAPTER_CONFIG} is not an adapter's config ({exc})") from exc
    if rank < 1:
        raise RegistryError(f"{folder / ADAPTER_CONFIG} gives rank {rank}")


def sync_store(registry: Registry, store: ModelStore) -> list[str]:
    """Register the store's versions the registry lacks; with no current version yet, make the store's current.
    A registry behind the store (its epoch below the one the store's current was written with: a Redis restarted
    empty or one that lost its last writes) takes the store's current back instead of starting over at v0001.

    Returns the versions newly registered.
    """
    added = []
    for version in store.versions():
        card = store.card(version)
        if registry.register(version, card.parent, card.made_by, card.created, card.details):
            added.append(version)
    current, epoch = registry.current()
    kept, kept_epoch = store.current(), store.current_epoch()
    if kept is None:
        return added
    if current is None and kept_epoch == 0:
        try:
            registry.switch(kept, None, "init", "rankloop", "first start: the model store's current")
        except Conflict:
            # Replicas started together on an empty registry: another one made the store's current current
            # between our read and this switch. It is what this one was about to do; starting must not fail on it.
            found, _ = registry.current()
            if found != kept:  # someone else's choice (an operator's promotion): it stands, and servable() reads it
                log.warning(
                    "the registry's first version is %s, set by another process, not the store's %s", found, kept
                )
    elif epoch < kept_epoch or current is None:
        restored = registry.restore(
            kept, kept_epoch, "rankloop", f"the registry had lost {kept} (epoch {kept_epoch}); kept in the store"
        )
        if restored is not None:
            log.warning("registry restored from the model store: %s at epoch %d", kept, restored)
            store.set_current(kept, restored)  # the store keeps the newest epoch, as after a promotion
    return added


def servable(registry: Registry, store: ModelStore) -> tuple[str | None, int, str | None]:
    """(version, epoch, why not the current one) for a server that starts: the registry's current version, or, where
    that one is failed or does not fit the reference's architecture (it is then marked failed), the newest version
    that was current before it and is sound. Starting on a failed version would crash the engine, or serve
    answers labelled with a version the engine is not running."""
    current, epoch = registry.current()
    if current is None:
        return None, epoch, None
    why = _unsound(registry, store, current)
    if why is None:
        return current, epoch, None
    seen, candidate = {current}, registry.previous_of(current)
    while candidate is not None and candidate not in seen and _unsound(registry, store, candidate) is not None:
        seen.add(candidate)
        candidate = registry.previous_of(candidate)
    if candidate is None or candidate in seen:
        candidate = store.reference()
    return candidate, epoch, f"{current} is failed ({why}); serving {candidate}, the last sound version, instead"


def _unsound(registry: Registry, store: ModelStore, version: str) -> str | None:
    """Why `version` must not be served, or None."""
    try:
        info = registry.show(version)
    except RegistryError as exc:
        return str(exc)
    if info.state == "failed":
        return info.error or "marked failed"
    try:
        reference = store.reference()
        check_folder(store.path(version), store.path(reference) if reference and reference != version else None)
    except (RegistryError, StoreError) as exc:
        registry.mark_failed(version, str(exc))
        return str(exc)
    return None


def promote(
    registry: Registry,
    store: ModelStore,
    target: str,
    who: str,
    why: str,
    expected: str | None = None,
    action: str = "promote",
) -> int:
    """Check `target`'s folder against the current version's, then switch to it; return the new epoch."""
    current, _ = registry.current()
    expect = expected if expected is not None else current
    if target == current:
        raise RegistryError(f"{target} is already the current version")
    try:
        folder = store.path(target)
        # The architecture every version shares is the reference's: a current version that does not fit it (one
        # that failed) must not make a good rollback target look wrong.
        model = store.reference() or current
        like = store.path(model) if model else None
    except StoreError as exc:
        raise RegistryError(str(exc)) from exc
    try:
        check_folder(folder, like)
    except RegistryError as exc:
        registry.mark_failed(target, str(exc))
        raise
    epoch = registry.switch(target, expect, action, who, why, above_epoch=store.current_epoch())
    try:
        store.set_current(target, epoch)  # what a Redis that loses its data is restored from (`sync_store`)
    except OSError as exc:
        log.warning("%s is current, but the model store's CURRENT could not be written: %s", target, exc)
    return epoch


def rollback(
    registry: Registry, store: ModelStore, who: str, why: str, target: str | None = None, expected: str | None = None
) -> tuple[str, int]:
    """Go back to `target`, or to the version that was current before the current one; return (version, epoch).
    With `expected`, only while that is still the current version (Conflict otherwise)."""
    current, _ = registry.current()
    if current is None:
        raise RegistryError("there is no current version to roll back from")
    if expected is not None and current != expected:
        raise Conflict(f"the current version is {current}, not {expected}: someone changed it meanwhile")
    previous = target or registry.previous_of(current)
    if previous is None:
        raise RegistryError(f"{current} has no previous version to roll back to; name one")
    return previous, promote(registry, store, previous, who, why, expected=current, action="rollback")
