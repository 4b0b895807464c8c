"""Drafters that declare `target_hidden_layers` get the target's states at each row's last accepted position."""

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, tiny_model

from hf_specdec import ModelDrafter, TreeConfig


class RecordingDrafter(ModelDrafter):
    target_hidden_layers = (1, 3)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def propose(self, state):
        running = state.budget >= 0  # finished rows wait, masked, for the next compaction: they draft nothing
        self.seen.append((state.sequences[running].clone(), state.lengths[running].clone(),
                          state.row_ids[running].clone(), state.target_hidden[running].clone()))
        return super().propose(state)


@pytest.mark.parametrize("tree", [None, TreeConfig(3, 2, 6)], ids=["chain", "tree"])
def test_hidden_states_are_those_at_the_last_accepted_position(tree):
    target = tiny_model("qwen3", num_layers=3, seed=1)
    batch = left_padded_batch(96, [6, 3, 8], seed=2)
    drafter = RecordingDrafter(perturbed_copy(target, 0.1), num_draft_tokens=3, tree=tree)
    plain = target.generate(**batch, max_new_tokens=15, do_sample=False)
    out = target.generate(**batch, max_new_tokens=15, do_sample=False, assistant_model=drafter)
    assert torch.equal(out, plain)
    assert len(drafter.seen) > 2
    for sequences, lengths, row_ids, hidden in drafter.seen:
        for index, row in enumerate(row_ids.tolist()):
            pads = int((batch["attention_mask"][row] == 0).sum())
            # the root (last committed token) came from the logits at the position just before it
            prefix = sequences[index, pads: lengths[index] - 1][None]
            with torch.no_grad():
                states = target(prefix, output_hidden_states=True).hidden_states
            for slot, layer in enumerate(RecordingDrafter.target_hidden_layers):
                torch.testing.assert_close(hidden[index, slot], states[layer][0, -1], atol=1e-5, rtol=1e-5)


def test_missing_target_layers_get_a_clear_error():
    target = tiny_model("llama", num_layers=2, seed=1)

    class TooDeep(ModelDrafter):
        target_hidden_layers = (7,)

    with pytest.raises(ValueError, match="hidden states"):
        target.generate(**left_padded_batch(96, [4]), max_new_tokens=4, assistant_model=TooDeep(target))
