"""What speculative decoding does with each generate() option: honoured exactly, or refused by name.

generate() has already turned most options into logits processors (`processors.py` decides how each is applied),
stopping criteria, lengths and special tokens before the engine runs. What is left is checked here, so that an
option the engine does not implement is refused with what to do instead — never silently dropped.
"""

from __future__ import annotations

import torch

from .compat import option_is_set, passed_cache, plain_generation_mode
from .processors import check_processors

# Options the engine (or generate()'s preparation before it) implements exactly.
HONOURED = frozenset({
    # lengths, stopping, special tokens
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings", "eos_token_id",
    "pad_token_id", "bos_token_id", "decoder_start_token_id", "num_return_sequences", "token_healing",
    # decoding and the logits processors generate() builds from them
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "top_h", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias",
    "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "watermarking_config",
    "guidance_scale", "encoder_repetition_penalty", "encoder_no_repeat_ngram_size",
    # outputs
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    # the cache: hf_specdec runs its own (see `check_generate_options`)
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size",
    # the draft length (read by the integration before generate() fills in its default)
    "num_assistant_tokens",
    # bookkeeping and options that greedy / sampling ignore in plain generate() too
    "transformers_version", "is_assistant", "length_penalty", "early_stopping", "low_memory", "compile_config",
    "disable_compile", "continuous_batching_config",
})

# Options that would change what plain generate() computes in a way speculation cannot reproduce, or that
# configure transformers' own drafters.
REFUSED = {
    "assistant_ensemble_weight": "mixes draft and target distributions, which is lossy by design",
    "prompt_lookup_num_tokens": "selects transformers' own prompt-lookup drafter; pass "
                                "`assistant_model=hf_specdec.NGramDrafter(num_draft_tokens=...)` instead",
    "max_matching_ngram_size": "configures transformers' prompt-lookup drafter; use `NGramDrafter(max_ngram=...)`",
    "assistant_early_exit": "selects transformers' early-exit drafter; use `SortedDrafter.from_target(target, "
                            "exits=[...])`",
    "use_mtp": "selects the model's multi-token-prediction drafter, which hf_specdec does not run",
    "speculation_type": "selects a transformers drafter type; pass an hf_specdec drafter as `assistant_model`",
    "num_assistant_tokens_schedule": "configures transformers' own assistant; use the drafter's `schedule=`",
    "assistant_confidence_threshold": "configures transformers' own assistant; hf_specdec drafters do not read it",
    "assistant_lookbehind": "configures transformers' different-tokenizer assistant",
    "target_lookbehind": "configures transformers' different-tokenizer assistant",
    "penalty_alpha": "selects contrastive search",
    "dola_layers": "selects DoLa decoding",
    "constraints": "selects constrained beam search",
    "force_words_ids": "selects constrained beam search",
    "num_beam_groups": "selects group beam search",
    "diversity_penalty": "selects group beam search",
}

# Model inputs generate() prepares for the decoding loop that the engine uses (or that do not change the output).
MODEL_INPUTS = frozenset({"attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache",
                          "past_key_values", "output_attentions", "output_hidden_states"})

SPECULATIVE_MODES = ("greedy_search", "sample")


def check_generate_options(config, model_kwargs: dict, processors, input_ids: torch.Tensor) -> None:
    """Raise a ValueError naming the first generate() option the engine cannot honour exactly."""
    for name in sorted(vars(config)):
        if name.startswith("_") or not option_is_set(config, name):
            continue
        if name in REFUSED:
            raise ValueError(f"`{name}` cannot be used with an hf_specdec drafter: it {REFUSED[name]}.")
        if name not in HONOURED:
            raise ValueError(f"hf_specdec does not know the generation option `{name}` (newer than this "
                             "release?), so it cannot promise plain generate()'s output; drop it, or generate "
                             "without a drafter.")
    mode = plain_generation_mode(config)
    if mode not in SPECULATIVE_MODES:
        hint = "set num_beams=1 (greedy or sampling)" if "beam" in mode else "use greedy decoding or sampling"
        raise ValueError(f"A drafter speeds up greedy decoding and sampling; these options select {mode}: {hint}.")
    if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
        raise ValueError("output_attentions / output_hidden_states are not returned with a drafter (each verify "
                         "forward covers many positions); drop them, or generate without a drafter.")
    unused = [_input_name(name, value) for name, value in sorted(model_kwargs.items())
              if name not in MODEL_INPUTS and _carries(value)]
    if unused:
        raise ValueError(f"hf_specdec feeds the target token ids only, so {', '.join(unused)} would be ignored. "
                         "Generate without a drafter for such inputs.")
    _check_cache(config, model_kwargs)
    _check_position_ids(model_kwargs, input_ids)
    check_processors(processors)


def _carries(value) -> bool:
    """generate() leaves empty placeholders (a VLM's `mm_encoder_outputs={}` without images): those carry nothing."""
    return value is not None and not (isinstance(value, (dict, list, tuple)) and not value)


def _input_name(name: str, value) -> str:
    """How the user called a model input: generate() encodes a VLM's `pixel_values` into `mm_encoder_outputs`."""
    if name == "mm_encoder_outputs" and isinstance(value, dict):
        return f"the {' and '.join(sorted(value))} inputs (`pixel_values`, ...)"
    return f"`{name}`"


def _check_cache(config, model_kwargs) -> None:
    if config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"hf_specdec manages its own KV cache; drop `cache_implementation="
                         f"{config.cache_implementation!r}` (and any cache object) from the generate() call.")
    cache = passed_cache(model_kwargs)
    if cache is None:
        return
    if type(cache).__name__ != "DynamicCache":
        raise ValueError(f"hf_specdec manages its own KV cache; drop the {type(cache).__name__} from the generate() "
                         "call.")
    length = cache.get_seq_length()
    if int(length) > 0:
        raise ValueError("hf_specdec cannot continue from a pre-filled cache; pass the full prompt instead.")


def _check_position_ids(model_kwargs, input_ids) -> None:
    """Positions are recomputed from the attention mask; refuse any others a user passed."""
    position_ids = model_kwargs.get("position_ids")
    if position_ids is None:
        return
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    expected = (mask.long().cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    if position_ids.shape != input_ids.shape or not torch.equal(position_ids.to(expected.device)[real], expected[real]):
        raise ValueError("hf_specdec numbers positions from the attention mask (0 at each row's first real "
                         "token); custom `position_ids` are not supported with a drafter.")
