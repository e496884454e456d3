"""The one settings object every rankloop process builds at start-up.

Sources, highest priority first: keyword arguments, ``RANKLOOP_*`` environment variables (``REDIS_URL`` too),
the TOML file named by ``RANKLOOP_CONFIG`` (or ``./rankloop.toml`` when present), the defaults below.
Unknown keys are errors in every source, environment included: a misspelt variable silently ignored is a
setting the operator believes is in force and is not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "RANKLOOP_"
# Variables with the prefix that steer the tooling rather than a process.
_NOT_SETTINGS = {"RANKLOOP_CONFIG", "RANKLOOP_VENV"}


MIN_ADMIN_TOKEN = 16
LEARN_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class SettingsError(ValueError):
    """A configuration problem, phrased for the operator."""


def config_file() -> Path | None:
    named = os.environ.get("RANKLOOP_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"RANKLOOP_CONFIG={named}: no such file")
        return path
    local = Path("rankloop.toml")
    return local if local.is_file() else None


def cpu_list(value: str) -> set[int]:
    """The cores of a CPU list such as `0-1,3`; ValueError says what is wrong with it."""
    cores: set[int] = set()
    for part in value.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or int(high or low) < int(low):
            raise ValueError(f"{value!r} is not a CPU list such as `0-1` or `0,2`")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


ADAPTER_RANKS = (0, 8, 16, 32, 64, 128, 256)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # -- storage --------------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Root of the model store and the embedded Redis data.")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "RANKLOOP_REDIS_URL", "REDIS_URL"),
        description="Use this Redis server; unset: start the embedded one.",
    )
    redis_port: int = Field(6390, ge=1, le=65535, description="Port of the embedded Redis server.")
    redis_maxmemory: str | None = Field(
        None,
        pattern=r"^[0-9]+(b|kb|mb|gb)?$",
        description="Memory the embedded Redis may use, such as `2gb`; unset: a quarter of this machine's. It never "
        "evicts (noeviction): full, it refuses writes (clients get a 503) and loses nothing stored; /healthz warns "
        "above 80%.",
    )
    redis_timeout_s: float = Field(
        5.0,
        ge=2.0,  # the blocking reads (the follower's, the consumer's) block for 1 s
        le=300.0,
        description="A Redis command that has no answer this long fails (clients get a 503) instead of hanging: a "
        "Redis that is stopped, overloaded or cut off by the network never holds a request, a swap or the learner.",
    )

    # -- HTTP server ----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP server.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body.")
    allowed_origins: list[str] = Field(
        [],
        description="Origins (scheme://host:port) of web pages besides this server's own that may send rankings, "
        "demonstrations and admin changes from a browser, as a JSON list; every other origin gets a 403.",
    )
    auth: Literal["open", "keys"] = Field(
        "open",
        description="`keys`: chat, feedback and admin routes want `Authorization: Bearer <key>` (`rankloop keys "
        "create`); `open`: anyone who reaches the server, allowed only on a loopback `host`.",
    )
    api_key: SecretStr | None = Field(
        None, description="The key rankloop's own clients (`rankloop simulate`) send to a server with `auth=keys`."
    )
    auth_open_anywhere: bool = Field(
        False, description="Allow `auth=open` on an address other machines reach (a proxy in front checks users)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin API (/admin/); unset: the admin API is disabled."
    )
    swap_drain_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="A swap aborts generations still running after this long (their choices end 'abort').",
    )
    stream_send_timeout_s: float = Field(
        30.0, gt=0.0, description="A streaming client that reads nothing for this long is disconnected."
    )
    access_log: bool = Field(False, description="Log a line per HTTP request (costly at thousands per second).")

    # -- quotas (deploy.quota): per API key, and per client address other than this machine's; 0: none -----
    quota_chat_per_minute: int = Field(120, ge=0, description="Chat requests a minute per key and per address.")
    quota_tokens_per_minute: int = Field(
        100_000, ge=0, description="Generated tokens a minute per key and per address (all candidates counted)."
    )
    quota_rankings_per_minute: int = Field(240, ge=0, description="Rankings a minute per key and per address.")
    quota_demonstrations_per_minute: int = Field(
        30, ge=0, description="Demonstrations a minute per key and per address."
    )
    max_rankings_per_comparison: int = Field(
        16, ge=0, description="Rankings one comparison takes at most (from different users); 0: no cap."
    )

    # -- generation -----------------------------------------------------------------------------
    default_n: int = Field(4, ge=1, le=9, description="Candidates per prompt when a request gives no `n`.")
    default_max_tokens: int = Field(256, ge=1, description="Answer length limit when a request gives none.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    comparison_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long a comparison stays rankable.")
    web_show_versions: bool = Field(
        False,
        description="The chat page and the API's choices name the version that wrote each answer. Off by default: "
        "a rater who knows which version wrote an answer ranks the label, not the answer.",
    )

    # -- feedback -------------------------------------------------------------------------------
    idempotency_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long a ranking or demonstration is remembered to recognise retries."
    )
    feedback_max_backlog: int = Field(
        20_000,
        ge=0,
        description="Entries the feedback stream holds at most while the learner's consumer has not stored them "
        "(it trims what it stored): beyond, feedback is refused with a 503 until it catches up; 0: no bound.",
    )
    feedback_batch: int = Field(256, ge=1, le=10_000, description="Events the consumer moves per batch.")
    feedback_claim_idle_ms: int = Field(
        60_000, ge=0, description="Take over events a dead consumer left unacknowledged this long."
    )
    feedback_consumer: str | None = Field(
        None, description="Consumer name in the group; unset: the host's name and a hash of the dataset's path."
    )

    # -- learner --------------------------------------------------------------------------------
    learn_threads: int | None = Field(
        None, ge=1, description="CPU threads for training; unset: PyTorch's default (all cores)."
    )
    learn_cpus: str | None = Field(
        None, description="CPU cores the learner may run on, a list such as `1` or `2-3`; unset: any."
    )
    learn_device: str = Field(
        "auto",
        description="Where the learner computes (SFT, reward model, PPO, evaluations): `auto` (the first CUDA GPU "
        "when there is one, else the CPU), `cpu`, `cuda` or `cuda:N`.",
    )
    learn_gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Share of the learner GPU's memory the learner may allocate (a round past it fails, saying so); "
        "unset: all of it, or under `rankloop up` with the engine on the same GPU, what the engine leaves.",
    )
    learn_bf16: bool | None = Field(
        None,
        description="bf16 matrix products in learning rounds; unset: on where the learner's device has them fast (a "
        "GPU with bf16, a CPU with AMX or AVX512-BF16; on other CPUs they are slower than fp32).",
    )
    serve_adapters: bool = Field(
        False,
        description="Serve a version kept as an adapter (MAX_ADAPTER_RANK) as that adapter on its base's weights: "
        "switching between versions of one base is then instant, with no drain, and a canary can run. false: "
        "merged weights, a reload each time (the default: on 2 CPU cores adapters cost 30-45% of serving "
        "throughput, BENCHMARKS.md).",
    )
    max_adapter_rank: int = Field(
        64,
        description="A LoRA version is kept as one adapter on its full-weight base (beside its merged weights) while "
        "the chain's rank stays within this (each round adds its own); above, as full weights only, a new base. "
        "0: no adapters.",
    )
    learn_train_layers: int = Field(6, ge=0, description="Upper layers PPO trains (its LoRA adapters); 0: all.")
    learn_rm_train_layers: int = Field(
        2, ge=0, description="Upper layers the reward model trains (their weights and its head); 0: all."
    )
    learn_lower_cache_mb: int = Field(
        1024,
        ge=0,
        description="Memory the learner keeps the frozen lower layers' hidden states of ranked answers in, from one "
        "pass and round to the next (learn.lower_cache); 0: computed every time.",
    )
    learn_rm_readout: Literal["last", "mean", "lme"] = Field(
        "lme",
        description="How a new reward model reads its score (a continued one keeps its own): `lme`, the log-mean-exp "
        "of its answer tokens' scores (a soft maximum: a word said once anywhere can carry it; on the curves in "
        "BENCHMARKS.md 0.79-0.98 held-out accuracy at 128 rankings where `last` gave 0.58-0.77); `last`, the last "
        "token's (InstructGPT's); `mean`, of every token's, prompt included, which lets PPO buy reward with length.",
    )
    learn_rollouts: Literal["served", "sampled"] = Field(
        "served",
        description="PPO's rollouts: `served`, the answers users ranked as the served version wrote them (no "
        "generation); `sampled`, answers the policy samples in the learner.",
    )
    learn_reward: Literal["model", "zero"] = Field(
        "model", description="`zero`: PPO's reward-model score replaced by 0, KL and ptx only (a control)."
    )
    learn_advantage: Literal["gae", "rloo"] = Field(
        "gae",
        description="PPO's advantages: `gae`, per token from a value model (InstructGPT's); `rloo`, each answer's "
        "return less the mean of the other answers to its prompt (the K answers of a served comparison; with "
        "sampled rollouts, 4 sampled to each prompt), no value model.",
    )
    learn_clip_centre: Literal["served", "iteration"] = Field(
        "iteration",
        description="Where PPO's clip is centred on served answers: `iteration`, the policy at the start of each "
        "iteration, the answers weighted by its probability over the writer's (decoupled PPO, Hilton et al. 2021); "
        "`served`, the version that wrote them, so that for a whole round no gradient pushes a sampled token past "
        "1 ± 0.2 times the writer's probability (one round from v0001 on `concise` rankings: 78.3% over v0001 with "
        "GAE, 72.5% with RLOO, against 60.8% with RLOO centred on the writer, BENCHMARKS.md).",
    )
    learn_advantage_floor: float = Field(
        0.2,
        ge=0.0,
        description="The least PPO divides its advantages by, as a share of the reward model's score spread over the "
        "reference's answers. Whitening alone makes steps of full size from any reward, even one that says nothing "
        "(with the score replaced by 0, a version drifted to 67% under `concise`, BENCHMARKS.md); 0 whitens alone.",
    )
    learn_enabled: bool = Field(True, description="`rankloop up` starts the learner daemon.")
    learn_min_rankings: int = Field(64, ge=1, description="New rankings that start a learning round.")
    learn_min_rm_accuracy: float = Field(
        0.6, ge=0.0, le=1.0, description="Reward-model held-out accuracy below which no PPO round runs."
    )
    learn_rm_held_out: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Share of ranked prompts that neither the reward model nor PPO trains on: their rankings measure "
        "the reward model's accuracy and judge a new version's agreement with users (a fifth gives a young loop's "
        "first round about 300 pairs to be judged on; a tenth left it short of evidence, BENCHMARKS.md).",
    )
    learn_min_rm_heldout_pairs: int = Field(
        20, ge=0, description="Held-out answer pairs the reward model's accuracy must be measured on before PPO runs."
    )
    learn_ppo_iterations: int = Field(
        4,
        ge=1,
        description="PPO iterations per round. Four: rounds that compound; on 2 CPU cores beside a busy server they "
        "took 7-9 minutes with short ptx texts (15-17 with the reference's answers as ptx texts) and learned more "
        "within an hour than six did in rounds of 15-22 (BENCHMARKS.md).",
    )
    learn_seed: int = Field(
        0,
        description="Seed of a learning round: the reward model's new head, the PPO adapters' initialisation, the "
        "rollouts' draw, the order of the batches.",
    )
    learn_ppo_epochs: int = Field(2, ge=1, description="Passes of each PPO iteration's optimiser over its rollouts.")
    learn_ppo_lr: float = Field(5e-4, gt=0.0, description="PPO learning rate (policy LoRA adapters and value model).")
    learn_rm_lr: float = Field(
        1e-3,
        gt=0.0,
        description="Reward-model learning rate (its upper `learn_rm_train_layers` layers' weights): with the `lme` "
        "readout, one pass over 64 rankings reached 0.70 held-out accuracy at 1e-3 and 0.63 at 2e-4 (BENCHMARKS.md).",
    )
    learn_rm_epochs: int = Field(
        1, ge=1, description="Passes of a reward-model round over its new rankings (more where rankings are few)."
    )
    learn_rm_max_rankings: int = Field(
        64,
        ge=1,
        description="A reward-model round trains on the newest this many new ranked prompts at most (the older "
        "are passed over), so that a round's length does not grow with the backlog that piled up during the last.",
    )
    learn_prompts_per_iteration: int = Field(
        8, ge=1, description="Prompts per PPO iteration: served comparisons (K answers each), or sampled prompts."
    )
    learn_max_new_tokens: int = Field(
        256, ge=1, description="Answer length limit of sampled PPO rollouts and of the learner's evaluations."
    )
    learn_prompt_file: Path | None = Field(None, description="Extra prompts (JSONL) for PPO besides users' own.")
    learn_ptx_file: Path | None = Field(
        None, description="Text (or JSONL) for PPO's pre-training term; unset: users' demonstrations."
    )
    learn_ptx_source: Literal["demonstrations", "reference"] = Field(
        "demonstrations",
        description="PPO's pre-training texts where no file is set: users' demonstrations, or `reference`: every "
        "answer the SFT reference wrote to users' ranked prompts, whatever its rank.",
    )
    learn_ptx_coef: float = Field(0.5, ge=0.0, description="Weight of the pre-training term in PPO.")
    learn_ptx_loss: Literal["lm", "reference_kl"] | None = Field(
        None,
        description="PPO's pre-training loss: `lm`, the LM loss of its texts; `reference_kl`, the KL to the SFT "
        "reference's next-token distribution on them. Unset: `reference_kl` on the reference's own answers "
        "(LEARN_PTX_SOURCE=reference, no file), whose LM loss it is without the sampled token's noise; `lm` else.",
    )
    learn_auto_promote: bool = Field(
        False, description="Promote a new version by itself when it passes the evaluation gate."
    )
    learn_build_on: Literal["served", "undecided"] = Field(
        "served",
        description="What a learning round starts from: `served`, the version users are served; `undecided`, the "
        "newest version the learner made on top of it that the gate refused for want of evidence alone (every other "
        "check passed, its share of held-out pairs above half, and more pairs could still get it through), so that a "
        "round's learning is kept while users' held-out rankings cannot tell yet. Such a chain is judged against the "
        "served version, its steps together; a refusal for cause, a promotion, another served version or a third "
        "undecided version ends it.",
    )
    promote_on: Literal["reward", "canary"] = Field(
        "reward",
        description="What promotes a version that passed the gate: `reward`, the gate itself (with "
        "LEARN_AUTO_PROMOTE); `canary`, users: it goes to a canary, and the learner promotes it when the lower end "
        "of its win rate over the current version passes one half after CANARY_MIN_PAIRS pairs, or rejects it when "
        "the upper end falls below.",
    )
    canary_share: float = Field(0.25, gt=0.0, le=1.0, description="Share of comparisons a learner's canary mixes.")
    canary_split: int = Field(2, ge=1, description="Answers of a mixed comparison the candidate writes.")
    canary_min_pairs: int = Field(200, ge=1, description="Head-to-head pairs before a canary is decided.")
    canary_max_pairs: int = Field(
        4000, ge=1, description="Head-to-head pairs after which an undecided canary ends without a winner."
    )
    learn_max_ptx_ratio: float = Field(
        1.1, gt=0.0, description="Gate: held-out LM loss at most this times the SFT reference's."
    )
    learn_max_kl: float = Field(30.0, gt=0.0, description="Gate: per-answer KL to the SFT reference at most this.")
    learn_min_step_kl: float = Field(
        0.5,
        ge=0.0,
        description="Gate: per-answer KL of a new version to its parent, on its own answers, at least this: one that "
        "hardly moved is its parent again (0: no floor).",
    )
    learn_min_agreement: float = Field(
        0.55, ge=0.0, le=1.0, description="Gate: share of held-out ranked pairs the new version must agree with."
    )
    learn_agreement_by: Literal["per_token", "sum", "reference"] = Field(
        "per_token",
        description="Gate: agreement with held-out rankings on each answer's log-ratio to the parent a token "
        "(`per_token`), summed over the answer (`sum`), which drift alone pushes towards the shorter answer, or a "
        "token on the log-ratio to the SFT reference (`reference`: what all rounds so far learned; the step from the "
        "parent must then not go back beyond chance).",
    )
    learn_agreement_interval: Literal["rankings", "pairs"] = Field(
        "pairs",
        description="Gate: what agreement's 95% interval counts as independent, the rankings the held-out pairs come "
        "from (`rankings`: the C(K,2) pairs of one ranking share its answers and move together) or the pairs "
        "(`pairs`, narrower than the data support).",
    )
    learn_min_agreement_pairs: int = Field(
        20, ge=0, description="Gate: held-out ranked pairs that agreement must be measured on."
    )
    learn_poll_s: float = Field(10.0, gt=0.0, description="Seconds between the learner's looks for new rankings.")
    learn_metrics_port: int | None = Field(
        8001, ge=1, le=65535, description="Port of the learner's Prometheus metrics; unset: none."
    )
    # Its own address, not the server's `host`: opening the chat API to a network need not open the learner's
    # figures too, and a scraper in another pod needs them on 0.0.0.0 while the API sits behind a proxy.
    learn_metrics_host: str = Field("127.0.0.1", description="Address the learner's metrics bind.")

    # -- engine ---------------------------------------------------------------------------------
    policy_version: str | None = Field(None, description="Serve this version; unset: the store's current.")
    engine: Literal["vllm", "hf", "fake"] = Field(
        "vllm", description="`hf`: transformers, one request at a time (tests, tiny models); `fake`: canned answers."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length (prompt + answer) of the engine.")
    enforce_eager: bool | None = Field(
        None, description="Skip graph compilation; unset: eager on CPU (fast start), compiled on GPU."
    )
    cpu_threads: str = Field(
        "all", description="CPU cores for the engine's OpenMP threads: `all`, or a list such as `0-1`."
    )
    cpu_kv_cache_gib: int = Field(2, ge=1, description="KV-cache size on CPU, GiB.")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="Share of GPU memory for vLLM.")
    serve_gpus: str = Field(
        "0",
        description="GPUs the engine may see under `rankloop up` (its CUDA_VISIBLE_DEVICES), a list such as `0` or "
        "`2`; a learner on another one (`learn_device` cuda:N) has it to itself.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @property
    def adapters_served(self) -> bool:
        """Whether servers answer with versions kept as adapters (and so can run a canary)."""
        return self.serve_adapters and self.max_adapter_rank > 0

    @field_validator("max_adapter_rank")
    @classmethod
    def _adapter_rank(cls, value: int) -> int:
        # The ranks vLLM serves (its max_lora_rank), or 0 for none.
        if value not in ADAPTER_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, ADAPTER_RANKS))} (0: no adapters)")
        return value

    @field_validator("cpu_threads")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        if value != "all":
            cpu_list(value)
        return value

    @field_validator("admin_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        # The admin API promotes and rolls back what every user is served: a short token is guessed.
        length = len(value.get_secret_value()) if value is not None else 0
        if 0 < length < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"the admin token has {length} characters; use at least {MIN_ADMIN_TOKEN} (for example the output "
                "of: python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return value

    @field_validator("serve_gpus")
    @classmethod
    def _gpu_list(cls, value: str) -> str:
        cpu_list(value)  # the same shape: indices and ranges
        return value

    @field_validator("learn_device")
    @classmethod
    def _learn_device(cls, value: str) -> str:
        if not LEARN_DEVICE.fullmatch(value):
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N (N the GPU's index)")
        return value

    @field_validator("learn_cpus")
    @classmethod
    def _learn_cpus(cls, value: str | None) -> str | None:
        if value is not None:
            cpu_list(value)
        return value or None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError("max_tokens_limit must be below max_model_len to leave room for the prompt")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @property
    def effective_redis_url(self) -> str:
        """The configured server, or the embedded one `rankloop up` / `rankloop redis` starts."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def shown_redis_url(self) -> str:
        """`effective_redis_url` fit to print: its password replaced by ***."""
        return redact_url(self.effective_redis_url)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def reward_store_dir(self) -> Path:
        return self.data_dir / "reward_models"

    @property
    def dataset_path(self) -> Path:
        """The durable feedback dataset (SQLite) the learner trains on."""
        return self.data_dir / "feedback.sqlite3"


def unknown_env_keys(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(
        key for key in environ if key.startswith(ENV_PREFIX) and key not in known and key not in _NOT_SETTINGS
    )


def redact_url(url: str) -> str:
    """The URL with its password (redis://user:PASSWORD@host/0) replaced by ***, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings; raise SettingsError naming every bad key."""
    unknown = unknown_env_keys(os.environ)
    if unknown:
        raise SettingsError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
