"""The learner's side of `RANKLOOP_PROMOTE_ON=canary`: a version that passed the gate goes to users first, and
their rankings decide (feedback.leaderboard's rule): promoted when the lower end of its win rate over the current
version passes one half, rejected when the upper end falls below, after `canary_min_pairs` pairs."""

from __future__ import annotations

import contextlib

from deploy.canary import NO_ADAPTERS, Canaries
from deploy.model_store import ModelStore
from deploy.promotion import promote
from deploy.registry import Registry, RegistryError
from deploy.settings import Settings
from feedback.leaderboard import canary_verdict
from feedback.standings import standings


def begin(settings: Settings, registry: Registry, store: ModelStore, version: str, why: str) -> str | None:
    """Start `version`'s canary; None when started, else why not (servers do not serve adapters, another canary
    runs, or the two versions do not run on the same weights)."""
    if not settings.adapters_served:
        return NO_ADAPTERS
    try:
        Canaries(registry.redis).start(
            store, version, settings.canary_share, settings.canary_split, "learner", f"passed the gate: {why}"
        )
    except RegistryError as exc:
        return str(exc)
    return None


def judge(settings: Settings, registry: Registry, store: ModelStore) -> str | None:
    """Decide the running canary where users' rankings allow: 'promoted vX', 'rejected vX' or None (no canary, or
    not decided yet)."""
    canaries = Canaries(registry.redis)
    canary = canaries.running()
    if canary is None:
        return None
    board = standings(settings.dataset_path, canary.current, canary.started)
    versus = next((h for h in board.against_current if h.candidate == canary.version), None)
    verdict = canary_verdict(versus, settings.canary_min_pairs, settings.canary_max_pairs)
    if verdict == "continue" or versus is None:
        return None
    figures = f"win rate {versus.rate:.1%} (95% {versus.low:.1%}-{versus.high:.1%}) over {versus.pairs} pairs"
    try:
        if verdict == "promote":
            why = f"won its canary: {figures}"
            promote(registry, store, canary.version, "learner", why, expected=canary.current)
            return f"promoted {canary.version}"
        lost = verdict == "reject"
        why = f"lost its canary: {figures}" if lost else f"undecided: {figures}"
        canaries.stop("learner", why, expected=canary.version, rejected=lost)
        return f"{'rejected' if lost else 'undecided'} {canary.version}"
    except RegistryError as exc:
        # Someone changed the current version or the canary meanwhile, or the candidate's folder failed its
        # check (marked failed): end what is left of this canary rather than fail at every poll.
        with contextlib.suppress(RegistryError):
            canaries.stop("learner", f"could not act on its verdict ({verdict}): {exc}", expected=canary.version)
        return f"abandoned {canary.version}: {exc}"
