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


def random_head(target, seed=0, draft_vocab=DRAFT_VOCAB, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Eagle3DraftModel.from_target(target.config, draft_vocab=draft_vocab,
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


# ------------------------------------------------------------------------------------- many tokens per round
class OracleHead(Eagle3DraftModel):
    """A head pushed towards plain greedy's continuation (its logits get a bonus at the token plain emits after
    each (position, token) pair, except for a quarter of the pairs), so most drafts are accepted and every
    catch-up feeds several tokens, with the odd rejection."""

    def forward(self, input_ids, *args, position_ids=None, **kwargs):
        out = super().forward(input_ids, *args, position_ids=position_ids, **kwargs)
        queries = out.logits.shape[1]
        bonus = torch.zeros_like(out.logits)
        for row, (positions, tokens) in enumerate(zip(position_ids[:, -queries:].tolist(),
                                                      input_ids[:, -queries:].tolist())):
            for query, key in enumerate(zip(positions, tokens)):
                following = self.continuation.get(key)
                if following is not None and bool(self.t2d[following]):
                    bonus[row, query, int(self.t2d[:following].sum())] = 40.0
        out.logits = out.logits + bonus
        return out


def oracle_head(target, plain, mask):
    base = random_head(target, draft_vocab=torch.arange(3, VOCAB))  # all but the special ids
    head = OracleHead(base.config)
    head.load_state_dict(base.state_dict())
    head.continuation = {}
    for row in range(len(plain)):
        pad = int((mask[row] == 0).sum())
        for column in range(pad, plain.shape[1] - 2):
            key = (column - pad, int(plain[row, column + 1]))
            if (key[0] * 7 + key[1]) % 4:
                head.continuation.setdefault(key, int(plain[row, column + 2]))
    return head.eval()


@torch.no_grad()
def from_scratch_root_logits(target, head, state):
    """The head's logits for each row's last pair (state at length - 2, token at length - 1), from a full forward
    over the committed text, without any cache."""
    logits = []
    for row, length in enumerate(state.lengths.tolist()):
        ids, mask = state.sequences[row:row + 1, :length], state.token_mask[row:row + 1, :length].long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        states = target(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
        real = mask[0, :-1].bool()
        features = torch.stack([states[i] for i in LAYERS], dim=2)[:, :-1][:, real]
        pairs = head(ids[:, 1:][:, real], features=features, position_ids=torch.arange(int(real.sum()))[None])
        logits.append(pairs.logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("tree", [None, TreeConfig(4, 2, 8)])
def test_multi_token_rounds_keep_the_head_in_step(target, tree, monkeypatch):
    """With most drafts accepted, every round's root logits equal a from-scratch forward (so the catch-up pairs
    each accepted token with its own target state), over left padding, EOS-free long runs and compaction."""
    batch = left_padded_batch(VOCAB, [7, 3, 9], seed=11)
    plain = target.generate(**batch, max_new_tokens=24, do_sample=False)
    head = oracle_head(target, plain, batch["attention_mask"])
    drafter = head.as_drafter(num_draft_tokens=4, tree=tree)
    errors = []
    original = type(drafter)._root_scores

    def checked(self, state):
        alive = state.budget >= 0
        expected = from_scratch_root_logits(target, self.model, state)
        errors.append(float(((expected - self._root_logits).abs().amax(-1) * alive).max()))
        return original(self, state)

    monkeypatch.setattr(type(drafter), "_root_scores", checked)
    ours = target.generate(**batch, max_new_tokens=24, do_sample=False, assistant_model=drafter,
                           prefill_chunk_size=4)
    assert torch.equal(ours, plain)
    assert drafter.last_stats.mean_accepted_length > 2.5, "rounds must accept several tokens"
    assert len(errors) > 3 and max(errors) < 1e-4


# ------------------------------------------------------------------------------------- review fixes
def test_the_targets_embedding_is_borrowed_not_owned(target):
    """The head holds the target's embedding by reference: not a parameter, not saved, and a bf16 target leaves
    the head's dtype alone."""
    head = random_head(target)
    low = tiny_model("llama", vocab_size=VOCAB, num_layers=4, seed=3, dtype=torch.bfloat16)
    low.generate(**left_padded_batch(VOCAB, [5], seed=1), max_new_tokens=4, assistant_model=head)
    assert head.get_input_embeddings() is low.get_input_embeddings()
    assert head.dtype == torch.float32 and "embed_tokens.weight" not in head.state_dict()
    assert all(parameter is not low.get_input_embeddings().weight for parameter in head.parameters())
    with pytest.raises(ValueError, match="attach_target"):
        random_head(target)(torch.tensor([[3]]), features=torch.zeros(1, 1, 3, 32))


@torch.no_grad()
def test_a_cached_call_without_a_mask_is_causal_over_the_cache(target):
    from transformers import DynamicCache

    head = random_head(target)
    head.attach_target(target)
    ids, features = torch.randint(0, VOCAB, (1, 8)), torch.randn(1, 8, 3, 32)
    whole = head(ids, features=features).logits
    cache = DynamicCache()
    head(ids[:, :5], features=features[:, :5], cache=cache)
    rest = head(ids[:, 5:], features=features[:, 5:], cache=cache, position_ids=torch.arange(5, 8)[None]).logits
    torch.testing.assert_close(rest, whole[:, 5:], atol=1e-5, rtol=1e-5)


def test_processors_that_leave_no_draft_token_draft_a_refusable_token(target):
    """Every draft-vocabulary (even) id suppressed: the head has nothing to propose, the round still works."""
    batch = left_padded_batch(VOCAB, [6, 4], seed=2)
    options = dict(max_new_tokens=8, suppress_tokens=list(range(0, VOCAB, 2)), eos_token_id=None)
    plain = target.generate(**batch, do_sample=False, **options)
    assert torch.equal(target.generate(**batch, do_sample=False, assistant_model=random_head(target), **options), plain)
    torch.manual_seed(0)
    sampled = target.generate(**batch, do_sample=True, assistant_model=random_head(target).as_drafter(
        tree=TreeConfig(3, 2, 5)), **options)
    assert bool((sampled[:, -8:] % 2 == 1).all())  # only what the processors allow


def test_saving_on_other_processes_writes_nothing_and_bad_arguments_say_so(target, tmp_path):
    head = random_head(target)
    head.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1" / "model.safetensors").exists()
    with pytest.raises(TypeError, match="unexpected arguments"):
        head.save_pretrained(tmp_path / "x", variant="fp16")
    with pytest.raises(TypeError, match="unexpected arguments"):
        Eagle3DraftModel.from_pretrained(tmp_path, device_mapping="cpu")


def test_native_checkpoints_keep_their_norm_flags_and_t2d_comes_from_d2t(target, tmp_path):
    from safetensors.torch import load_file, save_file

    random_head(target).save_pretrained(tmp_path, format="eagle3")
    config = json.loads((tmp_path / "config.json").read_text())
    config["norm_output"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    del weights["t2d"]
    save_file(weights, tmp_path / "model.safetensors")
    loaded = Eagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.norm_output is True
    assert torch.equal(loaded.t2d, random_head(target).t2d)
