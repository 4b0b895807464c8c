"""generate() options under speculative decoding follow transformers' semantics."""

import pytest
import torch
from conftest import RecordingStreamer, left_padded_batch, perturbed_copy, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_specdec import ModelDrafter, NGramDrafter, SpecStats, TreeConfig

UNEVEN = [7, 3, 9, 5, 1]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=3)
    return target, perturbed_copy(target, noise=0.1)


def test_output_scores_and_logits_match_plain(pair):
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, repetition_penalty=1.3)
    plain = target.generate(**batch, **kwargs)
    for drafter in (ModelDrafter(draft, num_draft_tokens=4), ModelDrafter(draft, tree=TreeConfig(3, 2, 6))):
        ours = target.generate(**batch, assistant_model=drafter, **kwargs)
        assert torch.equal(ours.sequences, plain.sequences)
        assert len(ours.scores) == len(plain.scores) == 12
        for mine, theirs in zip(ours.scores, plain.scores):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        for mine, theirs in zip(ours.logits, plain.logits):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_stats_add_up(pair):
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=2)
    drafter = ModelDrafter(draft, num_draft_tokens=3)
    out = target.generate(**batch, assistant_model=drafter, max_new_tokens=20, do_sample=False,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=0, time_phases=True)
    stats = out.spec_stats
    assert isinstance(stats, SpecStats) and drafter.last_stats is stats
    # every generated token is an accepted draft token or a round's bonus (no EOS here): the prompt's last token
    # is the first round's root, so the prefill chooses none
    assert torch.equal(stats.new_tokens, stats.accepted + stats.rounds)
    assert bool((stats.accepted <= stats.drafted).all()) and bool((stats.drafted <= 3 * stats.rounds).all())
    assert stats.target_forwards == int(stats.rounds.max())  # the first round's forward also reads the prompt
    # a chain round refuses at most one token; tokens after a refusal are drafted but never decided
    assert bool((stats.accepted + stats.rejected <= stats.drafted).all()) and bool((stats.rejected <= stats.rounds).all())
    assert stats.per_token_acceptance == pytest.approx(
        stats.accepted.sum().item() / (stats.accepted.sum() + stats.rejected.sum()).item())
    assert stats.per_token_acceptance >= stats.acceptance_rate
    assert stats.mean_accepted_length == pytest.approx((stats.accepted.sum() + stats.rounds.sum()).item()
                                                       / stats.rounds.sum().item())
    assert 0 < stats.loop_efficiency <= 1.0  # measured with time_phases=True
    assert 0 < stats.draft_forward_seconds <= stats.draft_seconds and stats.target_forward_seconds > 0
    # the histogram of accepted lengths counts every round of every row once, and their accepted tokens
    histogram = stats.accepted_length_counts
    assert len(histogram) <= 3 + 1 and sum(histogram) == int(stats.rounds.sum())
    assert sum(length * rounds for length, rounds in enumerate(histogram)) == int(stats.accepted.sum())
    assert set(stats.summary()) >= {"acceptance_rate", "mean_accepted_length", "loop_efficiency"}


def test_plain_transformers_assistant_keeps_transformers_behaviour(pair):
    target, draft = pair
    prompt = left_padded_batch(target.config.vocab_size, [6], seed=3)
    plain = target.generate(**prompt, max_new_tokens=10, do_sample=False)
    assisted = target.generate(**prompt, max_new_tokens=10, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)
    with pytest.raises(ValueError, match="batch_size = 1"):  # transformers' own limitation, untouched
        target.generate(**left_padded_batch(96, [4, 6]), max_new_tokens=3, assistant_model=draft)


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_user_stopping_criteria_cut_rows_like_plain(pair):
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=4)
    plain_free = target.generate(**batch, max_new_tokens=20, do_sample=False)
    stop_token = int(plain_free[1, batch["input_ids"].shape[1] + 4])
    criteria = StoppingCriteriaList([StopAfterToken(stop_token)])
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False, stopping_criteria=criteria, pad_token_id=0)
    ours = target.generate(**batch, max_new_tokens=20, do_sample=False, stopping_criteria=criteria, pad_token_id=0,
                           assistant_model=ModelDrafter(draft, num_draft_tokens=5))
    assert torch.equal(ours, plain)


def test_streamer_receives_prompt_then_every_token(pair):
    target, draft = pair
    prompt = left_padded_batch(target.config.vocab_size, [6], seed=5)
    streamer = RecordingStreamer()
    out = target.generate(**prompt, max_new_tokens=15, do_sample=False, streamer=streamer,
                          assistant_model=ModelDrafter(draft, num_draft_tokens=4))
    assert streamer.ended and streamer.chunks[0] == prompt["input_ids"][0].tolist()
    assert [token for chunk in streamer.chunks[1:] for token in chunk] == out[0, 6:].tolist()
    assert len(streamer.chunks) < 1 + 15  # several tokens per chunk: speculation streamed per round


class SpeculativeRecordingStreamer(RecordingStreamer):
    def __init__(self):
        super().__init__()
        self.from_draft, self.drafted = [], []

    def put_speculative(self, tokens, num_from_draft, num_drafted):
        self.put(tokens)
        self.from_draft.append(num_from_draft)
        self.drafted.append(num_drafted)


def test_speculative_streamer_learns_which_tokens_were_drafted(pair):
    target, draft = pair
    prompt = left_padded_batch(target.config.vocab_size, [6], seed=5)
    streamer = SpeculativeRecordingStreamer()
    out = target.generate(**prompt, max_new_tokens=15, do_sample=False, streamer=streamer, eos_token_id=None,
                          pad_token_id=0, assistant_model=ModelDrafter(draft, num_draft_tokens=4),
                          return_dict_in_generate=True)
    assert [token for chunk in streamer.chunks[1:] for token in chunk] == out.sequences[0, 6:].tolist()
    # after the prompt, one chunk per round (the prompt's last token is the first round's root) whose leading
    # tokens are the accepted drafts, the bonus token last unless max_new_tokens cut the round short
    assert len(streamer.from_draft) == int(out.spec_stats.rounds[0]) == len(streamer.chunks) - 1
    assert sum(streamer.from_draft) <= int(out.spec_stats.accepted[0])
    for chunk, drafted in zip(streamer.chunks[1:-1], streamer.from_draft[:-1]):
        assert drafted == len(chunk) - 1
    assert any(streamer.from_draft) and sum(streamer.drafted) == int(out.spec_stats.drafted[0])


def test_streamer_with_a_batch_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="batch size 1"):
        target.generate(**left_padded_batch(96, [5, 3]), max_new_tokens=4, streamer=RecordingStreamer(),
                        assistant_model=ModelDrafter(draft))


def test_num_return_sequences_expands_the_batch_with_sampling(pair):
    target, draft = pair
    prompt = left_padded_batch(target.config.vocab_size, [5, 3], seed=6)
    out = target.generate(**prompt, do_sample=True, max_new_tokens=6, num_return_sequences=3,
                          assistant_model=ModelDrafter(draft))
    assert out.shape == (6, 5 + 6)
    assert torch.equal(out[:3, :5], prompt["input_ids"][0].expand(3, -1))


def test_finished_rows_stop_costing_draft_work(pair):
    target, _ = pair
    batch = left_padded_batch(target.config.vocab_size, UNEVEN, seed=7)
    plain = target.generate(**batch, max_new_tokens=30, do_sample=False)
    eos = int(plain[0, batch["input_ids"].shape[1] + 2])  # row 0 ends early
    out = target.generate(**batch, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          assistant_model=ModelDrafter(target, num_draft_tokens=2), return_dict_in_generate=True)
    stats = out.spec_stats
    assert int(stats.rounds[0]) < int(stats.rounds.max())
    assert int(stats.drafted[0]) <= 2 * int(stats.rounds[0])


# ---------------------------------------------------------------------------------------------- clear errors
def test_beam_search_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="num_beams=1"):
        target.generate(**left_padded_batch(96, [5]), num_beams=2, max_new_tokens=3, assistant_model=ModelDrafter(draft))


def test_right_padding_is_refused(pair):
    target, draft = pair
    batch = left_padded_batch(96, [5, 3])
    batch = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        target.generate(**batch, max_new_tokens=3, assistant_model=ModelDrafter(draft))


def test_vocabulary_mismatch_is_refused(pair):
    target, _ = pair
    other = tiny_model("llama", vocab_size=500, seed=1)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=3, assistant_model=ModelDrafter(other))


def test_static_cache_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="cache_implementation"):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=3, cache_implementation="static",
                        assistant_model=ModelDrafter(draft))


def test_flash_attention_is_refused(pair):
    target, draft = pair
    target.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="sdpa"):
            target.generate(**left_padded_batch(96, [5]), max_new_tokens=3, assistant_model=ModelDrafter(draft))
    finally:
        target.config._attn_implementation = "sdpa"


def test_encoder_decoder_target_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, decoder_start_token_id=0)).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        t5.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=3, assistant_model=NGramDrafter())


@pytest.mark.parametrize("bad", [dict(depth=0), dict(top_k=0), dict(depth=2, top_k=2, max_nodes=7),
                                 dict(max_nodes=0)])
def test_tree_sizes_out_of_range(bad):
    with pytest.raises(ValueError, match="TreeConfig"):
        TreeConfig(**bad)


def test_bad_drafter_arguments(pair):
    _, draft = pair
    with pytest.raises(ValueError, match="num_draft_tokens"):
        ModelDrafter(draft, num_draft_tokens=0)
    with pytest.raises(ValueError, match="schedule"):
        ModelDrafter(draft, schedule="sometimes")
    with pytest.raises(ValueError, match="min_ngram"):
        NGramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(TypeError, match="causal LM"):
        ModelDrafter("not a model")
