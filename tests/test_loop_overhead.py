"""Loop efficiency counts the model calls only, and the engine's per-round shortcuts change no output."""

import time

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, tiny_model

from hf_specdec import ModelDrafter
from hf_specdec.cache import SlotCache

STALL = 0.01  # seconds of non-model work added to every forward's preparation


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=5)
    return target, perturbed_copy(target, noise=0.1)


def test_model_seconds_leave_out_what_is_built_around_a_forward(pair, monkeypatch):
    """Masks and slots are built around each model call, inside the forward phases: they are loop overhead."""
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, [6, 4], seed=3)
    span = SlotCache._span
    calls = []

    def slow_span(self, new_slots):  # every eager forward of the rounds asks for its span before the model runs
        calls.append(1)
        time.sleep(STALL)
        return span(self, new_slots)

    monkeypatch.setattr(SlotCache, "_span", slow_span)
    out = target.generate(**batch, assistant_model=ModelDrafter(draft, num_draft_tokens=3), max_new_tokens=12,
                          do_sample=False, return_dict_in_generate=True, time_phases=True)
    stats = out.spec_stats
    stalled = len(calls) * STALL
    assert len(calls) >= 2 * int(stats.rounds.max())  # a verify forward and at least one draft forward per round
    assert stats.model_seconds <= stats.wall_seconds - stalled
    assert stats.loop_efficiency == pytest.approx(stats.model_seconds / stats.wall_seconds)


def test_no_timing_without_time_phases(pair):
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, [5], seed=4)
    out = target.generate(**batch, assistant_model=ModelDrafter(draft, num_draft_tokens=3), max_new_tokens=8,
                          do_sample=False, return_dict_in_generate=True)
    assert out.spec_stats.model_seconds == 0.0 and out.spec_stats.loop_efficiency == 0.0


@pytest.mark.parametrize("batch_lengths", [[7], [7, 3, 9, 5]])
def test_rounds_reuse_constants_without_changing_output(pair, batch_lengths):
    """Two calls in a row share the cached per-shape tensors (chain shapes, chunk indices, aranges); both equal
    plain greedy, so nothing writes to them."""
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, batch_lengths, seed=5)
    plain = target.generate(**batch, max_new_tokens=16, do_sample=False)
    drafter = ModelDrafter(draft, num_draft_tokens=4)
    for _ in range(2):
        ours = target.generate(**batch, assistant_model=drafter, max_new_tokens=16, do_sample=False)
        assert torch.equal(ours, plain)
