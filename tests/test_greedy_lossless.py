"""Greedy speculative output equals plain greedy `generate()` token for token."""

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, tiny_model

from hf_specdec import ModelDrafter, NGramDrafter, SortedDrafter, TreeConfig

UNEVEN = [7, 3, 9, 5, 1]  # batch of 5 with uneven left padding


def drafters(draft, num_draft_tokens):
    return {
        "sorted-chain": SortedDrafter(draft, exits=[1, 2], thresholds=[0.1], num_draft_tokens=num_draft_tokens),
        "model-chain": ModelDrafter(draft, num_draft_tokens=num_draft_tokens),
        "model-tree": ModelDrafter(draft, tree=TreeConfig(depth=num_draft_tokens, top_k=2, max_nodes=2 * num_draft_tokens)),
        "ngram-chain": NGramDrafter(max_ngram=3, num_draft_tokens=num_draft_tokens),
        "ngram-tree": NGramDrafter(max_ngram=2, tree=TreeConfig(depth=num_draft_tokens, top_k=3, max_nodes=3 * num_draft_tokens)),
    }


def assert_same_as_plain(target, drafter, batch, **kwargs):
    plain = target.generate(**batch, do_sample=False, **kwargs)
    ours = target.generate(**batch, do_sample=False, assistant_model=drafter, return_dict_in_generate=True, **kwargs)
    assert torch.equal(ours.sequences, plain), f"\nplain {plain.tolist()}\nours  {ours.sequences.tolist()}"
    return ours


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("kind", ["model-chain", "model-tree", "ngram-chain", "ngram-tree", "sorted-chain"])
@pytest.mark.parametrize("lengths", [[6], UNEVEN], ids=["batch1", "batch5"])
def test_greedy_equals_plain(arch, kind, lengths):
    target = tiny_model(arch, seed=3)
    draft = perturbed_copy(target, noise=0.1)
    batch = left_padded_batch(target.config.vocab_size, lengths, seed=4)
    out = assert_same_as_plain(target, drafters(draft, 4)[kind], batch, max_new_tokens=24)
    assert out.spec_stats.target_forwards < 24  # drafting saved target forwards


@pytest.mark.parametrize("num_draft_tokens", range(1, 9))
def test_every_draft_length(llama_pair, num_draft_tokens):
    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=num_draft_tokens)
    for kind in ("model-chain", "model-tree"):
        assert_same_as_plain(target, drafters(draft, num_draft_tokens)[kind], batch, max_new_tokens=19)


def test_draft_identical_to_target_accepts_everything(llama_pair):
    target = llama_pair[0]
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=2)
    out = assert_same_as_plain(target, ModelDrafter(target, num_draft_tokens=5), batch, max_new_tokens=23)
    assert out.spec_stats.acceptance_rate == 1.0
    assert out.spec_stats.mean_accepted_length > 5.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 11, 13])
def test_max_new_tokens_landing_mid_draft(llama_pair, max_new_tokens):
    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=7)
    for drafter in (ModelDrafter(target, num_draft_tokens=4), ModelDrafter(draft, num_draft_tokens=6)):
        out = assert_same_as_plain(target, drafter, batch, max_new_tokens=max_new_tokens)
        assert out.sequences.shape[1] == batch["input_ids"].shape[1] + max_new_tokens


def test_eos_inside_an_accepted_draft():
    target = tiny_model("llama", seed=3)
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=4)
    plain = target.generate(**batch, do_sample=False, max_new_tokens=24)
    generated = plain[:, batch["input_ids"].shape[1]:]
    # declare tokens that plain greedy emits mid-way as EOS, so rows stop at different points inside drafts
    eos = [int(generated[0, 5]), int(generated[2, 9])]
    for drafter in (ModelDrafter(target, num_draft_tokens=6), ModelDrafter(perturbed_copy(target, 0.1)),
                    ModelDrafter(target, tree=TreeConfig(depth=4, top_k=2, max_nodes=8))):
        out = assert_same_as_plain(target, drafter, batch, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
        assert out.sequences.shape[1] < plain.shape[1] or (out.sequences == 0).any()


@pytest.mark.parametrize("processors", [
    dict(repetition_penalty=1.5),
    dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=6, eos_token_id=5),
    dict(bad_words_ids=[[7], [9, 10]], suppress_tokens=[11, 12]),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3, begin_suppress_tokens=[13]),
], ids=["repetition", "no-repeat-ngram", "min-new-tokens", "bad-words+suppress", "mixed"])
def test_greedy_with_input_dependent_processors(llama_pair, processors):
    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=11)
    for drafter in (ModelDrafter(draft, num_draft_tokens=4), ModelDrafter(draft, tree=TreeConfig(3, 3, 9)),
                    NGramDrafter(max_ngram=2)):
        assert_same_as_plain(target, drafter, batch, max_new_tokens=20, **processors)


def test_heuristic_schedule_and_num_assistant_tokens_override(llama_pair):
    target = llama_pair[0]
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=5)
    heuristic = ModelDrafter(target, num_draft_tokens=2, schedule="heuristic")
    out = assert_same_as_plain(target, heuristic, batch, max_new_tokens=30)
    assert out.spec_stats.mean_accepted_length > 3.0  # grew past the initial 2 on full acceptance
    fixed = ModelDrafter(target, num_draft_tokens=2)
    out = assert_same_as_plain(target, fixed, batch, max_new_tokens=30, num_assistant_tokens=6)
    assert out.spec_stats.mean_accepted_length > 5.0  # generate()'s num_assistant_tokens overrode 2


def test_custom_generate_door(llama_pair):
    import hf_specdec

    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=6)
    plain = target.generate(**batch, do_sample=False, max_new_tokens=15)
    ours = target.generate(**batch, do_sample=False, max_new_tokens=15,
                           custom_generate=hf_specdec.speculative_generate, drafter=ModelDrafter(draft))
    assert torch.equal(ours, plain)


def test_drafter_in_another_dtype(llama_pair):
    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=8)
    assert_same_as_plain(target, ModelDrafter(perturbed_copy(draft, 0.0).to(torch.bfloat16)), batch, max_new_tokens=12)


def test_padded_vocabulary_of_one_tokenizer():
    target = tiny_model("qwen2", vocab_size=100, seed=3)
    draft = tiny_model("qwen2", vocab_size=96, seed=3)  # same tokenizer, smaller padded embedding table
    with torch.no_grad():
        for (name, p_draft), (_, p_target) in zip(draft.named_parameters(), target.named_parameters()):
            p_draft.copy_(p_target[: p_draft.shape[0]] if name.endswith(("embed_tokens.weight", "lm_head.weight"))
                          else p_target)
    batch = left_padded_batch(96, UNEVEN, seed=9)
    assert_same_as_plain(target, ModelDrafter(draft, num_draft_tokens=4), batch, max_new_tokens=12)
    assert_same_as_plain(draft, ModelDrafter(target, num_draft_tokens=4), batch, max_new_tokens=12)


def test_long_generation_keeps_cache_bounded(llama_pair):
    target, draft = llama_pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=10)
    drafter = ModelDrafter(draft, num_draft_tokens=5)
    out = assert_same_as_plain(target, drafter, batch, max_new_tokens=120)
    assert out.spec_stats.rounds.max() < 120


@pytest.mark.parametrize("arch,window", [("mistral", dict(sliding_window=8)),
                                         ("qwen2", dict(sliding_window=8, use_sliding_window=True,
                                                        max_window_layers=0))])
def test_sliding_window_attention_past_the_window(arch, window):
    target = tiny_model(arch, num_layers=2, seed=3, **window)
    batch = left_padded_batch(96, [12, 5, 9], seed=1)
    for drafter in (ModelDrafter(perturbed_copy(target, 0.1), num_draft_tokens=4),
                    ModelDrafter(perturbed_copy(target, 0.1), tree=TreeConfig(3, 2, 6))):
        assert_same_as_plain(target, drafter, batch, max_new_tokens=30)  # 30 + prompt >> window of 8


def test_mixed_sliding_and_full_layers_are_refused():
    target = tiny_model("qwen2", num_layers=2, seed=3, sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert len(set(target.config.layer_types)) == 2
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention"):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=4, assistant_model=NGramDrafter())
