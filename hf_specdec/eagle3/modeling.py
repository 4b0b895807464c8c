"""Eagle3DraftModel: an EAGLE-3 head (one decoder layer over the target's own hidden states).

One draft step, for a token x at position t (the EAGLE-3 paper; vLLM `llama_eagle3.py`; speculators `eagle3`):

    g      = fc(cat(target hidden_states[k] at t for k in aux_hidden_state_layer_ids))   (first step of a round)
           = the previous step's output state                                          (later steps)
    e      = input_layernorm(embed(x)),      g' = hidden_norm(g)
    h      = (g' if norm_before_residual else g) + o_proj(attention(q, k, v of cat([e, g'])))    (width 2H → H)
    out    = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(out)) over the draft vocabulary;  the next step reads `out` (`norm(out)` if norm_output)

The feature at position t pairs with the embedding of the token at t + 1: the pair predicts the token at t + 2.
Draft ids map to target ids by `target = d + d2t[d]`; `t2d` marks the target ids the draft vocabulary has.

The embedding is the target's (`attach_target(target)` shares it, frozen); checkpoints may hold a copy. Everything
a checkpoint format decides (key names, config layout, layer-id convention) lives in `formats.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb


class Eagle3Config(PretrainedConfig):
    """Configuration of an `Eagle3DraftModel`.

    Args:
        transformer_layer_config: the decoder layer's shape (a `LlamaConfig` or its dict): hidden size, heads,
            MLP, RoPE, norm epsilon; its `vocab_size` is the target's vocabulary (the embedding's rows).
        draft_vocab_size: rows of `lm_head` (a subset of the target's vocabulary, mapped back by `d2t`).
        target_hidden_size: hidden size of the target's states (default: the layer's hidden size).
        aux_hidden_state_layer_ids: indices into the target's `output_hidden_states` (0 = embeddings, k = output
            of decoder layer k - 1; vLLM and speculators' convention), low to high. Default (2, L // 2, L - 3).
        norm_before_residual: the residual around attention is `hidden_norm(g)` instead of `g`.
        norm_before_fc: one RMSNorm over the concatenated target states before `fc`.
        fc_norm: one RMSNorm per target state before `fc` (speculators' `fc_norm`).
        norm_output: later steps read `norm(out)` instead of `out` ("EAGLE 3.1").
        verifier_name_or_path: the target the head was trained for (informational; exports name it).
        draft_length: the draft depth the head was trained for (Eagle3Trainer's `ttt_steps`); exports propose it.
    """

    model_type = "hf_specdec_eagle3"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "transformer_layer_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")
    }

    transformer_layer_config: dict | PretrainedConfig | None = None
    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    aux_hidden_state_layer_ids: list[int] | None = None
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    verifier_name_or_path: str | None = None
    draft_length: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layer = self.transformer_layer_config
        if self.draft_vocab_size is None:
            self.draft_vocab_size = layer.vocab_size
        if not 0 < self.draft_vocab_size <= layer.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be in [1, vocab_size={layer.vocab_size}] "
                             "(the draft vocabulary is a subset of the target's).")
        if self.target_hidden_size is None:
            self.target_hidden_size = layer.hidden_size
        if self.aux_hidden_state_layer_ids is not None:
            ids = list(self.aux_hidden_state_layer_ids)
            if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
                raise ValueError("aux_hidden_state_layer_ids must be a non-empty list of indices into the target's "
                                 f"hidden_states (>= 0), got {self.aux_hidden_state_layer_ids!r}.")
            self.aux_hidden_state_layer_ids = ids
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc and fc_norm are alternatives (one norm over the concatenation, or one "
                             "per target state); set at most one.")

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.transformer_layer_config

    @property
    def hidden_size(self) -> int:
        return self.transformer_layer_config.hidden_size

    @property
    def num_target_states(self) -> int:
        """How many target states `fc` fuses (3 when a checkpoint does not name its layers)."""
        return len(self.aux_hidden_state_layer_ids or [None] * 3)

    @property
    def vocab_size(self) -> int:
        return self.transformer_layer_config.vocab_size


def default_aux_layer_ids(num_hidden_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high target states as `hidden_states` indices: (2, L // 2, L - 3), the default of
    EAGLE, vLLM and speculators; for targets too shallow for three distinct ones, the states at 1/4, 1/2, 3/4."""
    ids = [2, num_hidden_layers // 2, num_hidden_layers - 3]
    if len(set(ids)) == 3 and ids == sorted(ids):
        return ids
    return sorted({max(1, round(num_hidden_layers * share)) for share in (0.25, 0.5, 0.75)})


@dataclass
class Eagle3Output(ModelOutput):
    """logits: [B, Q, draft_vocab_size]; hidden_states: [B, Q, H], what the next draft step reads."""

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    cache: object = None


class Eagle3Attention(nn.Module):
    """Grouped-query attention whose q/k/v read `[embedding ; state]` (2H wide); RoPE as the target's."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(2 * hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.model_type == "qwen3":  # Qwen3 layers normalise each head's queries and keys
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, position_embeddings, attention_mask, cache=None):
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        query, key = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(x).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, 0)
        if attention_mask is None and length > 1:  # causal, the queries being the last `length` keys
            attention_mask = torch.ones(length, key.shape[2], dtype=torch.bool, device=x.device).tril(
                key.shape[2] - length)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(output.transpose(1, 2).reshape(batch, length, -1))


class Eagle3Layer(nn.Module):
    """The head's one decoder layer (see the module docstring)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        layer = config.transformer_layer_config
        self.norm_before_residual = config.norm_before_residual
        self.input_layernorm = LlamaRMSNorm(layer.hidden_size, eps=layer.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(layer.hidden_size, eps=layer.rms_norm_eps)
        self.self_attn = Eagle3Attention(layer)
        self.post_attention_layernorm = LlamaRMSNorm(layer.hidden_size, eps=layer.rms_norm_eps)
        self.mlp = LlamaMLP(layer)

    def forward(self, embeds, hidden, position_embeddings, attention_mask, cache=None):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        attended = self.self_attn(torch.cat([self.input_layernorm(embeds), normed], dim=-1), position_embeddings,
                                  attention_mask, cache)
        hidden = residual + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3DraftModel(PreTrainedModel):
    """An EAGLE-3 head. `from_pretrained` reads speculators and native EAGLE-3 checkpoints (and writes them:
    `save_pretrained(dir, format="speculators" | "eagle3")`); `as_drafter()` drafts with it in `generate()`."""

    config_class = Eagle3Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules: ClassVar[list[str]] = ["Eagle3Layer"]

    def __init__(self, config: Eagle3Config):
        super().__init__(config)
        layer = config.transformer_layer_config
        hidden, target_hidden = layer.hidden_size, config.target_hidden_size
        num_states = config.num_target_states
        # The embedding is the target's (`attach_target`), held by reference, never registered: not saved, not
        # trained, not moved or cast with the head, and the head's dtype / device stay its own.
        object.__setattr__(self, "_target_embedding", None)
        if config.fc_norm:  # one norm per target state
            self.fc_norm = nn.ModuleList(LlamaRMSNorm(target_hidden, eps=layer.rms_norm_eps)
                                         for _ in range(num_states))
        if config.norm_before_fc:  # one norm over their concatenation
            self.input_norm = LlamaRMSNorm(num_states * target_hidden, eps=layer.rms_norm_eps)
        self.fc = nn.Linear(num_states * target_hidden, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = LlamaRMSNorm(hidden, eps=layer.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config=layer)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(layer.vocab_size, dtype=torch.bool)
                             if config.draft_vocab_size == layer.vocab_size else
                             torch.zeros(layer.vocab_size, dtype=torch.bool))
        self.generation_config = None  # not a generator itself (get_compiled_call reads this)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target_config: PretrainedConfig, draft_vocab: torch.Tensor | None = None,
                    aux_hidden_state_layer_ids: list[int] | None = None, intermediate_size: int | None = None,
                    **config_kwargs) -> Eagle3DraftModel:
        """A fresh head for a target: its layer shaped like one of the target's (heads, RoPE, norms), over the
        draft vocabulary `draft_vocab` (sorted target ids; None = the whole vocabulary)."""
        text = target_config.get_text_config()
        # attribute access: other families name these fields differently (attribute_map, e.g. GPT-2's n_embd)
        fields = {key: getattr(text, key) for key in _LAYER_KEYS if getattr(text, key, None) is not None}
        fields["tie_word_embeddings"] = False  # the head's LM head is its own
        fields["intermediate_size"] = (intermediate_size or getattr(text, "intermediate_size", None)
                                       or getattr(text, "n_inner", None) or 4 * text.hidden_size)
        layer = LlamaConfig(num_hidden_layers=1, **fields)
        ids = aux_hidden_state_layer_ids or default_aux_layer_ids(text.num_hidden_layers)
        check_layer_ids(ids, text.num_hidden_layers)
        config = Eagle3Config(
            transformer_layer_config=layer,
            draft_vocab_size=text.vocab_size if draft_vocab is None else len(draft_vocab),
            target_hidden_size=text.hidden_size, aux_hidden_state_layer_ids=list(ids),
            verifier_name_or_path=getattr(target_config, "_name_or_path", None) or None, **config_kwargs)
        model = cls(config)
        if draft_vocab is not None:
            model.set_draft_vocabulary(draft_vocab)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, device=None,
                        **kwargs) -> Eagle3DraftModel:
        """Load a head from a local folder or Hub id in the speculators or the native EAGLE-3 format (detected
        from its config.json, read as data: no remote code runs). `dtype` defaults to the saved one."""
        from .formats import load_eagle3

        if args:
            raise TypeError("Eagle3DraftModel.from_pretrained takes the path and keyword arguments only.")
        device = device if device is not None else kwargs.pop("device_map", None)
        return load_eagle3(pretrained_model_name_or_path, dtype=dtype or torch_dtype, device=device, **kwargs)

    def save_pretrained(self, save_directory, format: str = "speculators", save_embedding: bool = False,
                        **kwargs) -> None:
        """Write the head for the serving engines: `format="speculators"` (vLLM, speculators; what
        `from_pretrained` reads back) or `"eagle3"` (native: SGLang, SpecForge, EAGLE). The embedding is the
        target's and is left out unless `save_embedding=True`."""
        from .formats import save_eagle3

        save_eagle3(self, str(save_directory), format=format, save_embedding=save_embedding, **kwargs)

    def set_draft_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Draft id d ↔ target id `target_ids[d]` (sorted, distinct): fills `d2t` (offsets) and `t2d`."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).flatten()
        if len(target_ids) != self.config.draft_vocab_size or bool((target_ids.diff() <= 0).any()):
            raise ValueError(f"The draft vocabulary must be {self.config.draft_vocab_size} distinct target ids in "
                             "increasing order.")
        if int(target_ids[0]) < 0 or int(target_ids[-1]) >= self.config.vocab_size:
            raise ValueError(f"Draft vocabulary ids must lie in [0, {self.config.vocab_size}).")
        with torch.no_grad():
            self.d2t.copy_(target_ids - torch.arange(len(target_ids)))
            self.t2d.zero_()
            self.t2d[target_ids] = True

    def attach_target(self, target) -> None:
        """Embed tokens with the target's own input embedding (held by reference; see `__init__`)."""
        self.set_input_embeddings(target.get_input_embeddings())

    def as_drafter(self, **kwargs):
        """This head as an hf_specdec drafter for `generate(assistant_model=...)`."""
        from ..drafters.eagle3 import Eagle3Drafter

        return Eagle3Drafter(self, **kwargs)

    def get_input_embeddings(self):
        return self._target_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        expected = (self.config.vocab_size, self.config.hidden_size)
        shape = tuple(getattr(getattr(value, "weight", None), "shape", ()))
        if shape != expected:
            raise ValueError(f"The head embeds with its target's input embedding, of shape {expected} (target "
                             f"vocabulary × hidden size); got {shape or type(value).__name__}: this head was made "
                             "for another target.")
        object.__setattr__(self, "_target_embedding", value)

    def get_output_embeddings(self):
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, LlamaRMSNorm):
            module.weight.fill_(1.0)
        elif module is self:
            return
        else:
            super()._init_weights(module)

    # ------------------------------------------------------------------ vocabulary
    @property
    def draft_to_target(self) -> torch.Tensor:
        """[draft_vocab_size] the target id of every draft id."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def logits_in_target_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V_d] → target-vocabulary logits [..., V] (-inf where the head has no
        token: q = 0 there)."""
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target, logits)

    # ------------------------------------------------------------------ forward
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's states → the head's input state: `[..., n, H_t]` (stacked) or `[..., n·H_t]`
        (concatenated, low to high) → `[..., H]`."""
        num_states, target_hidden = self.config.num_target_states, self.config.target_hidden_size
        if features.shape[-1] == num_states * target_hidden:
            features = features.unflatten(-1, (num_states, target_hidden))
        if tuple(features.shape[-2:]) != (num_states, target_hidden):
            raise ValueError(f"EAGLE-3 features must be [..., {num_states}, {target_hidden}] or "
                             f"[..., {num_states * target_hidden}], got {tuple(features.shape)}.")
        features = features.to(self.fc.weight.dtype)
        if self.config.fc_norm:
            features = torch.stack([norm(features[..., i, :]) for i, norm in enumerate(self.fc_norm)], dim=-2)
        features = features.flatten(-2)
        if self.config.norm_before_fc:
            features = self.input_norm(features)
        return self.fc(features)

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor | None = None,
                features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, past_key_values=None, use_cache=None,
                logits_to_keep: int = 0, **kwargs) -> Eagle3Output:
        """One draft step for `input_ids` [B, Q] (the token after each state's position), reading either
        `features` (the target's states: `fuse` runs first) or `hidden_states` [B, Q, H] (a previous step's
        output). `attention_mask`: a 4D float/bool mask over the cache's keys (None: causal within the call);
        `cache`: any transformers `Cache` (its layer 0 is the head's)."""
        if (hidden_states is None) == (features is None):
            raise ValueError("Pass exactly one of `features` (target states) or `hidden_states` (a previous step's "
                             "output).")
        hidden = self.fuse(features) if features is not None else hidden_states.to(self.fc.weight.dtype)
        cache = cache if cache is not None else past_key_values
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(len(input_ids), -1)
        if self._target_embedding is None:
            raise ValueError("The EAGLE-3 head embeds tokens with its target's embedding: call "
                             "head.attach_target(target) first (generate() does it for you).")
        embeds = self._target_embedding(input_ids.to(self._target_embedding.weight.device)).to(hidden)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~attention_mask, torch.finfo(hidden.dtype).min)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        out = self.layers[0](embeds, hidden, position_embeddings, attention_mask, cache)
        kept = out[:, -logits_to_keep:] if logits_to_keep else out
        logits = self.lm_head(self.norm(kept))
        next_state = self.norm(out) if self.config.norm_output else out
        return Eagle3Output(logits=logits, hidden_states=next_state, cache=cache)


_LAYER_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id")


def check_layer_ids(ids, num_hidden_layers: int) -> None:
    bad = [i for i in ids if not 0 <= i <= num_hidden_layers]
    if bad:
        raise ValueError(f"aux_hidden_state_layer_ids {list(ids)} ask for hidden_states {bad}, but the target has "
                         f"{num_hidden_layers} layers (hidden_states indices 0..{num_hidden_layers}).")


def register_auto_classes() -> None:
    from transformers import AutoModel

    AutoConfig.register(Eagle3Config.model_type, Eagle3Config, exist_ok=True)
    AutoModel.register(Eagle3Config, Eagle3DraftModel, exist_ok=True)
