"""Everything generate() accepts is exact with a drafter, or refused by name (the cases users reported first)."""

import pytest
import torch
from conftest import RecordingStreamer, left_padded_batch, perturbed_copy, tiny_model
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from hf_specdec import ModelDrafter, NGramDrafter, TreeConfig
from hf_specdec.processors import PROCESSOR_RULES, How, rule_for
from hf_specdec.testing import character_tokenizer


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=3)
    return target, perturbed_copy(target, noise=0.1)


def drafters(draft):
    return [ModelDrafter(draft, num_draft_tokens=4), ModelDrafter(draft, tree=TreeConfig(3, 2, 6)),
            NGramDrafter(max_ngram=2, num_draft_tokens=3)]


def assert_exact(target, drafter, batch, **kwargs):
    plain = target.generate(**batch, do_sample=False, **kwargs)
    ours = target.generate(**batch, do_sample=False, assistant_model=drafter, **kwargs)
    assert torch.equal(ours, plain), f"\nplain {plain.tolist()}\nours  {ours.tolist()}"


# ---------------------------------------------------------------------------------------------- 1. EOS id sets
@pytest.mark.parametrize("num_eos", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_min_new_tokens_with_as_many_eos_ids_as_rows(pair, num_eos, seed):
    """Processor state is never guessed from shapes: a tensor of 2 EOS ids in a batch of 2 is not per-row."""
    target, draft = pair
    batch = left_padded_batch(96, [5, 3, 6][:num_eos], seed=seed)
    free = target.generate(**batch, do_sample=False, max_new_tokens=20)[:, 6:]
    eos = [int(free[row, 5]) for row in range(num_eos)]  # emitted at step 6, where min_new_tokens forbids EOS
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=20, min_new_tokens=12, eos_token_id=eos, pad_token_id=0)
        assert_exact(target, drafter, batch, max_new_tokens=20, min_length=14, eos_token_id=eos, pad_token_id=0,
                     exponential_decay_length_penalty=(4, 1.5))


# ---------------------------------------------------------------------------------------------- 2. batch index
def allowed_by_row(batch_id, prefix):
    """Row-dependent constraint that also depends on the prefix (its last token's parity)."""
    low, high = (3, 48) if batch_id % 2 == 0 else (48, 96)
    parity = int(prefix[-1]) % 2
    return [token for token in range(low, high) if token % 2 == parity] or list(range(low, high))


@pytest.mark.parametrize("lengths", [[5, 3], [4, 7, 2]])
def test_prefix_allowed_tokens_fn_gets_each_rows_batch_id(pair, lengths):
    target, draft = pair
    batch = left_padded_batch(96, lengths, seed=1)
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=12, prefix_allowed_tokens_fn=allowed_by_row)


def test_prefix_allowed_tokens_fn_with_num_return_sequences_matches_plain(pair):
    """transformers' meaning of batch_id with num_return_sequences changed in 5.25; we follow the installed one."""
    target, draft = pair
    batch = left_padded_batch(96, [5, 3], seed=2)
    kwargs = dict(max_new_tokens=8, prefix_allowed_tokens_fn=allowed_by_row, num_return_sequences=2,
                  do_sample=True, top_k=1)  # top_k=1: sampling that is deterministic, so outputs compare
    plain = target.generate(**batch, **kwargs)
    ours = target.generate(**batch, assistant_model=ModelDrafter(draft, num_draft_tokens=3), **kwargs)
    assert torch.equal(ours, plain)


class RowTagProcessor(LogitsProcessor):
    """A user processor that reads its rows' batch positions and prefixes: bans token (10 + row + prefix length % 7)."""

    def __call__(self, input_ids, scores):
        rows = torch.arange(input_ids.shape[0])
        banned = 10 + rows + input_ids.shape[1] % 7
        scores = scores.clone()
        scores[rows, banned] = -float("inf")
        return scores


def test_user_processor_sees_rows_in_batch_order(pair):
    target, draft = pair
    batch = left_padded_batch(96, [7, 3, 9, 5], seed=3)
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=14, logits_processor=LogitsProcessorList([RowTagProcessor()]),
                     repetition_penalty=1.3)


# ---------------------------------------------------------------------------------------------- 3. stateful processors
@pytest.mark.parametrize("options,argument", [
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(guidance_scale=2.0, negative_prompt_ids=torch.tensor([[4, 5]])), "guidance_scale"),
])
def test_classifier_free_guidance_is_refused_by_name(pair, options, argument):
    target, draft = pair
    with pytest.raises(ValueError, match=argument):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=4, assistant_model=ModelDrafter(draft), **options)


def test_synthid_watermarking_is_refused_and_kirchenbauer_is_exact(pair):
    from transformers import SynthIDTextWatermarkingConfig, WatermarkingConfig

    target, draft = pair
    synthid = SynthIDTextWatermarkingConfig(keys=[5, 9, 13], ngram_len=3)
    with pytest.raises(ValueError, match="watermarking_config"):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=4, assistant_model=ModelDrafter(draft),
                        watermarking_config=synthid, do_sample=True)
    batch = left_padded_batch(96, [6, 4], seed=4)
    assert_exact(target, ModelDrafter(draft, num_draft_tokens=4), batch, max_new_tokens=12,
                 watermarking_config=WatermarkingConfig(bias=4.0, context_width=2))


def test_every_transformers_processor_has_a_rule():
    from transformers.generation import logits_process

    shipped = {name for name, value in vars(logits_process).items()
               if isinstance(value, type) and issubclass(value, logits_process.LogitsProcessor)
               and value is not logits_process.LogitsProcessor}
    assert shipped <= set(PROCESSOR_RULES), f"no rule for {sorted(shipped - set(PROCESSOR_RULES))}"
    assert rule_for(RowTagProcessor()).how is How.BATCH


# ---------------------------------------------------------------------------------------------- 4. model inputs
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=32, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64, projection_dim=32)
    torch.manual_seed(0)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=95, projector_hidden_act="gelu",
                         vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def test_vlm_images_are_refused_and_text_only_is_exact():
    model = tiny_llava()
    input_ids = torch.tensor([[5, 95, 95, 95, 95, 7, 8]])
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(input_ids=input_ids, pixel_values=torch.randn(1, 3, 16, 16), max_new_tokens=4,
                       assistant_model=NGramDrafter())
    plain = model.generate(input_ids=input_ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(input_ids=input_ids, max_new_tokens=8, do_sample=False,
                                      assistant_model=NGramDrafter()), plain)


@pytest.mark.parametrize("options,name", [
    (dict(token_type_ids=torch.zeros(1, 5, dtype=torch.long)), "token_type_ids"),
    (dict(assistant_tokenizer=object(), tokenizer=object()), "assistant_tokenizer"),
    (dict(synced_gpus=True), "synced_gpus"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    (dict(assistant_early_exit=1), "assistant_early_exit"),
    (dict(assistant_ensemble_weight=0.5), "assistant_ensemble_weight"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
    (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states"),
    (dict(cache_implementation="static"), "cache_implementation"),
    (dict(position_ids=torch.tensor([[3, 4, 5, 6, 7]])), "position_ids"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_unused_inputs_and_options_are_refused_by_name(pair, options, name):
    target, draft = pair
    with pytest.raises(ValueError, match=name):
        target.generate(**left_padded_batch(96, [5]), max_new_tokens=4, assistant_model=ModelDrafter(draft), **options)


def test_inputs_embeds_are_refused(pair):
    target, draft = pair
    embeds = target.get_input_embeddings()(torch.tensor([[4, 5, 6]]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        target.generate(inputs_embeds=embeds, max_new_tokens=3, assistant_model=ModelDrafter(draft))


def test_prepared_position_ids_and_a_fresh_cache_are_accepted(pair):
    from transformers import DynamicCache

    from hf_specdec.compat import cache_argument

    target, draft = pair
    batch = left_padded_batch(96, [5, 3], seed=5)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert_exact(target, ModelDrafter(draft), batch, max_new_tokens=6, position_ids=positions)
    ours = target.generate(**batch, max_new_tokens=6, do_sample=False, assistant_model=ModelDrafter(draft),
                           **{cache_argument(target): DynamicCache(config=target.config)})
    assert torch.equal(ours, target.generate(**batch, max_new_tokens=6, do_sample=False))


# ---------------------------------------------------------------------------------------------- 5. stop strings
def test_stop_strings_with_a_tokenizer(pair):
    target, draft = pair
    tokenizer = character_tokenizer(96)
    batch = left_padded_batch(96, [6, 4, 8], seed=6)
    free = target.generate(**batch, do_sample=False, max_new_tokens=20)
    # a two-character string that row 1 emits mid-way, and one no row emits
    text = tokenizer.decode(free[1, 8 + 6: 8 + 8])
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=20, stop_strings=[text, "never!"], tokenizer=tokenizer,
                     pad_token_id=0)
    with pytest.raises(ValueError, match="tokenizer"):
        target.generate(**batch, max_new_tokens=4, stop_strings=[text], assistant_model=ModelDrafter(draft))


# ---------------------------------------------------------------------------------------------- 6. streamers + criteria
class StopAfterToken(StoppingCriteria):
    """Stops a row after `token`; with output_scores it also insists on seeing the scores, as plain gives them."""

    def __init__(self, token, needs_scores=False):
        self.token, self.needs_scores, self.seen = token, needs_scores, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.needs_scores:
            assert isinstance(scores, tuple) and scores[-1].shape == (input_ids.shape[0], 96)
            assert len(scores) == input_ids.shape[1] - self.prompt_width
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("needs_scores", [False, True])
def test_streamer_and_stopping_criterion_stream_exactly_what_is_returned(pair, needs_scores):
    target, draft = pair
    prompt = left_padded_batch(96, [6], seed=5)
    free = target.generate(**prompt, max_new_tokens=15, do_sample=False)
    criterion = StopAfterToken(int(free[0, 6 + 4]), needs_scores)
    criterion.prompt_width = 6
    extra = dict(return_dict_in_generate=True, output_scores=True) if needs_scores else {}
    outputs = {}
    for name, drafter in (("plain", None), ("ours", ModelDrafter(draft, num_draft_tokens=5))):
        streamer = RecordingStreamer()
        out = target.generate(**prompt, max_new_tokens=15, do_sample=False, streamer=streamer, assistant_model=drafter,
                              stopping_criteria=StoppingCriteriaList([criterion]), **extra)
        sequences = out.sequences if needs_scores else out
        outputs[name] = (streamer.tokens(), sequences[0, 6:].tolist())
        assert streamer.ended and streamer.tokens() == sequences[0, 6:].tolist()
    assert outputs["ours"] == outputs["plain"]


def test_stopping_criterion_reading_batch_rows_matches_plain(pair):
    """A criterion is called with the whole batch, row b always being row b, as in plain generate()."""

    class StopRowAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            rows = torch.arange(input_ids.shape[0])
            return input_ids.shape[1] >= 12 + 2 * rows

    target, draft = pair
    batch = left_padded_batch(96, [6, 4, 8], seed=7)
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=16, pad_token_id=0,
                     stopping_criteria=StoppingCriteriaList([StopRowAtLength()]))


# ---------------------------------------------------------------------------------------------- 8. positional arguments
def test_positional_arguments_like_transformers(pair):
    target, draft = pair
    prompt = left_padded_batch(96, [6], seed=8)["input_ids"]
    plain = target.generate(prompt, max_new_tokens=6, do_sample=False)
    # (inputs, generation_config, logits_processor, stopping_criteria, prefix_allowed_tokens_fn, synced_gpus,
    #  assistant_model, streamer): a plain transformers assistant, then an hf_specdec drafter
    assert torch.equal(target.generate(prompt, None, None, None, None, None, draft, max_new_tokens=6), plain)
    streamer = RecordingStreamer()
    ours = target.generate(prompt, None, None, None, None, None, ModelDrafter(draft), streamer, max_new_tokens=6)
    assert torch.equal(ours, plain) and streamer.tokens() == plain[0, 6:].tolist()


def test_prefill_chunk_size_is_honoured(pair):
    target, draft = pair
    batch = left_padded_batch(96, [9, 4, 7], seed=9)
    for drafter in drafters(draft):
        assert_exact(target, drafter, batch, max_new_tokens=10, prefill_chunk_size=3)


# ---------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_greedy_differs_only_at_float_ties(dtype):
    """In half precision a multi-token verify forward may round a near-tie the other way; any difference from
    plain greedy must start where plain's top-two logits are within the dtype's rounding (the suite's `tie`)."""
    from hf_specdec.bench.suite import TIE_TOLERANCE

    target = tiny_model("llama", seed=3, dtype=dtype)
    draft = perturbed_copy(target, noise=0.1)
    for seed in range(4):
        batch = left_padded_batch(96, [7, 3, 9], seed=seed)
        plain = target.generate(**batch, do_sample=False, max_new_tokens=16)
        ours = target.generate(**batch, do_sample=False, max_new_tokens=16, assistant_model=ModelDrafter(draft))
        for row in range(len(plain)):
            differ = (plain[row] != ours[row]).nonzero()
            if not len(differ):
                continue
            position = int(differ[0])
            context = plain[row, :position][batch["attention_mask"][row, :position].bool()][None]
            with torch.no_grad():
                logits = target(context).logits[0, -1].float()
            margin = float(logits[plain[row, position]] - logits[ours[row, position]])
            assert abs(margin) <= TIE_TOLERANCE[dtype] * max(1.0, float(logits.abs().max())), (seed, row, margin)
