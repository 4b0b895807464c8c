"""The fast engine: captured (compiled) forwards are exact, schedule="auto" speculates only when it pays, and a
steady-state round reads nothing back from the device but the running-row count."""

import pytest
import torch
from conftest import left_padded_batch, perturbed_copy, rotating_routed_drafter, tiny_model
from transformers import CompileConfig

from hf_specdec import Eagle3DraftModel, GuidedDrafter, ModelDrafter, NGramDrafter, TreeConfig
from hf_specdec.schedule import AutoSchedule, CostModel, expected_tokens


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=3, num_layers=2)
    return target, perturbed_copy(target, noise=0.1)


# ---------------------------------------------------------------------------------------------- compiled forwards
def test_compiled_greedy_equals_plain_for_chains_and_trees(pair):
    """One compile per model and shape (about 20 s each on a CPU): kept to one batch and two drafters."""
    torch._dynamo.reset()
    target, draft = pair
    batch = left_padded_batch(96, [7, 3, 9], seed=1)
    plain = target.generate(**batch, max_new_tokens=16, do_sample=False)
    config = CompileConfig(fullgraph=False)
    for drafter in (ModelDrafter(draft, num_draft_tokens=4), ModelDrafter(draft, tree=TreeConfig(3, 2, 5))):
        for seed in (1, 2):  # the second call reuses the captured graphs
            batch = left_padded_batch(96, [7, 3, 9], seed=seed)
            plain = target.generate(**batch, max_new_tokens=16, do_sample=False)
            ours = target.generate(**batch, max_new_tokens=16, do_sample=False, assistant_model=drafter,
                                   compile_config=config)
            assert torch.equal(ours, plain)


def test_compiled_routed_rows_switching_drafters_equal_plain(pair):
    """Rows moving every round between a model drafter, n-gram lookup and no drafting, through captured forwards:
    every draft is padded to the routed drafter's widest round, so the captured shapes never change."""
    target, draft = pair
    config = CompileConfig(fullgraph=False)
    for seed in (1, 2):
        batch = left_padded_batch(96, [7, 3, 9], seed=seed)
        plain = target.generate(**batch, max_new_tokens=16, do_sample=False)
        routed = rotating_routed_drafter({"a": ModelDrafter(draft, num_draft_tokens=4), "b": NGramDrafter(2, 3)})
        ours = target.generate(**batch, max_new_tokens=16, do_sample=False, assistant_model=routed,
                               compile_config=config)
        assert torch.equal(ours, plain)


def test_compiled_eagle3_chains_and_trees_equal_plain(pair):
    """An EAGLE-3 tree through captured forwards: its catch-up feeds a fixed width every round."""
    target, _ = pair
    torch.manual_seed(0)
    head = Eagle3DraftModel.from_target(target.config, draft_vocab=torch.arange(0, 96, 2),
                                        aux_hidden_state_layer_ids=[0, 1, 2]).eval()
    config = CompileConfig(fullgraph=False)
    drafter = head.as_drafter(tree=TreeConfig(3, 2, 5))  # (chains take the same catch-up and node path)
    for seed in (1, 2):
        batch = left_padded_batch(96, [7, 3, 9], seed=seed)
        plain = target.generate(**batch, max_new_tokens=12, do_sample=False)
        ours = target.generate(**batch, max_new_tokens=12, do_sample=False, assistant_model=drafter,
                               compile_config=config)
        assert torch.equal(ours, plain)


def test_compiled_sampling_scores_are_plains(pair):
    """Sampling through captured forwards: every returned score is plain's processed score for that prefix."""
    target, draft = pair
    batch = left_padded_batch(96, [7, 3, 9], seed=3)
    torch.manual_seed(0)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, return_dict_in_generate=True,
                  output_scores=True)
    out = target.generate(**batch, assistant_model=ModelDrafter(draft, num_draft_tokens=4),
                          compile_config=CompileConfig(), **kwargs)
    width = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(3, out.sequences.shape[1] - width, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = target(out.sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    new_tokens = out.spec_stats.new_tokens
    for step, scores in enumerate(out.scores):
        expected = (logits[:, width + step - 1].float() / 0.8)
        kept = expected.topk(20, dim=-1).values[:, -1:]
        expected = expected.masked_fill(expected < kept, -float("inf"))
        running = new_tokens > step  # (a row past its EOS keeps zero scores)
        torch.testing.assert_close(scores[running], expected[running], atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- schedule="auto"
def costs(plain_step, round_seconds):
    model = CostModel(tuple(round_seconds), plain_step=plain_step)
    model.samples = {length: [seconds] * 2 for length, seconds in round_seconds.items()}
    return model


def test_auto_picks_the_length_with_the_most_tokens_per_second():
    schedule = AutoSchedule(max_draft_tokens=8)
    schedule.start(("key",))
    # a CPU-like cost: a round of γ drafts costs 1 + 0.1 γ plain steps, plus a verify growing with the chunk
    schedule.costs = costs(1.0, {g: 1.0 + 0.1 * g + 0.15 * g for g in (1, 2, 4, 8)})
    for alpha in (0.5, 0.8, 0.95):
        best = schedule.best_length(alpha)
        rates = {g: expected_tokens(alpha, g) / schedule.costs.seconds(g) for g in range(1, 9)}
        assert best == max(rates, key=rates.get) and rates[best] > 1.0
    assert schedule.best_length(0.95) > schedule.best_length(0.5)
    assert schedule.best_length(0.05) == 0  # acceptance too low: plain steps win
    assert not schedule.never_pays()


def test_auto_hands_over_to_plain_decoding_when_drafting_cannot_pay():
    schedule = AutoSchedule(max_draft_tokens=4)
    schedule.start(("key",))
    schedule.costs = costs(1.0, {1: 2.1, 2: 3.2, 4: 5.5})  # even fully accepted drafts lose to plain steps
    assert schedule.best_length(1.0) == 0 and schedule.never_pays() and schedule.wants_plain_decoding()


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_auto_is_lossless_through_every_phase(pair, decoding):
    """First call: plain decoding (timed); second: calibration rounds; then chosen lengths. All exact."""
    target, draft = pair
    drafter = ModelDrafter(draft, num_draft_tokens=4, schedule="auto")
    for seed in range(4):
        batch = left_padded_batch(96, [7, 3, 9], seed=seed)
        if decoding == "greedy":
            plain = target.generate(**batch, max_new_tokens=24, do_sample=False)
            ours = target.generate(**batch, max_new_tokens=24, do_sample=False, assistant_model=drafter)
            assert torch.equal(ours, plain)
        else:
            out = target.generate(**batch, max_new_tokens=24, do_sample=True, top_k=1, assistant_model=drafter)
            assert torch.equal(out, target.generate(**batch, max_new_tokens=24, do_sample=False))
    assert drafter.auto.costs.plain_step is not None and drafter.auto.costs.calibrated


def test_auto_drafts_where_it_pays():
    """A pair whose draft costs almost nothing next to the target: auto settles on a long draft."""
    target = tiny_model("llama", seed=3, num_layers=2, hidden_size=32)
    drafter = NGramDrafter(num_draft_tokens=4, schedule="auto")
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])}
    schedule = drafter.auto
    for _ in range(3):
        out = target.generate(**batch, max_new_tokens=20, do_sample=False, assistant_model=drafter,
                              return_dict_in_generate=True)
        assert torch.equal(out.sequences, target.generate(**batch, max_new_tokens=20, do_sample=False))
    schedule.costs.plain_step = 1.0
    schedule.costs.samples = {g: [1.0 + 0.01 * g] * 2 for g in schedule.costs.lengths}
    assert schedule.best_length(0.9) == 4


def test_auto_refuses_trees(pair):
    with pytest.raises(ValueError, match="auto"):
        ModelDrafter(pair[1], tree=TreeConfig(3, 2, 5), schedule="auto")


# ---------------------------------------------------------------------------------------------- the first round
def target_widths(target, run):
    """The query width of every target forward `run()` makes, and what it returns."""
    widths = []
    handle = target.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        return widths, run()
    finally:
        handle.remove()


@pytest.mark.parametrize("drafter", ["chain", "ngram", "compiled"])
def test_the_first_round_reads_the_prompt(pair, drafter):
    """No prefill of its own: the first verify forward reads the prompt, its last token as the round's root, and
    the first draft in one causal forward (one target forward per call fewer, as in transformers' assisted
    generation); exact, for batches with a one-token row too (its prompt columns before the root are padding)."""
    target, draft = pair
    make = {"chain": lambda: ModelDrafter(draft, num_draft_tokens=4),
            "ngram": lambda: NGramDrafter(num_draft_tokens=4),
            "compiled": lambda: ModelDrafter(draft, num_draft_tokens=4)}[drafter]
    options = {"compile_config": CompileConfig(fullgraph=False)} if drafter == "compiled" else {}
    for lengths in ([7, 3, 9], [6], [5, 1, 4]):
        batch = left_padded_batch(96, lengths, seed=6)
        widths, out = target_widths(target, lambda batch=batch: target.generate(
            **batch, max_new_tokens=10, do_sample=False, assistant_model=make(), return_dict_in_generate=True,
            **options))
        drafted_first = widths[0] - max(lengths)  # the prompt, then the first round's draft
        assert drafted_first == (4 if drafter != "ngram" else drafted_first) and drafted_first >= 0
        assert out.spec_stats.target_forwards == len(widths) == int(out.spec_stats.rounds.max())
        assert torch.equal(out.sequences, target.generate(**batch, max_new_tokens=10, do_sample=False))


def test_the_prefill_reads_the_whole_prompt_where_it_must(pair):
    """A one-token prompt, a batch of one whose mask ends in padding, trees (their mask is not causal), a chunked
    prefill and a drafter that reads the target's prefill states keep the prefill that reads the whole prompt and
    chooses the first token; all exact."""
    target, draft = pair
    guided = GuidedDrafter.from_drafter(perturbed_copy(target, 0.1), target_config=target.config,
                                        verifier_layers=[1, 2]).eval()
    one_token = {"input_ids": torch.tensor([[17]])}
    padded_end = {"input_ids": torch.tensor([[5, 17, 33, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    uneven = left_padded_batch(96, [7, 3, 9], seed=7)
    cases = [(one_token, ModelDrafter(draft), {}), (padded_end, ModelDrafter(draft), {}), (uneven, guided, {}),
             (uneven, ModelDrafter(draft, tree=TreeConfig(3, 2, 5)), {}),
             (uneven, ModelDrafter(draft), {"prefill_chunk_size": 4})]
    for batch, drafter, options in cases:
        widths, out = target_widths(target, lambda batch=batch, drafter=drafter, options=options: target.generate(
            **batch, max_new_tokens=8, do_sample=False, assistant_model=drafter, **options))
        width = batch["input_ids"].shape[1]  # the prefill's first (or only) chunk of the whole prompt
        assert widths[0] == min(width, options.get("prefill_chunk_size", width))
        assert torch.equal(out, target.generate(**batch, max_new_tokens=8, do_sample=False))


# ---------------------------------------------------------------------------------------------- host reads
def test_a_steady_state_round_reads_the_device_once(pair, monkeypatch):
    """Count host reads (`.item()`, `bool()`, `int()`, `.tolist()` of device values) per round."""
    from hf_specdec import engine

    target, draft = pair
    batch = left_padded_batch(96, [7, 3, 9], seed=4)
    reads = []
    original = torch.Tensor.item

    def counting_item(self):
        reads.append(1)
        return original(self)

    rounds = []
    original_round = engine._Run._round

    def counting_round(self):
        rounds.append(len(reads))
        return original_round(self)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", counting_item)
        patch.setattr(engine._Run, "_round", counting_round)
        for name in ("__bool__", "__int__"):
            original_method = getattr(torch.Tensor, name)

            def counted(self, _method=original_method):
                reads.append(1)
                return _method(self)

            patch.setattr(torch.Tensor, name, counted)
        target.generate(**batch, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
                        assistant_model=ModelDrafter(draft, num_draft_tokens=4))
    per_round = [later - earlier for earlier, later in zip(rounds[1:], rounds[2:])]
    assert per_round and max(per_round) <= 1, per_round


def test_auto_hands_a_single_row_over_to_plain_decoding_mid_call(pair):
    """Once plain steps win (here forced by a cost model where drafting never pays after calibration), a
    one-row call continues in transformers' own loop: same tokens, streamed once, stats still add up."""

    class Recorder:
        def __init__(self):
            self.tokens, self.ended = [], 0

        def put(self, value):
            self.tokens.append(value.reshape(-1).tolist())

        def end(self):
            self.ended += 1

    target, draft = pair
    drafter = ModelDrafter(draft, num_draft_tokens=4, schedule="auto")
    prompt = left_padded_batch(96, [6], seed=9)
    for _ in range(2):  # plain decoding (timed), then calibration
        target.generate(**prompt, max_new_tokens=30, do_sample=False, assistant_model=drafter)
    drafter.auto.alpha = 0.01  # acceptance so low that plain steps win from the first round on
    drafter.auto.plain_calls = 3  # the next call is an exploring one: it starts speculating, then hands over
    streamer = Recorder()
    out = target.generate(**prompt, max_new_tokens=30, do_sample=False, assistant_model=drafter, streamer=streamer,
                          return_dict_in_generate=True)
    plain = target.generate(**prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(out.sequences, plain)
    assert [t for chunk in streamer.tokens[1:] for t in chunk] == plain[0, 6:].tolist() and streamer.ended == 1
    assert int(out.spec_stats.new_tokens[0]) == 30 and int(out.spec_stats.rounds[0]) == 0  # handed over at once


def test_auto_with_a_shorter_num_assistant_tokens_stays_within_its_caches(pair):
    """The call's num_assistant_tokens caps auto's draft lengths (the caches are sized for it)."""
    target, draft = pair
    drafter = ModelDrafter(draft, num_draft_tokens=6, schedule="auto")
    batch = left_padded_batch(96, [5, 8], seed=5)
    plain = target.generate(**batch, max_new_tokens=20, do_sample=False)
    for _ in range(3):
        out = target.generate(**batch, max_new_tokens=20, do_sample=False, assistant_model=drafter,
                              num_assistant_tokens=2)
        assert torch.equal(out, plain)
    assert max(drafter.auto.costs.lengths) == 2
