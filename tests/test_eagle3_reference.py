"""EAGLE-3 heads against the reference: fixtures made by the `speculators` package in its own venv
(`tests/fixtures/eagle3/make_fixtures.py`) load in both formats and give speculators' own outputs."""

from pathlib import Path

import pytest
import torch
from conftest import left_padded_batch
from safetensors.torch import load_file
from transformers import DynamicCache

from hf_specdec import Eagle3DraftModel, TreeConfig
from hf_specdec.testing import tiny_causal_lm

FIXTURES = Path(__file__).parent / "fixtures" / "eagle3"
REFERENCE = load_file(FIXTURES / "reference.safetensors")
EMBEDDING = load_file(FIXTURES / "target_embed.safetensors")["embed_tokens.weight"]


def load_head(fmt: str) -> Eagle3DraftModel:
    head = Eagle3DraftModel.from_pretrained(FIXTURES / fmt)
    head.set_input_embeddings(torch.nn.Embedding.from_pretrained(EMBEDDING))  # the target's (native has none)
    return head


@pytest.mark.parametrize("fmt", ["speculators", "native"])
def test_config_is_read_like_the_reference(fmt):
    config = load_head(fmt).config
    assert config.aux_hidden_state_layer_ids == [1, 3, 4]  # native stores [0, 2, 3]: "output of layer k"
    assert config.norm_before_residual is True
    assert config.draft_vocab_size == 64 and config.vocab_size == 128
    head = load_head(fmt)
    assert torch.equal(head.d2t, REFERENCE["d2t"]) and torch.equal(head.t2d, REFERENCE["t2d"])
    assert torch.equal(head.draft_to_target[REFERENCE["step0_logits"].argmax(-1)], REFERENCE["step0_target_ids"])


@pytest.mark.parametrize("fmt", ["speculators", "native"])
@torch.no_grad()
def test_both_draft_steps_match_speculators(fmt):
    head = load_head(fmt)
    ids, features, positions = REFERENCE["input_ids"], REFERENCE["features"], REFERENCE["position_ids"]
    torch.testing.assert_close(head.fuse(features), REFERENCE["step0_fc_out"], atol=1e-5, rtol=1e-5)
    cache = DynamicCache()
    first = head(ids, features=features, position_ids=positions, cache=cache)
    torch.testing.assert_close(first.logits, REFERENCE["step0_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.hidden_states, REFERENCE["step0_hidden_out"], atol=1e-5, rtol=1e-5)
    # step 1, row t: its own token and the step-0 output state at t, one position later; it sees the step-0 keys
    # of rows 0..t and itself (what a depth-1 draft node sees at inference)
    length = ids.shape[1]
    sees_committed = torch.ones(length, length, dtype=torch.bool).tril()
    sees = torch.cat([sees_committed, torch.eye(length, dtype=torch.bool)], dim=1)[None, None].expand(2, -1, -1, -1)
    second = head(REFERENCE["step1_input_ids"], hidden_states=first.hidden_states, position_ids=positions + 1,
                  attention_mask=sees, cache=cache)
    torch.testing.assert_close(second.logits, REFERENCE["step1_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.hidden_states, REFERENCE["step1_hidden_out"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def target():
    """A target of the fixture's shape (hidden 32, 6 layers, vocabulary 128) with the fixture's embedding."""
    model = tiny_causal_lm("llama", vocab_size=128, num_layers=6, hidden_size=32, intermediate_size=64, seed=4)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(EMBEDDING)
    return model


@pytest.mark.parametrize("fmt", ["speculators", "native"])
@pytest.mark.parametrize("tree", [None, TreeConfig(4, 3, 10)])
def test_reference_heads_decode_losslessly(target, fmt, tree):
    head = Eagle3DraftModel.from_pretrained(FIXTURES / fmt)
    batch = left_padded_batch(128, [6, 11], seed=9)
    plain = target.generate(**batch, max_new_tokens=16, do_sample=False)
    assert torch.equal(target.generate(**batch, max_new_tokens=16, do_sample=False,
                                       assistant_model=head.as_drafter(num_draft_tokens=4, tree=tree)), plain)
