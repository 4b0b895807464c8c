"""Guided drafters (SD²) at inference: the guide is the target's state at the last accepted position; lossless."""

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, tiny_model

from hf_specdec import GuidedDrafter, TreeConfig

UNEVEN = [7, 3, 9, 5, 1]
LAYERS = [1, 3]


def steered(target, arch_seed=0, method="merged"):
    """A guided drafter whose guide really changes its outputs (the projection is zero at init)."""
    drafter = GuidedDrafter.from_drafter(perturbed_copy(target, 0.1, seed=arch_seed), target_config=target.config,
                                         verifier_layers=LAYERS, guide_method=method)
    generator = torch.Generator().manual_seed(arch_seed)
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if name.startswith("guide.projection"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return drafter.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("tree", [None, TreeConfig(3, 2, 6)], ids=["chain", "tree"])
@pytest.mark.parametrize("lengths", [[6], UNEVEN], ids=["batch1", "batch5"])
def test_greedy_equals_plain(arch, tree, lengths):
    target = tiny_model(arch, num_layers=3, seed=2)
    batch = left_padded_batch(96, lengths, seed=3)
    drafter = steered(target).as_drafter(num_draft_tokens=4, tree=tree)
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False)
    out = target.generate(**batch, max_new_tokens=20, do_sample=False, assistant_model=drafter,
                          return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.spec_stats.accepted.sum() > 0


def test_the_model_itself_is_accepted_as_assistant_model():
    target = tiny_model("llama", num_layers=3, seed=2)
    model = steered(target)
    batch = left_padded_batch(96, UNEVEN, seed=4)
    plain = target.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(target.generate(**batch, max_new_tokens=12, do_sample=False, assistant_model=model), plain)
    assert model._hf_specdec_drafter.last_stats is not None  # one adapter kept on the model across calls


@torch.no_grad()
def test_first_round_drafts_match_a_hand_run_with_the_prefill_guide():
    """After the prefill, every token the drafter has seen was fed with the guide taken at the prompt's last
    position, so a fresh uncached forward with that guide must reproduce the first round's greedy drafts."""
    target = tiny_model("llama", num_layers=3, seed=5)
    model = steered(target, arch_seed=1)
    drafter = model.as_drafter(num_draft_tokens=4)
    batch = left_padded_batch(96, [6, 4], seed=6)
    drafts = []
    original = drafter.propose
    drafter.propose = lambda state: drafts.append((state.sequences.clone(), state.lengths.clone(),
                                                   original(state))) or drafts[-1][2]
    target.generate(**batch, max_new_tokens=10, do_sample=False, assistant_model=drafter)
    sequences, lengths, draft = drafts[0]
    for row in range(2):
        mask = batch["attention_mask"][row].bool()
        prompt = batch["input_ids"][row][mask]
        guide = torch.stack(
            [h[0, -1] for h in (target(prompt[None], output_hidden_states=True).hidden_states[i] for i in LAYERS)])
        root = sequences[row, lengths[row] - 1: lengths[row]]
        text = torch.cat([prompt, root])
        for index in range(4):
            logits = model(text[None], guide_states=guide[None]).logits[0, -1]
            assert int(logits.argmax()) == int(draft.tokens[row, index])
            text = torch.cat([text, draft.tokens[row, index: index + 1]])


def test_every_forward_of_a_round_gets_that_rounds_guide():
    target = tiny_model("qwen3", num_layers=3, seed=7)
    model = steered(target)
    drafter = model.as_drafter(tree=TreeConfig(3, 2, 6))
    seen_guides, states = [], []
    original_forward, original_propose = model.forward, drafter.propose

    def forward(*args, guide_states=None, **kwargs):
        seen_guides.append((len(states), guide_states.clone()))
        return original_forward(*args, guide_states=guide_states, **kwargs)

    def propose(state):
        states.append(state.target_hidden.clone())
        return original_propose(state)

    model.forward, drafter.propose = forward, propose
    target.generate(**left_padded_batch(96, UNEVEN, seed=8), max_new_tokens=15, do_sample=False,
                    assistant_model=drafter)
    assert len(states) > 2
    for round_index, guide in seen_guides:
        if round_index:  # forwards during round r use the states handed over at that round's propose
            torch.testing.assert_close(guide, states[round_index - 1])
