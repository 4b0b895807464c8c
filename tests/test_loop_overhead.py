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


def _prompt_of(batch, row):
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


@torch.no_grad()
def _reference_logits(model, sequence):
    return model(input_ids=torch.tensor([sequence])).logits[0, -1]


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
@torch.no_grad()
def test_chains_fed_through_the_committed_bias_stay_exact(model_type, overrides):
    """`forward_chain` makes chain slots visible in the committed bias itself (no tree mask): whole chains with
    trailing holes (the verify chunk) and chains fed step by step (drafting), kept raggedly round after round,
    give the logits of each text run alone, and `keep` hides every slot it did not keep."""
    model = tiny_model(model_type, seed=7, **overrides)
    batch = left_padded_batch(96, [3, 8, 5], seed=7)
    cache = SlotCache(model, 3, capacity=8 + 12 * 5 + 8, device=torch.device("cpu"), max_round_nodes=5)
    cache.prefill(batch["input_ids"], batch["attention_mask"].bool())
    texts = [_prompt_of(batch, row) for row in range(3)]
    generator = torch.Generator().manual_seed(1)
    for round_index in range(12):
        tokens = torch.randint(3, 96, (3, 4), generator=generator)
        if round_index % 2:  # a whole chunk at once, rows with 4, 2 and 3 real nodes
            valid = torch.arange(4)[None, :] < torch.tensor([[4], [2], [3]])
            logits = cache.forward_chain(tokens, valid=valid).logits
            fed = valid.sum(-1)
            counts = torch.minimum(torch.tensor([round_index % 5, 1, 3]), fed)
            cache.keep(torch.arange(4).expand(3, -1), counts, in_place=True)
        else:  # step by step, as a drafter feeds its chain (the last token is never fed)
            logits = torch.cat([cache.forward_chain(tokens[:, step:step + 1], step).logits for step in range(3)], 1)
            fed = torch.full((3,), 3)
            counts = cache.keep_path(torch.arange(4).expand(3, -1), torch.tensor([round_index % 5, 1, 4]),
                                     in_place=True)
            assert counts.tolist() == [min(round_index % 5, 3), 1, 3]  # the unfed fourth node is never kept
        for row in range(3):
            for node in range(int(fed[row])):
                expected = _reference_logits(model, texts[row] + tokens[row, : node + 1].tolist())
                torch.testing.assert_close(logits[row, node], expected, atol=1e-4, rtol=1e-4)
            texts[row] += tokens[row, : int(counts[row])].tolist()
        assert cache.live_steps == 0
        visible = (cache.committed_bias == 0).sum(-1)
        assert visible.tolist() == [len(text) for text in texts]  # nothing past the kept text stays visible


def test_prefixes_are_built_only_for_processors_that_read_them(pair, monkeypatch):
    """Without an input-reading processor no per-position prefix is built (suppressed tokens: scores only); with one
    (repetition penalty) they are, and both outputs follow plain decoding."""
    from hf_specdec import processors

    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, [6, 4], seed=8)
    built = []
    init = processors.TreePrefixes.__init__

    def counting_init(self, *args):
        built.append(1)
        init(self, *args)

    monkeypatch.setattr(processors.TreePrefixes, "__init__", counting_init)
    for options, reads in (({"suppress_tokens": [5, 7]}, False), ({"repetition_penalty": 1.3}, True)):
        built.clear()
        plain = target.generate(**batch, max_new_tokens=10, do_sample=False, **options)
        ours = target.generate(**batch, assistant_model=ModelDrafter(draft, num_draft_tokens=3), max_new_tokens=10,
                               do_sample=False, **options)
        assert torch.equal(ours, plain)
        assert bool(built) == reads


def test_a_draft_longer_than_max_round_nodes_is_refused_by_name(pair):
    """The caches are sized from max_round_nodes(): a drafter that proposes more nodes gets a clear error (it
    used to be an index error, or, through the chain mask, silently different output)."""
    target, draft = pair

    class Overlong(ModelDrafter):
        def max_round_nodes(self, num_draft_tokens=None):
            return 2

    batch = left_padded_batch(target.config.vocab_size, [6], seed=6)
    with pytest.raises(ValueError, match="max_round_nodes"):
        target.generate(**batch, assistant_model=Overlong(draft, num_draft_tokens=4), max_new_tokens=8,
                        do_sample=False)


def test_a_processor_raising_mid_chain_leaves_the_drafter_reusable(pair):
    """A chain step marks the drafter while it feeds the chain; an exception must not leave the mark set, or a
    tree drafter made from it would feed its levels as a chain."""
    from transformers import LogitsProcessor, LogitsProcessorList

    target, draft = pair

    class FailsOnThirdCall(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            FailsOnThirdCall.calls += 1
            if FailsOnThirdCall.calls == 3:
                raise RuntimeError("user processor failed")
            return scores

    batch = left_padded_batch(target.config.vocab_size, [6], seed=7)
    drafter = ModelDrafter(draft, num_draft_tokens=4)
    with pytest.raises(RuntimeError, match="user processor failed"):
        target.generate(**batch, assistant_model=drafter, max_new_tokens=8, do_sample=False,
                        logits_processor=LogitsProcessorList([FailsOnThirdCall()]))
    assert drafter._chain_step is None
    plain = target.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(target.generate(**batch, assistant_model=drafter, max_new_tokens=8, do_sample=False), plain)


def test_auto_counts_the_forwards_of_transformers_loop_as_model_time(pair):
    """schedule="auto" runs its first call (and any hand-off) in transformers' own loop: those forwards are model
    time too, so its loop efficiency is measured, not 0."""
    target, draft = pair
    batch = left_padded_batch(target.config.vocab_size, [6], seed=8)
    drafter = ModelDrafter(draft, num_draft_tokens=3, schedule="auto")
    out = target.generate(**batch, assistant_model=drafter, max_new_tokens=12, do_sample=False,
                          return_dict_in_generate=True, time_phases=True)
    assert out.spec_stats.rounds.sum() == 0  # the first call decodes plainly (it times a plain step)
    assert 0.2 < out.spec_stats.loop_efficiency <= 1.0
