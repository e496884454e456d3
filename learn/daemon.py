"""The learner daemon: turns users' rankings into new policy versions, one round at a time.

A round: enough new rankings in the dataset (the feedback consumer fills it) → continue the reward model on them
(the newest RANKLOOP_LEARN_RM_MAX_RANKINGS) and evaluate it on the newest held-out prompts → if its accuracy clears
the gate, a PPO round from the version users are served → evaluate the result against that version on held-out
prompts → write it to the model store and register it `ready` → promote it only where the settings allow and
the gate passes; otherwise an operator decides.

An interrupted PPO round (a crash, a SIGKILL) is resumed from its checkpoint before anything else.
What the learner is doing is published in Redis (`rankloop learn status` reads it) and in Prometheus metrics.

Under torchrun every process runs this loop: rank 0 decides (what it reads of the growing dataset and the registry
is agreed to the others, learn.distributed.agreed), all train their shares of each round, and rank 0 alone writes
status, versions and the registry. A round that fails in one process ends them all: torchrun restarts the job, which
resumes the round from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from deploy.canary import Canaries
from deploy.learner_status import STATUS_KEY
from deploy.model_store import ModelStore
from deploy.promotion import promote
from deploy.registry import Registry, finite
from deploy.settings import Settings
from learn import canary_rule, metrics
from learn.device import cap_memory, learn_device, out_of_memory
from learn.distributed import agreed, barrier, join, world, written_by_main
from learn.gate import Limits, promotion_gate, rm_gate
from learn.policy_eval import PolicyEval
from learn.ppo_run import CheckpointMismatch, RoundConfig, checkpoint_meta
from learn.precision import use_bf16
from learn.rounds import PPOOptions, PPOResult, RMOptions, RMResult, answers_ahead, ppo_round, rm_round
from learn.sources import count_rankings
from learn.trainlog import MetricsLog

log = logging.getLogger("rankloop.learner")


def compute(settings: Settings) -> tuple[str, bool]:
    """(device, bf16) of the learner's rounds: `learn_device` checked against the machine, and bf16 products where
    the operator says or, unset, where that device has them fast. Under torchrun, this process joins the others
    first (each on the GPU of its local rank). Raises learn.device.DeviceError."""
    _, device = join(learn_device(settings.learn_device))
    cap_memory(device, settings.learn_gpu_memory_fraction)
    return str(device), use_bf16(settings.learn_bf16, device)


def rm_options(settings: Settings, resume_from: str | None) -> RMOptions:
    device, bf16 = compute(settings)
    return RMOptions(
        resume_from=resume_from,
        epochs=settings.learn_rm_epochs,
        lr=settings.learn_rm_lr,
        bf16=bf16,
        device=device,
        train_layers=settings.learn_rm_train_layers,
        readout=settings.learn_rm_readout,
        held_out=settings.learn_rm_held_out if resume_from is None else None,  # a chain keeps its split
        max_train=settings.learn_rm_max_rankings,
        seed=settings.learn_seed,
    )


# The most versions a chain of undecided rounds holds on one served version. Each of its judgements reads much the
# same newest held-out rankings, so every further look is another chance for chance alone to pass a version that
# learned nothing: one look passes it 2.5% of the time (the 95% interval's low end above half), three at most
# 1 - 0.975^3 = 7.3% (less, as they share their pairs); a chain without end would, in time, pass one surely.
MAX_CHAIN = 3


def ppo_options(settings: Settings, parent: str, reward: str | None, replaces: str | None = None) -> PPOOptions:
    device, bf16 = compute(settings)
    return PPOOptions(
        parent=parent,
        replaces=replaces,
        reward=reward,
        prompt_file=settings.learn_prompt_file,
        ptx_file=settings.learn_ptx_file,
        ptx_source=settings.learn_ptx_source,
        bf16=bf16,
        device=device,
    )


def limits(settings: Settings) -> Limits:
    return Limits(
        max_ptx_ratio=settings.learn_max_ptx_ratio,
        max_kl=settings.learn_max_kl,
        min_step_kl=settings.learn_min_step_kl,
        min_agreement=settings.learn_min_agreement,
        min_agreement_pairs=settings.learn_min_agreement_pairs,
        agreement_by=settings.learn_agreement_by,
        agreement_interval=settings.learn_agreement_interval,
    )


class Learner:
    def __init__(self, settings: Settings, redis: Redis, show_progress: bool = False) -> None:
        self.settings, self.redis, self.show_progress = settings, redis, show_progress
        self.registry = Registry(redis)
        self.store = ModelStore(settings.store_dir)
        self.rewards = ModelStore(settings.reward_store_dir, prefix="r")
        self.rm: RMResult | None = None  # the reward-model round before the PPO round in flight, for its summary
        self.sampled_ahead: set[str] = set()  # served versions whose evaluation answers were seen to, while waiting
        # The last look that found the evaluation's prompts unsettled: (version, options, the event the rankings were
        # counted after, their count). Only a new ranking can settle them, so the next look waits for one instead of
        # reading every event again.
        self.unsettled_at: tuple[str, PPOOptions, str | None, int] | None = None
        # (version, the served version it was built on, how many versions the chain holds): the newest version of
        # this learner's own that the gate could not decide, which the next round builds on while the version under
        # it is still served (learn_build_on). Kept in memory: a restarted learner starts from the served version.
        self.building_on: tuple[str, str, int] | None = None
        for store in (self.store, self.rewards) if world().main else ():  # their writer: what a dead one left goes
            for name in store.sweep():
                log.warning("removed %s/%s, a version a stopped writer never finished", store.root, name)

    def record(self, summary: dict[str, Any]) -> None:
        """Every round's summary, one JSON line each in data_dir/runs/rounds.jsonl: the history an operator plots."""
        with MetricsLog(self.settings.data_dir / "runs" / "rounds.jsonl") as log:
            log.write(0, **finite(summary))  # JSON without NaN (a figure not measured: null), as the status

    def publish(self, phase: str, detail: str, **extra: Any) -> None:
        if not world().main:
            return
        try:
            self._publish(phase, detail, **extra)
        except RedisError as exc:
            if world().alone:
                raise
            # The others are in a round with rank 0: Redis away must not stop it mid-way.
            log.warning("status not published (%s): %s: %s", exc, phase, detail)

    def _publish(self, phase: str, detail: str, **extra: Any) -> None:
        status = {"phase": phase, "detail": detail, "updated": time.time(), **extra}
        previous = self.redis.get(STATUS_KEY)
        if previous and "last_round" not in extra:
            last = json.loads(previous).get("last_round")
            if last is not None:
                status["last_round"] = last
        # Figures not measured (the replaced version's step from its parent, agreement on no pairs) are NaN, which
        # JSON has not: the operator console's reading of this status would fail on one (a status an older learner
        # wrote, carried over, included).
        self.redis.set(STATUS_KEY, json.dumps(finite(status), allow_nan=False))
        log.info("%s: %s", phase, detail)

    def tick(self) -> str:
        """One look at the data: decide a canary users have judged, run a round when there is reason to; returns
        what happened, in a few words."""
        if self.settings.promote_on == "canary" and world().main:
            decided = canary_rule.judge(self.settings, self.registry, self.store)
            if decided is not None:
                self.publish("waiting", f"canary {decided}")
                metrics.ROUNDS.labels(f"canary_{decided.split()[0].rstrip(':')}").inc()
        checkpoint = self.settings.data_dir / "checkpoints" / "ppo.ckpt"
        pending = agreed(lambda: checkpoint_meta(checkpoint))
        if pending is not None:
            try:
                replaces = pending.get("replaces")
                return self._ppo(str(pending["parent"]), str(pending["reward"]), replaces and str(replaces))
            except CheckpointMismatch as exc:
                # A round this daemon cannot continue (another command's, or settings changed since): set it
                # aside rather than fail on it at every poll and never learn again.
                kept = checkpoint.with_name(f"ppo.{agreed(lambda: int(time.time()))}.set-aside.ckpt")
                barrier()  # every process has read the checkpoint and refused it before it moves
                written_by_main(lambda: checkpoint.replace(kept))
                self.publish("waiting", f"set aside an unfinished round it cannot resume ({exc}): {kept.name}")
                return "set aside"
        latest = agreed(lambda: next(reversed(self.rewards.versions()), None))
        after = self.rewards.card(latest).details.get("last_event_id") if latest else None
        new = agreed(lambda: count_rankings(self.settings, after))
        needed = self.settings.learn_min_rankings
        if new < needed:
            waiting = f"{new} of {needed} new rankings needed for a round"
            self.publish("waiting", waiting, new_rankings=new)
            if self._sample_ahead(after, new):
                self.publish("waiting", waiting, new_rankings=new)
            return "waiting"
        cap = self.settings.learn_rm_max_rankings
        taken = f"the newest {cap} of {new}" if new > cap else str(new)
        self.publish("reward model", f"training on {taken} new rankings" + (f" from {latest}" if latest else ""))
        rm = rm_round(self.settings, rm_options(self.settings, latest), show_progress=self.show_progress)
        self.rm = rm
        metrics.RM_ACCURACY.set(rm.evaluation.accuracy)
        settings = self.settings
        verdict = agreed(
            lambda: rm_gate(rm.evaluation, settings.learn_min_rm_accuracy, settings.learn_min_rm_heldout_pairs)
        )
        if not verdict.passed:
            detail = f"{rm.version} {verdict.why}: no PPO round; waiting for rankings"
            self.publish("waiting", detail, last_round={"reward_model": rm.version, "outcome": "rm below gate"})
            self.record(
                {
                    "reward_model": rm.version,
                    "outcome": "rm below gate",
                    "gate": verdict.why,
                    **rm.evaluation.figures("rm_"),
                    "seconds": {"reward_model": rm.seconds},
                }
            )
            metrics.ROUNDS.labels("rm_below_gate").inc()
            return "reward model below the gate"
        current = str(agreed(lambda: self.registry.current()[0] or self.store.current()))
        # Every process must train the same parent: only rank 0 knows the chain (its gate's verdicts).
        return self._ppo(agreed(lambda: self.start_from(current)), rm.version, current)

    def start_from(self, served: str) -> str:
        """The parent of the next round: the served version, or the undecided version this learner built on it
        (learn_build_on). Users served another version by now, or that version no longer `ready` (an operator
        rejected it): the chain ends. (`_finish` ends it at MAX_CHAIN versions.)"""
        if self.settings.learn_build_on != "undecided" or self.building_on is None:
            return served
        version, on, _ = self.building_on
        if on != served or self.registry.show(version).state != "ready":
            self.building_on = None
            return served
        return version

    def _sample_ahead(self, after: str | None, rankings: int) -> bool:
        """Once per served version, while the learner waits for rankings: its evaluation answers, which the round
        that replaces it would otherwise sample first (minutes on a CPU); again at a later wait, once `rankings`
        (those counted after the event `after`) has changed, while the prompts they answer may still change. True
        where it started sampling (and said so in the status)."""
        if not world().main:  # the others wait for rank 0 at the next tick's first agreement
            return False
        started = False

        def starting() -> None:
            nonlocal started
            started = True
            self.publish("waiting", f"sampling {current}'s evaluation answers ahead of the next round")

        current = None
        try:
            current = self.registry.current()[0] or self.store.current()
            if current is None or current in self.sampled_ahead:
                return False
            options, config = ppo_options(self.settings, current, None), RoundConfig.from_settings(self.settings)
            if self.unsettled_at == (current, options, after, rankings):
                return False
            if answers_ahead(self.settings, options, config, starting) == "unsettled":
                self.unsettled_at = (current, options, after, rankings)
            else:
                self.sampled_ahead.add(current)
        except Exception as exc:  # a head start (Redis away included): where it fails, the round samples them itself
            log.warning("could not sample %s's evaluation answers ahead of the round: %s", current, exc)
            if current is not None:
                self.sampled_ahead.add(current)
        return started

    def _ppo(self, parent: str, reward: str, replaces: str | None = None) -> str:
        def phase(saying: str) -> None:
            self.publish("ppo", f"{saying} (from {parent} with {reward})")

        config = RoundConfig.from_settings(self.settings)

        def step(iteration: int, of: int, figures: dict[str, float]) -> None:
            metrics.observe_ppo(figures)
            self.publish(
                "ppo",
                f"iteration {iteration}/{of} from {parent} with {reward}",
                iteration=iteration,
                iterations=of,
                reward=figures["reward"],
                kl=figures["kl_per_answer"],
            )

        self.publish("ppo", f"starting from {parent} with {reward}", iteration=0, iterations=config.iterations)
        options = ppo_options(self.settings, parent, reward, replaces)
        result = ppo_round(
            self.settings, config, options, on_step=step, show_progress=self.show_progress, on_phase=phase
        )
        return self._finish(result)

    def _finish(self, result: PPOResult) -> str:
        card = result.card
        if not world().main:  # the version, the registry and the figures are rank 0's to write
            return f"made {card.version}"
        self.registry.register(card.version, card.parent, card.made_by, card.created, card.details)
        verdict = promotion_gate(
            result.before, result.after, result.agreement, limits(self.settings), result.reference_ptx
        )
        outcome, refused, held = "ready", None, False
        if verdict.passed and self.settings.promote_on == "canary":
            running = Canaries(self.redis).running()
            if running is not None:  # users are judging another: this one waits, ready, for an operator
                refused, held = f"a canary of {running.version} is running", True
            else:
                refused = canary_rule.begin(self.settings, self.registry, self.store, card.version, verdict.why)
                outcome = "canary" if refused is None else outcome
        # Where no canary can run at all (no adapters served; a version on other weights), the gate alone.
        if verdict.passed and outcome == "ready" and not held and self.settings.learn_auto_promote:
            promote(
                self.registry,
                self.store,
                card.version,
                "learner",
                f"auto-promoted: {verdict.why}",
                expected=result.replaces,
            )
            outcome = "promoted"
        why = verdict.why
        chain = self.building_on[2] if self.building_on is not None and result.parent != result.replaces else 0
        self.building_on = None
        if outcome == "ready" and verdict.undecided and self.settings.learn_build_on == "undecided":
            if chain + 1 < MAX_CHAIN:
                self.building_on = (card.version, result.replaces, chain + 1)
                why += "; the next round builds on it"
            else:
                why += f"; {MAX_CHAIN} versions were built on {result.replaces}: the next round starts from it again"
        metrics.ROUNDS.labels(outcome).inc()
        rm, self.rm = self.rm, None
        seconds = {"reward_model": rm.seconds, **result.seconds} if rm is not None else dict(result.seconds)
        summary = {
            "version": card.version,
            "parent": result.parent,
            "replaces": result.replaces,
            "outcome": outcome,
            "gate": why,
            "passed": verdict.passed,
            "undecided": verdict.undecided,
            **({"no_canary": refused} if refused else {}),
            "before": _brief(result.before),
            "after": _brief(result.after),
            **result.agreement.figures(),
            "agreement_by": self.settings.learn_agreement_by,
            "seconds": seconds,
            **(rm.evaluation.figures("rm_") if rm is not None else {}),
        }
        agreed = result.agreement.share(self.settings.learn_agreement_by)  # the share the gate read
        metrics.observe_round(seconds, {**_brief(result.after), "agreement": agreed})
        self.publish("waiting", f"{card.version} {outcome} ({why})", last_round=summary)
        self.record({**summary, "reward_model": card.details.get("reward_model")})
        return f"{outcome} {card.version}"

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a failed round (or Redis away) must not end the daemon: say so, retry later
                log.exception("learning round failed")
                with contextlib.suppress(RedisError):
                    self.publish("error", failure(exc, self.settings))
                if not world().alone:
                    raise  # the others wait in a collective for this one: torchrun restarts them all
            stop.wait(self.settings.learn_poll_s)


def failure(exc: BaseException, settings: Settings) -> str:
    """What an operator reads of a failed round. Out of GPU memory, the round's memory is given back (the server,
    in its own process, goes on serving) and the message says what to change."""
    if out_of_memory(exc):
        import torch

        from learn import lower_cache

        lower_cache.CACHE.clear()  # kept states on the GPU would make the next round run out again
        torch.cuda.empty_cache()
        return (
            f"the round ran out of GPU memory on {settings.learn_device} ({str(exc).splitlines()[0]}); the server "
            "keeps serving. Give the learner a GPU of its own (RANKLOOP_LEARN_DEVICE=cuda:N), lower the engine's "
            "share (RANKLOOP_GPU_MEMORY_UTILIZATION), train fewer layers (RANKLOOP_LEARN_TRAIN_LAYERS) or take "
            "fewer comparisons an iteration (RANKLOOP_LEARN_PROMPTS_PER_ITERATION); the next round tries again"
        )
    return f"{type(exc).__name__}: {exc}"


def _brief(evaluation: PolicyEval) -> dict[str, Any]:
    return {
        "reward": evaluation.reward,
        "kl": evaluation.kl,
        "parent_kl": evaluation.parent_kl,
        "ptx_loss": evaluation.ptx_loss,
        "answer_length": evaluation.answer_length,
        "empty": evaluation.empty,
        "degenerate": evaluation.degenerate,
        "truncated": evaluation.truncated,
    }
