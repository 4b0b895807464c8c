"""EAGLE-3 heads: lossless greedy chains and trees, a cache that follows the text exactly, and both checkpoint
formats (speculators for vLLM, native for SGLang / SpecForge) read as data and written back."""

import json

import pytest
import torch
from conftest import left_padded_batch, tiny_model

from hf_specdec import Eagle3DraftModel, TreeConfig
from hf_specdec.drafters import load_drafter
from hf_specdec.eagle3.formats import checkpoint_format

VOCAB = 96
DRAFT_VOCAB = torch.arange(0, VOCAB, 2)  # every other target id: the mapping is really exercised
LAYERS = [1, 2, 4]


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab_size=VOCAB, num_layers=4, seed=3)


def random_head(target, seed=0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Eagle3DraftModel.from_target(target.config, draft_vocab=DRAFT_VOCAB,
                                            aux_hidden_state_layer_ids=LAYERS, **kwargs)
    with torch.no_grad():  # norms away from 1, so a mixed-up norm shows
        for name, parameter in head.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return head.eval()


@pytest.mark.parametrize("tree", [None, TreeConfig(3, 2, 5), TreeConfig(4, 3, 12)])
@pytest.mark.parametrize("lengths", [[6], [7, 3, 9]])
def test_greedy_equals_plain(target, tree, lengths):
    head = random_head(target)
    batch = left_padded_batch(VOCAB, lengths, seed=2)
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False)
    drafter = head.as_drafter(num_draft_tokens=4, tree=tree)
    ours = target.generate(**batch, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(ours, plain)
    assert drafter.last_stats.draft_forwards > 0


def test_passing_the_head_itself_as_assistant_model(target):
    batch = left_padded_batch(VOCAB, [5, 8], seed=4)
    plain = target.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(target.generate(**batch, max_new_tokens=10, do_sample=False,
                                       assistant_model=random_head(target)), plain)


@torch.no_grad()
def test_the_head_cache_follows_the_committed_text(target):
    """After generate(), the head's root logits equal a from-scratch forward over the final text's pairs
    (target state at column c, token at c + 1), at the column of the last round's root: the catch-up pairs the
    right states with the right tokens, prompt padding included."""
    head = random_head(target)
    batch = left_padded_batch(VOCAB, [7, 3, 9], seed=5)
    drafter = head.as_drafter(tree=TreeConfig(3, 2, 5))
    out = target.generate(**batch, max_new_tokens=15, do_sample=False, assistant_model=drafter)
    width = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(3, out.shape[1] - width, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    states = target(out, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
    features = torch.stack([states[i] for i in LAYERS], dim=2)[:, :-1]
    real = mask[:, :-1].bool()
    columns = real.shape[1]
    sees = torch.ones(columns, columns, dtype=torch.bool).tril()[None] & real[:, None, :]
    sees |= torch.eye(columns, dtype=torch.bool)[None]
    logits = head(out[:, 1:], features=features, attention_mask=sees[:, None], position_ids=positions[:, :-1]).logits
    for row in range(3):
        distance = (logits[row] - drafter._root_logits[row]).abs().amax(-1)
        assert float(distance.min()) < 1e-5, "the head's root must equal one column of the full forward"


def test_drafts_stay_in_the_draft_vocabulary(target, monkeypatch):
    """Tokens outside the draft vocabulary have q = 0: sampled and greedy drafts never propose them."""
    head = random_head(target)
    drafted = []
    drafter = head.as_drafter(tree=TreeConfig(3, 3, 9))
    original = type(drafter).propose

    def recording(self, state):
        draft = original(self, state)
        drafted.append(draft.tokens[draft.valid])
        return draft

    monkeypatch.setattr(type(drafter), "propose", recording)
    batch = left_padded_batch(VOCAB, [6, 4], seed=6)
    for do_sample in (False, True):
        target.generate(**batch, max_new_tokens=12, do_sample=do_sample, assistant_model=drafter)
    tokens = torch.cat(drafted)
    assert len(tokens) and bool(torch.isin(tokens, DRAFT_VOCAB).all())


# ---------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["speculators", "eagle3"])
def test_round_trip_through_either_format(target, tmp_path, fmt):
    head = random_head(target)
    head.save_pretrained(tmp_path, format=fmt)
    config = json.loads((tmp_path / "config.json").read_text())
    assert checkpoint_format(config) == fmt
    if fmt == "eagle3":  # SGLang / SpecForge name "the output of layer k" = hidden_states[k + 1]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [k - 1 for k in LAYERS]
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    else:
        assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS
        assert config["speculators_model_type"] == "eagle3"
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.aux_hidden_state_layer_ids == LAYERS
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    loaded.attach_target(target)
    head.attach_target(target)
    ids, features = torch.randint(0, VOCAB, (2, 5)), torch.randn(2, 5, len(LAYERS), 32)
    torch.testing.assert_close(loaded(ids, features=features).logits, head(ids, features=features).logits)
    batch = left_padded_batch(VOCAB, [5, 8], seed=7)
    plain = target.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(target.generate(**batch, max_new_tokens=10, do_sample=False,
                                       assistant_model=load_drafter(str(tmp_path), num_draft_tokens=3)), plain)


def test_configs_are_read_as_data(target, tmp_path):
    """A speculators checkpoint's auto_map Python is never imported; a missing norm_before_residual reads as
    True (vLLM's reading); legacy pytorch_model.bin loads with weights_only."""
    head = random_head(target)
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "config.Eagle3SpeculatorConfig"}
    del config["norm_before_residual"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "config.py").write_text("raise RuntimeError('remote code ran')\n")
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.norm_before_residual is True


def test_missing_layer_ids_default_to_the_targets(target, tmp_path):
    head = random_head(target)
    head.config.aux_hidden_state_layer_ids = None
    drafter = head.as_drafter()
    drafter.bind(target)
    assert drafter.target_hidden_layers == (1, 2, 3)  # (2, L // 2, L - 3) is not distinct for 4 layers


def test_clear_errors(target, tmp_path):
    other = tiny_model("llama", vocab_size=VOCAB, num_layers=4, seed=3, hidden_size=48)
    batch = left_padded_batch(VOCAB, [5], seed=1)
    with pytest.raises(ValueError, match="hidden size"):
        other.generate(**batch, max_new_tokens=4, assistant_model=random_head(target))
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        target.save_pretrained(tmp_path)
        Eagle3DraftModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="format"):
        random_head(target).save_pretrained(tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="norm_before_fc"):
        random_head(target, norm_before_fc=True).save_pretrained(tmp_path / "y", format="eagle3")


def test_the_trained_draft_length_travels_with_the_head(target, tmp_path):
    head = random_head(target)
    head.config.draft_length = 7
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 7  # what vLLM proposes
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.draft_length == 7 and loaded.as_drafter().num_draft_tokens == 7
    assert loaded.as_drafter(num_draft_tokens=3).num_draft_tokens == 3
