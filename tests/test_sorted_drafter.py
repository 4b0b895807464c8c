"""SortedDrafter (SD2): adaptive exits of one model, deferred KV, trees, checkpoints, errors."""

import copy

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, tiny_model

from hf_specdec import ModelDrafter, SortedDrafter, TreeConfig

UNEVEN = [7, 3, 9, 5, 1]
EXITS = [2, 4, 6]
MIXED = [0.075, 0.07]  # ~ the medians of this tiny model's max probabilities at exits 2 and 4: every exit gets used


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", num_layers=6, seed=3)


@pytest.fixture(scope="module")
def sorted_model(target):
    return perturbed_copy(target, noise=0.05, seed=4)


def truncated(model, num_layers):
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:num_layers]
    small.config.num_hidden_layers = num_layers
    return small


def recorded_drafts(drafter):
    """Wrap propose() to record every round's draft tokens (and distributions)."""
    drafts = []
    original = drafter.propose

    def propose(state):
        draft = original(state)
        drafts.append((state.sequences.clone(), state.lengths.clone(), draft, state.row_ids.clone()))
        return draft

    drafter.propose = propose
    return drafts


def run(target, drafter, batch, **kwargs):
    return target.generate(**batch, max_new_tokens=20, assistant_model=drafter, return_dict_in_generate=True,
                           **kwargs)


def test_forced_last_exit_drafts_like_a_model_drafter(target, sorted_model):
    batch = left_padded_batch(96, UNEVEN, seed=1)
    for tree in (None, TreeConfig(3, 2, 6)):
        adaptive = SortedDrafter(sorted_model, exits=EXITS, thresholds=[1.0, 1.0], tree=tree, num_draft_tokens=4)
        plain = ModelDrafter(sorted_model, tree=tree, num_draft_tokens=4)
        ours, theirs = recorded_drafts(adaptive), recorded_drafts(plain)
        run(target, adaptive, batch, do_sample=False)
        run(target, plain, batch, do_sample=False)
        assert len(ours) == len(theirs)
        for (_, _, a, _), (_, _, b, _) in zip(ours, theirs):
            assert torch.equal(a.tokens[a.valid], b.tokens[b.valid]) and torch.equal(a.parents, b.parents)
        assert adaptive.exit_counts[6] > 0 and adaptive.exit_counts[2] == adaptive.exit_counts[4] == 0


@pytest.mark.parametrize("exit_layer", [2, 4])
def test_zero_threshold_drafts_like_the_truncated_model(target, sorted_model, exit_layer):
    """Threshold 0 stops at the first exit: every drafted distribution is the truncated model's on that prefix.
    (Compared with a fresh forward, not with a ModelDrafter's run under the same seed: where p ≈ q the residual
    max(0, p - q) a rejection samples from amplifies float rounding, so two exact runs can commit different text.)"""
    batch = left_padded_batch(96, UNEVEN, seed=2)
    exits = [e for e in EXITS if e >= exit_layer]
    adaptive = SortedDrafter(sorted_model, exits=exits, thresholds=[0.0] * (len(exits) - 1), num_draft_tokens=4)
    drafts = recorded_drafts(adaptive)
    torch.manual_seed(0)
    run(target, adaptive, batch, do_sample=True, top_k=0)
    assert adaptive.exit_counts[exit_layer] > 0 and sum(adaptive.exit_counts.values()) == adaptive.exit_counts[exit_layer]
    exit_model = truncated(sorted_model, exit_layer)
    assert check_drafts_against_fresh_forwards(drafts, batch, lambda round_, row, node: exit_model) > 50


def check_drafts_against_fresh_forwards(drafts, batch, model_for) -> int:
    """Every valid drafted distribution (chains) equals `model_for(round, row, node)`'s softmax on its prefix;
    returns how many were checked."""
    checked = 0
    for round_, (sequences, lengths, draft, row_ids) in enumerate(drafts):
        for row in range(len(lengths)):
            pads = int((batch["attention_mask"][row_ids[row]] == 0).sum())
            committed = sequences[row, pads: lengths[row]]
            for node in range(draft.num_nodes):
                model = model_for(round_, row, node) if draft.valid[row, node] else None
                if model is None:
                    continue
                prefix = torch.cat([committed, draft.tokens[row, :node]])[None]
                with torch.no_grad():
                    logits = model(prefix).logits[0, -1]
                torch.testing.assert_close(draft.probs[row, node], logits.softmax(-1), atol=2e-5, rtol=1e-4)
                checked += 1
    return checked


@pytest.mark.parametrize("deep_rows", ["needing", "all"])
def test_deferred_kv_every_drafted_distribution_matches_a_fresh_truncated_forward(target, sorted_model, deep_rows):
    """Mixed exits (some tokens shallow, later ones deep): each q equals the exit model's own distribution."""
    batch = left_padded_batch(96, UNEVEN, seed=3)
    drafter = SortedDrafter(sorted_model, exits=EXITS, thresholds=MIXED, num_draft_tokens=5, deep_rows=deep_rows)
    drafts = recorded_drafts(drafter)
    levels = []
    original_accept = drafter.accept

    def accept(state, draft, path, num_accepted):
        exits = drafter._level_exits  # empty when the round had no draft budget left
        levels.append(torch.stack(exits, dim=1).clone() if exits else None)
        return original_accept(state, draft, path, num_accepted)

    drafter.accept = accept
    torch.manual_seed(1)
    out = run(target, drafter, batch, do_sample=True, top_k=0)  # no top-k: q is the exit's plain softmax
    assert all(drafter.exit_counts[e] > 0 for e in EXITS), drafter.exit_counts  # exits really mixed
    models = {e: truncated(sorted_model, e) for e in EXITS}

    def model_for(round_, row, node):  # (rounds without a draft budget recorded no exits)
        return None if levels[round_] is None else models[EXITS[int(levels[round_][row, node])]]

    assert check_drafts_against_fresh_forwards(drafts, batch, model_for) > 50
    assert out.spec_stats.exit_counts == drafter.exit_counts


@pytest.mark.parametrize("deep_rows", ["needing", "all"])
@pytest.mark.parametrize("tree", [None, TreeConfig(3, 2, 6)], ids=["chain", "tree"])
@pytest.mark.parametrize("lengths", [[6], UNEVEN], ids=["batch1", "batch5"])
def test_greedy_equals_plain_with_mixed_exits(target, sorted_model, tree, lengths, deep_rows):
    batch = left_padded_batch(96, lengths, seed=5)
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False)
    drafter = SortedDrafter(sorted_model, exits=EXITS, thresholds=MIXED, tree=tree, num_draft_tokens=4,
                            deep_rows=deep_rows)
    out = run(target, drafter, batch, do_sample=False)
    assert torch.equal(out.sequences, plain)
    stats = out.spec_stats
    assert sum(count > 0 for count in stats.exit_counts.values()) >= 2, stats.exit_counts
    assert sum(stats.exit_counts.values()) == int(stats.drafted.sum())  # exit statistics add up


def test_self_speculation_shares_weights_and_is_lossless(target):
    drafter = SortedDrafter.from_target(target, exits=[2, 6], thresholds=[0.2])
    assert drafter.model is target  # no copy
    batch = left_padded_batch(96, UNEVEN, seed=6)
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False)
    assert torch.equal(run(target, drafter, batch, do_sample=False).sequences, plain)


def test_checkpoint_round_trip_records_exits(tmp_path, sorted_model):
    drafter = SortedDrafter(sorted_model, exits=[2, 4, 6], thresholds=[0.4, 0.7])
    drafter.save_pretrained(tmp_path / "sorted")
    assert not hasattr(sorted_model.config, "sorted_exits")  # the in-memory model's config is left as it was
    loaded = SortedDrafter.from_pretrained(tmp_path / "sorted")
    assert loaded.exits == [2, 4, 6] and loaded.thresholds == [0.4, 0.7]
    overridden = SortedDrafter.from_pretrained(tmp_path / "sorted", exits=[3, 6], thresholds=[0.9])
    assert overridden.exits == [3, 6] and overridden.thresholds == [0.9]
    # a SoFT-style checkpoint: one threshold per exit, the last ignored
    sorted_model.config.sorted_exits, sorted_model.config.sorted_exit_thresholds = [2, 6], [0.5, 0.0]
    try:
        sorted_model.save_pretrained(tmp_path / "soft")
    finally:
        del sorted_model.config.sorted_exits, sorted_model.config.sorted_exit_thresholds
    soft = SortedDrafter.from_pretrained(tmp_path / "soft")
    assert soft.exits == [2, 6] and soft.thresholds == [0.5]
    plain_dir = tmp_path / "plain"
    tiny_model("llama", num_layers=2).save_pretrained(plain_dir)
    with pytest.raises(ValueError, match="exits="):
        SortedDrafter.from_pretrained(plain_dir)


def test_clear_errors(sorted_model):
    with pytest.raises(ValueError, match="strictly increasing"):
        SortedDrafter(sorted_model, exits=[2, 9])
    with pytest.raises(ValueError, match="strictly increasing"):
        SortedDrafter(sorted_model, exits=[4, 2])
    with pytest.raises(ValueError, match="thresholds"):
        SortedDrafter(sorted_model, exits=[2, 4, 6], thresholds=[0.5])
    with pytest.raises(ValueError, match="thresholds"):
        SortedDrafter(sorted_model, exits=[2, 4], thresholds=[1.5])
    with pytest.raises(ValueError, match="deep_rows"):
        SortedDrafter(sorted_model, exits=[2, 4], deep_rows="some")
    other = tiny_model("llama", vocab_size=600, num_layers=4)
    target = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        target.generate(**left_padded_batch(96, [4]), max_new_tokens=3,
                        assistant_model=SortedDrafter(other, exits=[2, 4]))


def test_an_exit_saved_as_a_plain_draft_model_drafts_what_the_exit_drafts(tmp_path):
    """`save_exit` writes exit k as a plain causal LM (for vLLM's draft-model speculation); drafting with it as a
    ModelDrafter accepts exactly what the sorted drafter at that single exit accepts."""
    from transformers import AutoModelForCausalLM

    target = tiny_model("llama", num_layers=4, seed=2)
    sorted_drafter = SortedDrafter.from_target(target, exits=[2, 4], thresholds=[0.0])  # always exits at 2
    sorted_drafter.save_exit(tmp_path / "exit2")
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "exit2")
    assert cut.config.num_hidden_layers == 2 and not hasattr(cut.config, "sorted_exits")
    batch = left_padded_batch(96, [6, 9], seed=3)
    runs = []
    for drafter in (sorted_drafter, ModelDrafter(cut, num_draft_tokens=4)):
        drafter.num_draft_tokens = 4
        out = target.generate(**batch, max_new_tokens=16, do_sample=False, assistant_model=drafter)
        runs.append((out, drafter.last_stats.accepted.tolist()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    with pytest.raises(ValueError, match="not one of this drafter's exits"):
        sorted_drafter.save_exit(tmp_path / "x", exit_layer=3)
