"""Frozen models' answer log-probabilities kept between judgements (learn.kept_logprobs): the same figures as
computing them, the parent's and the reference's read again, a new version's computed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learn.kept_logprobs import KEPT, frozen_weights
from learn.policy_eval import _shifts, agreement
from learn.ppo import AdapterOff, Rollouts, answer_logprobs, pack
from learn.rm_data import RankedGroup
from tests.tiny import small_llama

PAD = 0


def frozen(model: Any) -> Any:
    return model.requires_grad_(False).eval()


def trained_above(reference: Any, scale: float) -> Any:
    """A version of `reference` whose layers from 2 up a round changed."""
    version = copy.deepcopy(reference)
    with torch.no_grad():
        for layer in version.model.layers[2:]:
            layer.mlp.down_proj.weight.mul_(scale)
    return frozen(version)


def groups() -> list[RankedGroup]:
    """Two rankings of three answers each; prompts longer than their answers and shorter."""
    prompts = [[5, 9, 12, 7, 3, 8, 21, 4], [4, 4]]
    answers = [[[30, 31], [8, 21, 2], [7]], [[11, 2, 6, 6, 19], [33, 34, 35], [9, 9]]]
    found = []
    for prompt, group in zip(prompts, answers, strict=True):
        found.append(
            RankedGroup(
                prompt_key=str(prompt),
                answers=[prompt + answer for answer in group],
                tiers=[[0], [1], [2]],
                answer_lens=tuple(len(answer) for answer in group),
            )
        )
    return found


def rollouts() -> list[tuple[list[int], list[int]]]:
    return [
        (sequence[:-length], sequence[-length:])
        for group in groups()
        for sequence, length in zip(group.answers, group.answer_lens, strict=True)
    ]


def plain_shift(policy: Any, base: Any) -> torch.Tensor:
    """Each answer's summed log pi/pi_base, one whole pass per model."""
    found = rollouts()
    packed = pack(Rollouts([q for q, _ in found], [r for _, r in found], [False] * len(found)), PAD)
    with torch.no_grad():
        return ((answer_logprobs(policy, packed) - answer_logprobs(base, packed)) * packed.mask).sum(dim=1)


def test_a_judgement_reads_the_parents_log_probabilities_again_and_computes_the_new_versions() -> None:
    parent = frozen(small_llama(layers=4))
    first, second = trained_above(parent, 1.5), trained_above(parent, 0.5)
    KEPT.clear()
    judged = agreement(first, parent, groups(), PAD, split=2)
    assert (KEPT.hits, KEPT.misses, len(KEPT.entries)) == (0, 12, 12)  # 6 answers, 2 models
    assert judged.pairs == 6
    again = agreement(second, parent, groups(), PAD, split=2)
    assert (KEPT.hits, KEPT.misses) == (6, 18)  # the parent's read, the new version's computed
    KEPT.clear()
    fresh = agreement(second, parent, groups(), PAD, split=2)
    assert (fresh.rate, fresh.per_token, fresh.pairs) == (again.rate, again.per_token, again.pairs)


def test_kept_shifts_are_whole_passes_figures() -> None:
    parent = frozen(small_llama(layers=4))
    version = trained_above(parent, 1.5)
    expected = plain_shift(version, parent)
    assert expected.abs().min() > 1e-4  # the version differs from the parent on every answer
    KEPT.clear()
    for _ in range(2):  # computed, then read
        (shift,) = _shifts(version, [parent], rollouts(), PAD, batch=4, split=2)
        torch.testing.assert_close(shift, expected, atol=1e-5, rtol=1e-4)
    assert KEPT.hits == 12


def test_only_frozen_weights_are_kept() -> None:
    model = small_llama(layers=4)
    assert frozen_weights(model) is None  # weights that may still train
    assert frozen_weights(frozen(model)) is not None
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["down_proj"]))
    assert frozen_weights(lora) is None  # a policy with its adapters on: being trained
    off = frozen_weights(AdapterOff(lora))
    assert off is not None
    base = [p for _, p in frozen(model).named_parameters()]
    assert [tuple(p.shape) for p in off] == [tuple(p.shape) for p in base]  # the base's weights, in its order
    print_of_base = KEPT.print_of(frozen(copy.deepcopy(model)))
    assert KEPT.print_of(AdapterOff(lora)) == print_of_base  # the same function, the same entries


def test_an_empty_answer_shifts_by_nothing() -> None:
    parent = frozen(small_llama(layers=4))
    version = trained_above(parent, 1.5)
    found = [([5, 9, 12], []), ([4, 4], [30, 31, 2])]
    (shift,) = _shifts(version, [parent], found, PAD, batch=4, split=2)
    assert shift[0].item() == 0.0 and abs(shift[1].item()) > 1e-4


def test_a_kept_model_changed_in_place_is_read_anew() -> None:
    parent = frozen(small_llama(layers=4))
    version = trained_above(parent, 1.5)
    KEPT.clear()
    _shifts(version, [parent], rollouts(), PAD, batch=4, split=2)
    with torch.no_grad():
        parent.model.layers[3].mlp.up_proj.weight.add_(0.1)  # no longer the model those entries were read from
    (shift,) = _shifts(version, [parent], rollouts(), PAD, batch=4, split=2)
    assert KEPT.hits == 6  # the version's, unchanged; the parent's computed again
    torch.testing.assert_close(shift, plain_shift(version, parent), atol=1e-5, rtol=1e-4)


def test_the_lower_layers_run_once_a_batch_for_the_policy_and_its_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    import learn.policy_eval

    parent = frozen(small_llama(layers=4))
    version = trained_above(parent, 1.5)
    calls: list[int] = []
    real = learn.policy_eval.lower_of

    def counted(model: Any, split: int, packed: Any) -> torch.Tensor:
        calls.append(packed.input_ids.shape[0])
        return real(model, split, packed)

    monkeypatch.setattr(learn.policy_eval, "lower_of", counted)
    KEPT.clear()
    _shifts(version, [parent, parent], rollouts(), PAD, batch=8, split=2)
    assert calls == [6]  # one batch of the 6 answers, with the lower cache off: once for the three models
    _shifts(trained_above(parent, 0.5), [parent], rollouts(), PAD, batch=8, split=2)
    assert calls == [6, 6]  # a new version: its rows need the lower states; the parent's are kept


def test_weights_replaced_under_a_parameter_are_a_new_model() -> None:
    """`.data =` (as `Module.to` does) leaves a parameter's version count as it was: the fingerprint still moves."""
    model = frozen(small_llama(layers=4))
    before = KEPT.print_of(model)
    weight = model.model.layers[3].mlp.up_proj.weight
    weight.data = weight.data + 0.1
    assert KEPT.print_of(model) != before
