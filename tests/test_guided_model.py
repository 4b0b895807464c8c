"""GuidedDrafter (SD²): zero-guide identity, each guide method's delta where its formula puts it, save/load, the
published-checkpoint converter, and the errors a user can hit."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM

from hf_specdec.guided import GuidedDrafter, GuidedDrafterConfig, check_verifier_layers, to_sd2_checkpoint
from hf_specdec.testing import tiny_causal_lm

TARGET_HIDDEN = 48
VERIFIER_LAYERS = [1, 3]


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm("llama", num_layers=4, seed=0, hidden_size=TARGET_HIDDEN)


def guided(target, method="merged", arch="llama", drafter_layers="all", randomize=True, seed=1):
    draft = tiny_causal_lm(arch, num_layers=2, seed=seed)
    model = GuidedDrafter.from_drafter(
        draft, target.config, verifier_layers=VERIFIER_LAYERS, guide_method=method, drafter_layers=drafter_layers
    )
    if randomize:  # a trained-looking guide: every delta non-zero
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.guide.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def batch(target, length=6, seed=0):
    ids = torch.randint(3, 120, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    return ids, torch.stack([hidden[i] for i in VERIFIER_LAYERS], dim=-2)  # [B, S, L, H_v]


def hand_deltas(model, guide_states):
    """δ = W_guide(LayerNorm(fusion(concat states))), one slice per steered layer: [..., n_steered, out]."""
    guide = model.guide
    fused = F.linear(guide_states.flatten(-2), guide.fusion.weight, guide.fusion.bias)
    normed = F.layer_norm(fused, fused.shape[-1:], guide.norm.weight, guide.norm.bias)
    return F.linear(normed, guide.projection.weight).unflatten(-1, (guide.num_steered, -1))


def capture(module, pre=False):
    """Record a module's inputs (args, kwargs) and output on its next calls."""
    record = {}

    def on_input(mod, args, kwargs):
        record["args"], record["kwargs"] = args, kwargs

    def on_output(mod, args, output):
        record["output"] = output

    handles = [module.register_forward_pre_hook(on_input, with_kwargs=True), module.register_forward_hook(on_output)]
    return record, handles


# ----- identity and shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["merged", "simple", "advanced"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_zero_guide_leaves_the_drafter_unchanged(target, method, arch):
    model = guided(target, method, arch=arch, randomize=False)
    ids, states = batch(target)
    plain = model.drafter(ids).logits
    assert torch.equal(model(ids, guide_states=states).logits, plain)
    assert torch.equal(model(ids, guide_states=states[:, -1]).logits, plain)
    assert torch.equal(model(ids).logits, plain)


def test_from_drafter_shares_weights_and_no_guide_means_no_steering(target):
    draft = tiny_causal_lm("llama", num_layers=2, seed=1)
    before = {key: value.clone() for key, value in draft.state_dict().items()}
    model = GuidedDrafter.from_drafter(draft, target.config, verifier_layers=VERIFIER_LAYERS)
    assert model.drafter is draft and draft.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[key], value) for key, value in draft.state_dict().items())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.get_text_config().vocab_size == draft.config.vocab_size
    with torch.no_grad():
        model.guide.projection.weight.normal_()
    ids, states = batch(target)
    assert torch.equal(model(ids).logits, draft(ids).logits)  # guide_states=None: unsteered
    assert not torch.equal(model(ids, guide_states=states).logits, draft(ids).logits)
    # outside a guided forward the shared drafter's hooks stay inert
    assert torch.equal(draft(ids).logits, tiny_causal_lm("llama", num_layers=2, seed=1)(ids).logits)


@pytest.mark.parametrize("method", ["merged", "simple", "advanced"])
def test_one_guide_per_row_equals_the_same_guide_at_every_position(target, method):
    model = guided(target, method)
    ids, states = batch(target)
    row_guide = states[:, 2]  # [B, L, H_v]
    per_position = row_guide[:, None].expand(-1, ids.shape[1], -1, -1)
    torch.testing.assert_close(model(ids, guide_states=row_guide).logits, model(ids, guide_states=per_position).logits)


def test_guide_mask_limits_steering_to_the_masked_positions(target):
    model = guided(target)
    ids, states = batch(target)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, 4:] = True
    plain, masked = model(ids).logits, model(ids, guide_states=states, guide_mask=mask).logits
    assert torch.equal(masked[:, :4], plain[:, :4])  # causal: nothing before the first steered position moves
    assert not torch.allclose(masked[:, 4:], plain[:, 4:])


def test_cache_attention_mask_position_ids_and_logits_to_keep_pass_through(target):
    model = guided(target)
    ids, states = batch(target, length=5)
    full = model(ids, guide_states=states[:, -1]).logits
    prefix = model(ids[:, :3], guide_states=states[:, -1], use_cache=True)
    step = model(
        ids[:, 3:],
        guide_states=states[:, -1],
        past_key_values=prefix.past_key_values,
        position_ids=torch.arange(3, 5).expand(2, -1),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        logits_to_keep=1,
    )
    assert step.logits.shape[1] == 1
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


# ----- where each method's delta lands ---------------------------------------------------------------------------


def test_merged_delta_is_added_to_the_up_projection_inside_the_mlp(target):
    model = guided(target, "merged")
    ids, states = batch(target)
    mlp = model.drafter.model.layers[1].mlp
    record, handles = capture(mlp)
    model(ids, guide_states=states)
    for handle in handles:
        handle.remove()
    x = record["args"][0]
    delta = hand_deltas(model, states)[..., 1, :]  # layer 1 is the second steered layer
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * (mlp.up_proj(x) + delta))
    torch.testing.assert_close(record["output"], expected, atol=1e-5, rtol=1e-5)


def test_simple_delta_is_added_to_the_layer_output(target):
    model = guided(target, "simple")
    ids, states = batch(target)
    layer = model.drafter.model.layers[0]
    record, handles = capture(layer)
    model(ids, guide_states=states, use_cache=False)
    for handle in handles:
        handle.remove()
    unsteered = layer(*record["args"], **record["kwargs"])  # hooks are inert outside a guided forward
    unsteered = unsteered[0] if isinstance(unsteered, tuple) else unsteered
    steered = record["output"][0] if isinstance(record["output"], tuple) else record["output"]
    torch.testing.assert_close(steered - unsteered, hand_deltas(model, states)[..., 0, :], atol=1e-5, rtol=1e-5)


def test_advanced_delta_is_per_token_from_the_guide_and_the_normed_layer_input(target):
    model = guided(target, "advanced")
    ids, states = batch(target)
    layer = model.drafter.model.layers[1]
    layer_record, layer_handles = capture(layer)
    mlp_record, mlp_handles = capture(layer.mlp)
    model(ids, guide_states=states)
    for handle in layer_handles + mlp_handles:
        handle.remove()
    guide = model.guide
    h = layer_record["args"][0] if layer_record["args"] else layer_record["kwargs"]["hidden_states"]
    fused = F.linear(states.flatten(-2), guide.fusion.weight, guide.fusion.bias)
    first, last = guide.layer_mlps[1][0], guide.layer_mlps[1][2]
    delta = F.linear(F.gelu(F.linear(torch.cat([fused, layer.input_layernorm(h)], -1), first.weight)), last.weight)
    x, mlp = mlp_record["args"][0], layer.mlp
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * (mlp.up_proj(x) + delta))
    torch.testing.assert_close(mlp_record["output"], expected, atol=1e-5, rtol=1e-5)


def test_only_the_chosen_drafter_layers_are_steered(target):
    model = guided(target, "simple", drafter_layers=[1])
    assert model.guide.projection.out_features == model.config.drafter_config.hidden_size
    ids, states = batch(target)
    layer0 = model.drafter.model.layers[0]
    steered, handles = capture(layer0)
    model(ids, guide_states=states)
    plain, plain_handles = capture(layer0)
    model(ids)
    for handle in handles + plain_handles:
        handle.remove()
    assert torch.equal(steered["output"], plain["output"])
    assert not torch.equal(model(ids, guide_states=states).logits, model(ids).logits)


# ----- save / load -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["merged", "advanced"])
def test_save_pretrained_round_trip_through_auto_classes(target, tmp_path, method):
    model = guided(target, method, drafter_layers=[0] if method == "advanced" else "all")
    ids, states = batch(target)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_specdec_guided_drafter" and config["verifier_layers"] == VERIFIER_LAYERS
    for auto_class in (AutoModel, AutoModelForCausalLM, GuidedDrafter):
        loaded = auto_class.from_pretrained(tmp_path)
        assert isinstance(loaded, GuidedDrafter) and loaded.config.drafter_layers == model.config.drafter_layers
        torch.testing.assert_close(loaded(ids, guide_states=states).logits, model(ids, guide_states=states).logits)


def test_tied_embeddings_survive_save_and_load(target, tmp_path):
    draft = tiny_causal_lm("qwen2", num_layers=2, seed=3, tie_word_embeddings=True)
    model = GuidedDrafter.from_drafter(draft, target.config, verifier_layers=VERIFIER_LAYERS)
    model.save_pretrained(tmp_path)
    loaded = GuidedDrafter.from_pretrained(tmp_path)
    assert loaded.drafter.lm_head.weight is loaded.drafter.model.embed_tokens.weight
    ids, states = batch(target)
    torch.testing.assert_close(loaded(ids, guide_states=states).logits, model(ids, guide_states=states).logits)


# ----- the SD² published format ----------------------------------------------------------------------------------


def write_sd2_checkpoint(path, method, steered, v_layer, with_fusion=True, seed=0):
    """A synthetic checkpoint in the paper's exact layout (see notes/sd2_checkpoint_format.md), tiny sizes."""
    draft = tiny_causal_lm("llama", num_layers=2, seed=5)
    generator = torch.Generator().manual_seed(seed)
    hidden_v, drafter_hidden = TARGET_HIDDEN, draft.config.hidden_size
    num_states = len(v_layer) if isinstance(v_layer, list) else 1
    out_size = drafter_hidden if method == "simple" else draft.config.intermediate_size
    state = {}
    for key, value in draft.state_dict().items():
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) in steered:
            key = ".".join(parts[:3] + ["l"] + parts[3:])
        state["d_base." + key] = value.clone()
    if with_fusion:
        state["guidance_embd_layer.orig.weight"] = torch.randn(hidden_v, num_states * hidden_v, generator=generator)
        state["guidance_embd_layer.orig.bias"] = torch.randn(hidden_v, generator=generator)
    if method == "advanced":
        for i in steered:
            state[f"d_base.model.layers.{i}.bias_proj.0.weight"] = torch.randn(
                hidden_v, hidden_v + drafter_hidden, generator=generator
            )
            state[f"d_base.model.layers.{i}.bias_proj.2.weight"] = torch.randn(out_size, hidden_v, generator=generator)
    else:
        state["latent_mod_prep.norm.weight"] = torch.randn(hidden_v, generator=generator)
        state["latent_mod_prep.norm.bias"] = torch.randn(hidden_v, generator=generator)
        state["latent_mod_prep.w_guide.weight"] = torch.randn(len(steered) * out_size, hidden_v, generator=generator)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "pytorch_model.bin")
    hparams = {
        "method": "guided-drafter",
        "drafter": "meta-llama/llama-3.2-1b-instruct",
        "verifier": "meta-llama/llama-3.1-8b-instruct",
        "guide_method": method,
        "v_layer": v_layer,
        "d_layer": "all" if steered == [0, 1] else steered,
        "ngram": 8,
        "finetune_drafter": "full",
        "loss_method": "kl",
    }
    (path / "config.json").write_text(json.dumps(hparams))
    return draft, state


@pytest.mark.parametrize(
    "method, steered, v_layer, with_fusion",
    [("merged", [0, 1], [1, 3], True), ("simple", [1], [1, 3], True), ("advanced", [0, 1], 4, False)],
)
def test_sd2_checkpoint_converts_and_round_trips(target, tmp_path, method, steered, v_layer, with_fusion):
    draft, state = write_sd2_checkpoint(tmp_path / "sd2", method, steered, v_layer, with_fusion)
    model = GuidedDrafter.from_sd2_checkpoint(str(tmp_path / "sd2"), drafter_model=draft.config)
    config = model.config
    assert config.guide_method == method and config.steered_layers == steered and config.draft_length == 8
    assert config.verifier_layers == ([v_layer - 1] if isinstance(v_layer, int) else v_layer)
    assert config.verifier_hidden_size == TARGET_HIDDEN
    if method != "advanced":
        assert torch.equal(model.guide.projection.weight, state["latent_mod_prep.w_guide.weight"])
    else:
        assert torch.equal(model.guide.layer_mlps[1][2].weight, state["d_base.model.layers.1.bias_proj.2.weight"])
    if not with_fusion:  # absent fusion = identity
        assert torch.equal(model.guide.fusion.weight, torch.eye(TARGET_HIDDEN))
    ids = torch.randint(3, 120, (2, 5))
    assert torch.equal(model(ids).logits, draft(ids).logits)  # the drafter weights are the d_base ones
    exported, hparams = to_sd2_checkpoint(model)
    identity_fusion = {"guidance_embd_layer.orig.weight", "guidance_embd_layer.orig.bias"}
    assert set(exported) - set(state) == (set() if with_fusion else identity_fusion) and set(state) <= set(exported)
    assert all(torch.equal(exported[key], value) for key, value in state.items())
    assert hparams["guide_method"] == method

    from hf_specdec.guided import convert_sd2_checkpoint

    convert_sd2_checkpoint(str(tmp_path / "sd2"), str(tmp_path / "ours"), drafter_model=draft.config)
    reloaded = AutoModel.from_pretrained(tmp_path / "ours")
    states = torch.randn(2, len(config.verifier_layers), TARGET_HIDDEN)
    torch.testing.assert_close(reloaded(ids, guide_states=states).logits, model(ids, guide_states=states).logits)


def test_sd2_checkpoint_errors(tmp_path):
    draft, _ = write_sd2_checkpoint(tmp_path / "sd2", "merged", [0, 1], [1, 3])
    hparams = json.loads((tmp_path / "sd2" / "config.json").read_text())
    (tmp_path / "sd2" / "config.json").write_text(json.dumps({**hparams, "method": "independent-drafter"}))
    with pytest.raises(ValueError, match="independent-drafter"):
        GuidedDrafter.from_sd2_checkpoint(str(tmp_path / "sd2"), drafter_model=draft.config)
    other = tiny_causal_lm("llama", num_layers=2, seed=5, intermediate_size=96).config
    (tmp_path / "sd2" / "config.json").write_text(json.dumps(hparams))
    with pytest.raises(ValueError, match="does not match the drafter"):
        GuidedDrafter.from_sd2_checkpoint(str(tmp_path / "sd2"), drafter_model=other)


# ----- clear errors ----------------------------------------------------------------------------------------------


def test_clear_errors(target):
    draft = tiny_causal_lm("llama", num_layers=2, seed=1)
    with pytest.raises(ValueError, match="hidden_states indices 0..4"):
        GuidedDrafter.from_drafter(draft, target.config, verifier_layers=[1, 7])
    with pytest.raises(ValueError, match="gated MLP"):
        GuidedDrafter.from_drafter(tiny_causal_lm("gpt2", num_layers=2), target.config, verifier_layers=[1])
    with pytest.raises(ValueError, match="guide_method"):
        GuidedDrafter.from_drafter(draft, target.config, verifier_layers=[1], guide_method="elmnt_wise")
    with pytest.raises(ValueError, match="drafter_layers"):
        GuidedDrafter.from_drafter(draft, target.config, verifier_layers=[1], drafter_layers=[2])
    with pytest.raises(ValueError, match="verifier_layers"):
        GuidedDrafterConfig(drafter_config=draft.config, verifier_hidden_size=8, verifier_layers=[])
    model = GuidedDrafter.from_drafter(draft, target.config, verifier_layers=VERIFIER_LAYERS)
    other_target = tiny_causal_lm("llama", num_layers=4, seed=0, hidden_size=64)
    with pytest.raises(ValueError, match="hidden size is 64"):
        check_verifier_layers(model.config, other_target.config)
    ids = torch.randint(3, 120, (1, 4))
    with pytest.raises(ValueError, match="H_v=48"):
        model(ids, guide_states=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="L=2"):
        model(ids, guide_states=torch.zeros(1, 3, TARGET_HIDDEN))
    with pytest.raises(ValueError, match="returned only"):
        model.guide_states_from_hidden_states([torch.zeros(1, 4, TARGET_HIDDEN)] * 3)
