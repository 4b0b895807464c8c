"""Reproducible models and prompts for tests and benchmarks, built from configs (nothing is downloaded).

* `tiny_causal_lm` — a small random `*ForCausalLM` (Llama, Qwen2, Qwen3, Mistral, GPT-2) for unit tests.
* `build_synthetic_pair` — a target big enough to be worth speeding up on a CPU and a draft that agrees with
  it at a chosen greedy rate. See its docstring for what the pair is and is not.
* `synthetic_prompts` — left-padded batches of random token ids with uneven lengths (tokenizer-free).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}

# Special tokens shared by every model built here, so that prompts can avoid them and pairs share a vocabulary.
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
FIRST_ORDINARY_TOKEN_ID = 3


# --------------------------------------------------------------------------------------------------------------
# Tiny models for unit tests
# --------------------------------------------------------------------------------------------------------------


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 128,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    **overrides,
) -> PretrainedConfig:
    """The config `tiny_causal_lm` builds from; `overrides` use the architecture's own field names."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    config_class, _ = ARCHITECTURES[arch]
    special_tokens = dict(pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    if arch == "gpt2":  # GPT-2 has no GQA and its own field names
        fields = dict(
            vocab_size=vocab_size, n_layer=num_layers, n_embd=hidden_size, n_head=num_heads,
            n_inner=intermediate_size, n_positions=max_position_embeddings,
        )
    else:
        fields = dict(
            vocab_size=vocab_size, num_hidden_layers=num_layers, hidden_size=hidden_size,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
        )
        if arch == "qwen3":  # Qwen3 defaults to head_dim=128 regardless of hidden_size
            fields["head_dim"] = hidden_size // num_heads
    return config_class(**{**fields, **special_tokens, **overrides})


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    **overrides,
) -> PreTrainedModel:
    """A small random causal LM in eval mode; its config (`model.config`) comes from `tiny_config`.

    The same arguments give the same weights, and the global RNG is left untouched. Two models with the same
    `vocab_size` (and different `seed`/`num_layers`) make a target/draft pair for tests.
    Special tokens: pad=0, bos=1, eos=2 (pass `eos_token_id=None` to generate to the length limit).
    """
    config = tiny_config(arch, vocab_size=vocab_size, num_layers=num_layers, **overrides)
    _, model_class = ARCHITECTURES[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    _set_generation_special_tokens(model)
    return model.to(device).eval()


def _set_generation_special_tokens(model: PreTrainedModel) -> None:
    # generate() reads these from generation_config; keep them in sync with the model config.
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(model.config, name))


# --------------------------------------------------------------------------------------------------------------
# Synthetic target/draft pair for benchmarks
# --------------------------------------------------------------------------------------------------------------

# The default target: ~206M parameters (16 Llama layers of width 1024 with GQA, 8k vocabulary), about 80 ms per
# decoding step on a 2-core CPU in float32. The one-layer draft costs ~0.1 of a target step.
DEFAULT_PAIR_SHAPE = dict(
    hidden_size=1024, num_layers=16, draft_layers=1, vocab_size=8192, intermediate_size=2816, num_heads=16,
    num_kv_heads=8,
)
# Synthetic pairs by name: the default (compute-bound on a CPU) and one where a forward costs about as much as the
# loop around it (a 3-layer width-64 target and its first layer), the regime of a GPU at batch 1.
PAIR_SHAPES = {
    "default": DEFAULT_PAIR_SHAPE,
    "overhead": dict(hidden_size=64, num_layers=3, draft_layers=1, vocab_size=1024, intermediate_size=128,
                     num_heads=4, num_kv_heads=2),
}
# Random init gives near-uniform logits (std ~0.5) and a residual stream that forgets the current token. Large
# embeddings keep the current token in the stream (greedy text is not one repeated token) and a large LM head
# gives peaked next-token distributions (top-1 typically 0.3-0.9), so sampling acceptance means something.
EMBEDDING_STD = 1.0
LOGIT_STD = 6.0

_SCALE_CACHE: dict[str, float] = {}
CALIBRATION_NEW_TOKENS = 16
CALIBRATION_TOLERANCE = 0.1  # in logit units: about +-0.01 at agreement 0.9, +-0.025 at 0.6


def build_synthetic_pair(
    agreement: float = 0.9,
    seed: int = 0,
    hidden_size: int = DEFAULT_PAIR_SHAPE["hidden_size"],
    num_layers: int = DEFAULT_PAIR_SHAPE["num_layers"],
    draft_layers: int = DEFAULT_PAIR_SHAPE["draft_layers"],
    vocab_size: int = DEFAULT_PAIR_SHAPE["vocab_size"],
    intermediate_size: int = DEFAULT_PAIR_SHAPE["intermediate_size"],
    num_heads: int = DEFAULT_PAIR_SHAPE["num_heads"],
    num_kv_heads: int = DEFAULT_PAIR_SHAPE["num_kv_heads"],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    calibration_prompts: int = 16,
    calibration_steps: int = 6,
    cache_dir: str | os.PathLike | None = "default",
) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random Llama target and a draft that agrees with its greedy choice at about `agreement`.

    How it is built: the draft is the target's first `draft_layers` decoder layers plus the target's embedding,
    final norm and LM head — the very same modules, not copies — wrapped in its own `LlamaForCausalLM`, so it is
    an ordinary `PreTrainedModel` (transformers' assisted generation can use it too). The target's later layers
    write into the residual stream through `o_proj` and `down_proj`; both are multiplied by one factor. At 0 the
    target equals the draft (agreement 1); the larger the factor, the more the later layers change the target's
    argmax. The factor is found by bisection so that the draft's greedy next token equals the target's on
    `agreement` of the positions of the target's own greedy continuations of random prompts; it is cached per
    (shape, agreement, seed) in memory and on disk (`cache_dir`; None disables the disk cache; default
    `$HF_SPECDEC_CACHE` or `~/.cache/hf_specdec`).

    What it is not: a language model. Weights are random, prompts are random token ids, agreement is synthetic and
    roughly uniform over positions (real drafts agree more on easy tokens). Use it to measure the speed of the
    machinery — cost ratio, acceptance, loop overhead — not the quality of a drafting method. The measured
    acceptance rate of a run differs from `agreement` by sampling noise and by the prompts it sees.
    Special tokens: pad=0, bos=1; `eos_token_id` is None so that every run generates to its length limit.
    """
    if not 0.0 < agreement <= 1.0:
        raise ValueError(f"agreement must be in (0, 1], got {agreement}.")
    if not 0 < draft_layers < num_layers:
        raise ValueError(f"Need 0 < draft_layers < num_layers, got draft_layers={draft_layers}, num_layers={num_layers}.")
    shape = dict(
        hidden_size=hidden_size, num_layers=num_layers, draft_layers=draft_layers, vocab_size=vocab_size,
        intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
    )
    target = _random_target(seed=seed, dtype=dtype, device=device, **shape)
    draft = _draft_from_target_layers(target, draft_layers)
    later_layers = target.model.layers[draft_layers:]

    cache_key = _scale_cache_key(agreement=agreement, seed=seed, dtype=str(dtype), prompts=calibration_prompts,
                                 steps=calibration_steps, **shape)
    scale = _cached_scale(cache_key, cache_dir)
    if scale is None:
        scale = _calibrate_residual_scale(target, draft, later_layers, agreement, calibration_prompts,
                                          calibration_steps, seed)
        _store_scale(cache_key, scale, cache_dir)
    _scale_residual_writes(later_layers, scale)
    target.synthetic_pair_info = draft.synthetic_pair_info = dict(agreement=agreement, residual_scale=scale, seed=seed)
    return target, draft


def _random_target(seed, dtype, device, hidden_size, num_layers, draft_layers, vocab_size, intermediate_size,
                   num_heads, num_kv_heads) -> LlamaForCausalLM:
    target = tiny_causal_lm(
        "llama", vocab_size=vocab_size, num_layers=num_layers, seed=seed, hidden_size=hidden_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=4096, eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        target.model.embed_tokens.weight.normal_(0.0, EMBEDDING_STD)
        # The final RMSNorm makes hidden states ~unit RMS, so logit std ~= weight std * sqrt(hidden_size).
        target.lm_head.weight.normal_(0.0, LOGIT_STD / hidden_size**0.5)
    return target.to(device=device, dtype=dtype)


def _draft_from_target_layers(target: LlamaForCausalLM, draft_layers: int) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` whose modules are the target's embedding, first layers, final norm and LM head."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = draft_layers
    with torch.device("meta"):  # every parameter is replaced by a target module below: allocate nothing
        draft = LlamaForCausalLM._from_config(config, attn_implementation=target.config._attn_implementation)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(target.model.layers[:draft_layers])
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    _set_generation_special_tokens(draft)
    return draft.eval()


def _residual_writes(layers: nn.ModuleList) -> list[nn.Linear]:
    return [proj for layer in layers for proj in (layer.self_attn.o_proj, layer.mlp.down_proj)]


def _scale_residual_writes(layers: nn.ModuleList, scale: float) -> None:
    with torch.no_grad():
        for proj in _residual_writes(layers):
            proj.weight.mul_(scale)


@torch.no_grad()
def _calibrate_residual_scale(target, draft, later_layers, agreement, num_prompts, steps, seed) -> float:
    """Find the later layers' residual scale at which greedy agreement ~= `agreement`.

    Agreement falls smoothly from 1 to 0 as the scale grows and is close to linear in (log scale, logit
    agreement), so regula falsi (Illinois variant) in those coordinates needs only a handful of measurements —
    each one is a short greedy generation of the target, the expensive part.
    """
    if agreement >= 1.0:
        return 0.0
    original = [proj.weight.clone() for proj in _residual_writes(later_layers)]
    resolution = 1.0 / (num_prompts * CALIBRATION_NEW_TOKENS)

    def error_at(log_scale: float) -> float:  # > 0 while the draft still agrees too often
        for proj, weight in zip(_residual_writes(later_layers), original):
            proj.weight.copy_(weight * math.exp(log_scale))
        measured = measure_greedy_agreement(target, draft, num_prompts=num_prompts,
                                            new_tokens=CALIBRATION_NEW_TOKENS, seed=seed)
        return _logit(measured, resolution) - _logit(agreement, resolution)

    low, high = math.log(1 / 32), 0.0  # bracket: the root lies between a low and a high scale
    error_low, error_high = error_at(low), error_at(high)
    while error_low < 0 and low > math.log(1e-6):
        low, high, error_high = low - math.log(4), low, error_low
        error_low = error_at(low)
    while error_high > 0 and high < math.log(1e4):
        low, high, error_low = high, high + math.log(4), error_high
        error_high = error_at(high)
    best_log_scale, best_error = min(((low, error_low), (high, error_high)), key=lambda pair: abs(pair[1]))
    stale_side = None
    for _ in range(steps):
        if abs(best_error) < CALIBRATION_TOLERANCE:
            break
        middle = (low * error_high - high * error_low) / (error_high - error_low)
        error_middle = error_at(middle)
        if abs(error_middle) < abs(best_error):
            best_log_scale, best_error = middle, error_middle
        if error_middle > 0:  # Illinois: halve the weight of an endpoint that survives twice in a row
            low, error_low = middle, error_middle
            if stale_side == "high":
                error_high /= 2
            stale_side = "high"
        else:
            high, error_high = middle, error_middle
            if stale_side == "low":
                error_low /= 2
            stale_side = "low"
    for proj, weight in zip(_residual_writes(later_layers), original):
        proj.weight.copy_(weight)  # leave the weights unscaled; the caller applies the chosen factor
    return math.exp(best_log_scale)


def _logit(probability: float, resolution: float) -> float:
    probability = min(max(probability, resolution / 2), 1 - resolution / 2)
    return math.log(probability / (1 - probability))


@torch.no_grad()
def measure_greedy_agreement(target, draft, num_prompts: int = 16, prompt_length: int = 8, new_tokens: int = 16,
                             seed: int = 0) -> float:
    """Share of positions where the draft's argmax equals the target's greedy token, on the target's own greedy
    continuations of random prompts (the contexts the draft sees during greedy speculative decoding)."""
    device = target.device
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(FIRST_ORDINARY_TOKEN_ID, target.config.vocab_size, (num_prompts, prompt_length),
                            generator=generator).to(device)
    sequences = target.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                pad_token_id=PAD_TOKEN_ID)
    draft_logits = draft(sequences[:, :-1], logits_to_keep=new_tokens).logits
    return (draft_logits.argmax(-1) == sequences[:, -new_tokens:]).float().mean().item()


def _scale_cache_key(**fields) -> str:
    import transformers

    fields.update(torch=torch.__version__, transformers=transformers.__version__, version=2)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _scale_cache_file(cache_dir) -> Path | None:
    if cache_dir is None:
        return None
    if cache_dir == "default":
        cache_dir = os.environ.get("HF_SPECDEC_CACHE", Path.home() / ".cache" / "hf_specdec")
    return Path(cache_dir) / "synthetic_pair_scales.json"


def _cached_scale(key: str, cache_dir) -> float | None:
    if key in _SCALE_CACHE:
        return _SCALE_CACHE[key]
    path = _scale_cache_file(cache_dir)
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text()).get(key)
        except (OSError, json.JSONDecodeError):
            return None  # a corrupt cache only costs a recalibration
    return None


def _store_scale(key: str, scale: float, cache_dir) -> None:
    _SCALE_CACHE[key] = scale
    path = _scale_cache_file(cache_dir)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[key] = scale
        path.write_text(json.dumps(stored, indent=1, sort_keys=True))
    except (OSError, json.JSONDecodeError):
        pass  # the disk cache is an optimisation; never fail a build over it


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def synthetic_prompts(
    num_prompts: int = 8,
    batch_size: int = 1,
    vocab_size: int = 128,
    min_length: int = 8,
    max_length: int = 32,
    seed: int = 0,
    pad_token_id: int = PAD_TOKEN_ID,
    device: str | torch.device = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """Reproducible batches `{"input_ids", "attention_mask"}` of random ordinary tokens, left-padded.

    Lengths are spread evenly over [min_length, max_length] and shuffled, so a batch of several prompts has
    uneven lengths. The same `seed` and `num_prompts` give the same prompts for every `batch_size`, so batched
    and unbatched runs see the same text (the last batch may be smaller).
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_length, max_length, num_prompts).round().long()
    lengths = lengths[torch.randperm(num_prompts, generator=generator)]
    prompts = [torch.randint(FIRST_ORDINARY_TOKEN_ID, vocab_size, (int(n),), generator=generator) for n in lengths]
    return [_left_pad(prompts[i : i + batch_size], pad_token_id, device) for i in range(0, num_prompts, batch_size)]


def _left_pad(prompts: list[torch.Tensor], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


class SyntheticTokenizer:
    """Text ⇄ token ids for the synthetic pair, which has no tokenizer: one token per UTF-8 byte.

    Byte b is token `FIRST_ORDINARY_TOKEN_ID + b`, so category prompts keep their lengths and repetitions (what
    n-gram drafting and long-context costs depend on). The synthetic target emits ids from its whole vocabulary;
    `decode` writes ids outside the byte range as `⟨id⟩`, so its output is visible but not prose.
    """

    pad_token_id, bos_token_id, eos_token_id = PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID
    chat_template = None

    def __init__(self, vocab_size: int = DEFAULT_PAIR_SHAPE["vocab_size"]):
        if vocab_size < FIRST_ORDINARY_TOKEN_ID + 256:
            raise ValueError(f"A byte tokenizer needs vocab_size >= {FIRST_ORDINARY_TOKEN_ID + 256}, got {vocab_size}.")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [FIRST_ORDINARY_TOKEN_ID + byte for byte in text.encode("utf-8")]

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        pieces, pending = [], bytearray()
        for token in ids:
            byte = token - FIRST_ORDINARY_TOKEN_ID
            if 0 <= byte < 256:
                pending.append(byte)
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if not (skip_special_tokens and token < FIRST_ORDINARY_TOKEN_ID):
                pieces.append(f"⟨{token}⟩")
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


def character_tokenizer(vocab_size: int = 96):
    """A real `PreTrainedTokenizerFast` (so stop strings, chat-free decoding and `StopStringCriteria` work) for the
    tiny test models: ids 0/1/2 are pad/BOS/EOS, every other id is one printable character."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    characters = alphabet[: vocab_size - FIRST_ORDINARY_TOKEN_ID]
    if len(characters) != vocab_size - FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"character_tokenizer covers at most {len(alphabet) + FIRST_ORDINARY_TOKEN_ID} ids.")
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    vocab.update({character: FIRST_ORDINARY_TOKEN_ID + index for index, character in enumerate(characters)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")
