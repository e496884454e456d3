"""PPO's pre-training term on the SFT reference's own answers (`RANKLOOP_LEARN_PTX_SOURCE=reference`): every answer
it wrote to a training prompt, whatever its rank, none of a held-out prompt or of a later version, held out by
comparison."""

import json
import random
import shutil
from pathlib import Path

import pytest

from deploy.model_store import ModelStore
from deploy.settings import load_settings
from feedback.dataset import Dataset
from feedback.events import RankingEvent
from learn import policy_eval, sources
from learn.data import IGNORE
from learn.ppo_run import RoundConfig
from learn.rm_data import is_held_out, is_rm_held_out, prompt_key
from learn.rounds import PPOOptions, ppo_round
from learn.sources import PTX_HELD_OUT_EVERY, PtxFromReference, ptx_examples
from tests.learn.events import BAD, GOOD, ranking_event
from tests.learn.test_ppo_round import RM_HELD_OUT, make_data_dir
from tests.tiny import tiny_tokenizer

HELD_OUT = (0.1, RM_HELD_OUT)


def events(n: int, later: set[int]) -> list[tuple[str, str, str]]:
    """Rankings q0..q(n-1) of v0001's answers, but those in `later`, which v0002 wrote."""
    rng, rows = random.Random(0), []
    for i in range(n):
        event_id, kind, data = ranking_event(i, rng)
        if i in later:
            event = RankingEvent.model_validate_json(data)
            event.comparison.policy_version = "v0002"
            data = event.model_dump_json()
        rows.append((event_id, kind, data))
    return rows


def trained_on(i: int) -> bool:
    key = prompt_key([{"role": "user", "content": f"q{i}"}])
    return not is_held_out(key, HELD_OUT[0]) and not is_rm_held_out(key, HELD_OUT[1])


def test_the_reference_answers_are_all_it_wrote_to_training_prompts(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    rows = events(40, later={3, 4})
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(rows)
    train, held, source = ptx_examples(settings, tiny_tokenizer(), PtxFromReference("v0001", HELD_OUT), 512)
    expected = [i for i in range(40) if trained_on(i) and i not in (3, 4)]
    assert source == "v0001's answers to users' prompts"
    assert len(train) + len(held) == 2 * len(expected)  # both answers of every comparison, the worse one too
    everything = train + held
    assert sorted(e.input_ids[-1] for e in everything) == sorted([GOOD, BAD] * len(expected))
    comparisons = [RankingEvent.model_validate_json(data).comparison for _, _, data in rows]
    by_prompt = {tuple(c.prompt_token_ids): i for i, c in enumerate(comparisons)}
    for example in everything:
        prompt, answer = example.input_ids[:4], example.input_ids[4:]
        assert by_prompt[tuple(prompt)] in expected
        assert example.labels == [IGNORE] * 4 + answer  # the loss on the answer alone
    # Held out by comparison: every tenth comparison's two answers, none of whose prompts is trained on.
    assert len(held) == 2 * len(expected[::PTX_HELD_OUT_EVERY])
    assert {tuple(e.input_ids[:4]) for e in held}.isdisjoint({tuple(e.input_ids[:4]) for e in train})


def test_a_round_takes_its_ptx_texts_from_the_reference(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_threads=1)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(events(20, later=set()))
    config = RoundConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=4)
    result = ppo_round(settings, config, PPOOptions(ptx_source="reference"), show_progress=False)
    ptx = ModelStore(data / "models").card(result.version).details["ptx"]
    usable = [i for i in range(20) if trained_on(i)]
    assert ptx == {
        "source": "v0001's answers to users' prompts",
        "train": 2 * (len(usable) - len(usable[::PTX_HELD_OUT_EVERY])),
        "held_out": 2 * len(usable[::PTX_HELD_OUT_EVERY]),
    }
    assert result.after.ptx_loss is not None and result.reference_ptx is not None  # the fluency check has its texts


def test_the_fluency_check_reads_the_first_held_out_texts_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(data_dir=tmp_path)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(events(60, later=set()))
    source = PtxFromReference("v0001", HELD_OUT)
    train, every, _ = ptx_examples(settings, tiny_tokenizer(), source, 512)
    monkeypatch.setattr(sources, "PTX_HELD_OUT_MAX", 3)
    capped_train, held, _ = ptx_examples(settings, tiny_tokenizer(), source, 512)
    assert len(every) > 3  # the bound bites
    assert held == every[:3]  # the first ones: a loop that grows keeps the same texts
    assert capped_train == train  # the others are still not trained on


def test_a_round_computes_the_loss_only_of_what_it_does_not_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_threads=1)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(events(20, later=set()))
    computed: list[int] = []
    lm_loss_of = policy_eval.lm_loss_of
    monkeypatch.setattr(policy_eval, "lm_loss_of", lambda *a, **k: computed.append(1) or lm_loss_of(*a, **k))
    config = RoundConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=4)
    first = ppo_round(settings, config, PPOOptions(ptx_source="reference"), show_progress=False)
    assert len(computed) == 2  # v0001's, which is the reference's too, and the new version's
    second = ppo_round(settings, config, PPOOptions(parent=first.version, ptx_source="reference"), show_progress=False)
    assert len(computed) == 3  # the new version's alone: its parent's and the reference's are known
    assert second.before.ptx_loss == first.after.ptx_loss
    assert second.reference_ptx == first.reference_ptx == first.before.ptx_loss


class Crash(Exception):
    """Stands for a learner killed mid-round."""


def test_a_round_resumed_without_its_parents_figures_keeps_none_of_what_it_measures(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    settings = load_settings(data_dir=data, learn_threads=1)
    with Dataset(settings.dataset_path) as dataset:
        dataset.insert(events(20, later=set()))
    config = RoundConfig(iterations=2, prompts_per_iteration=4, max_new_tokens=4, lr=1e-2)
    options = PPOOptions(ptx_source="reference")

    def crash(step: int, total: int, figures: dict[str, float]) -> None:
        if step == 1:
            raise Crash

    with pytest.raises(Crash):
        ppo_round(settings, config, options, on_step=crash, show_progress=False)
    # The crashed round's figures of its parent are gone (an older round's checkpoint, or lost files), its
    # checkpoint of one trained iteration is not.
    (before,) = data.rglob("*.before.json")
    before.unlink()
    shutil.rmtree(data / "evals")
    result = ppo_round(settings, config, options, show_progress=False)
    assert result.resumed_at == 1
    # Its "before" was measured on the policy after one iteration: kept as v0001's, it would be the wrong figures.
    assert result.before.ptx_loss != result.reference_ptx
    assert not (data / "evals" / "answers" / "v0001.json").exists()
    # The caches hold the reference's own loss as v0001's (v0001 is the reference), and the new version's.
    losses = json.loads((data / "evals" / "lm_loss.json").read_text())
    assert sorted(losses.values()) == sorted([result.reference_ptx, result.after.ptx_loss])
    assert {name.split("/")[0] for name in losses} == {"v0001", result.version}
