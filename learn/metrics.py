"""The learner's Prometheus metrics: the latest PPO iteration's figures, the reward model's held-out accuracy,
rounds and versions made. The same figures go to the JSONL logs under data_dir/runs for plotting history.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()
PPO_FIGURES = {
    "reward": "Mean normalised reward of the iteration's rollouts.",
    "kl_per_token": "Mean KL to the SFT reference per answer token.",
    "kl_per_answer": "Mean KL to the SFT reference per answer.",
    "beta": "KL penalty coefficient.",
    "entropy": "Mean policy entropy over answer tokens.",
    "clip_fraction": "Share of answer tokens whose policy ratio was clipped.",
    "value_loss": "Clipped value loss.",
    "advantage_scale": "Spread of the advantages before whitening (RLOO: their root mean square); near 0 the "
    "reward says next to nothing, and the steps PPO still takes are noise made full-sized.",
    "advantage_floor": "The least the advantages are divided by (a share of the reward model's score spread); "
    "where advantage_scale is below it, the steps shrink with the signal.",
    "ptx_loss": "The pre-training term: the LM loss of its texts, or their KL to the reference (LEARN_PTX_LOSS).",
    "answer_length": "Mean rollout answer length in tokens.",
    "generate_tokens_per_s": "Rollout generation speed.",
}
PPO = {name: Gauge(f"rankloop_learn_ppo_{name}", doc, registry=REGISTRY) for name, doc in PPO_FIGURES.items()}
PPO_ITERATIONS = Counter("rankloop_learn_ppo_iterations", "PPO iterations run.", registry=REGISTRY)
RM_ACCURACY = Gauge(
    "rankloop_learn_rm_heldout_accuracy", "Latest reward model's held-out pairwise accuracy.", registry=REGISTRY
)
ROUNDS = Counter("rankloop_learn_rounds", "Learning rounds by outcome.", ["outcome"], registry=REGISTRY)
ROUND_SECONDS = Gauge(
    "rankloop_learn_round_seconds", "Seconds the last round spent in each phase.", ["phase"], registry=REGISTRY
)
CANDIDATE = {
    "agreement": "Share of held-out ranked pairs the last new version agreed with (vs its parent, or vs the SFT "
    "reference), as the gate read it (RANKLOOP_LEARN_AGREEMENT_BY).",
    "empty": "Share of the last new version's evaluation answers that are empty.",
    "degenerate": "Share of the last new version's evaluation answers that are empty or loop.",
    "truncated": "Share of the last new version's evaluation answers cut by the length limit.",
    "kl": "The last new version's per-answer KL to the SFT reference.",
    "parent_kl": "The last new version's per-answer KL to its parent (how far its round moved it).",
}
CANDIDATE_GAUGES = {
    name: Gauge(f"rankloop_learn_candidate_{name}", doc, registry=REGISTRY) for name, doc in CANDIDATE.items()
}


def observe_ppo(figures: dict[str, float]) -> None:
    PPO_ITERATIONS.inc()
    for name, gauge in PPO.items():
        if name in figures:
            gauge.set(figures[name])


def observe_round(seconds: dict[str, float], candidate: dict[str, float]) -> None:
    for phase, value in seconds.items():
        ROUND_SECONDS.labels(phase).set(value)
    for name, gauge in CANDIDATE_GAUGES.items():
        if name in candidate:
            gauge.set(candidate[name])


def serve_metrics(host: str, port: int) -> None:
    """Expose the metrics on http://host:port/metrics from a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
