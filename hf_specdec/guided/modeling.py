"""GuidedDrafter (SD²): a pretrained drafter steered by the target's hidden states.

The target's hidden states at a few layers (`config.verifier_layers`, indices into HF `output_hidden_states`,
i.e. the *inputs* of those decoder layers) are concatenated and fused by a linear layer initialised as their sum,
then turned into one additive delta per steered drafter layer:

- `merged`:   `mlp(x) = down(act(gate(x)) * (up(x) + δ_j))`,    δ = W_guide(LayerNorm(fused))[j]
- `simple`:   `h = residual + mlp(x) + δ_j`,                    δ as above, of the drafter's hidden size
- `advanced`: like `merged`, but `δ_j = MLP_j([fused ; input_layernorm(h)])` per token (h: the layer's input)

The drafter's modeling code is not copied: the deltas are added by forward hooks on the drafter's own modules
(`mlp.up_proj` for merged/advanced, the decoder layer for simple). The hooks are inert outside
`GuidedDrafter.forward` with a guide, so a zero guide (or none) leaves the drafter exactly as it was, and every
`W_guide` / last MLP layer starts at zero, so training starts from the unchanged drafter.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..compat import activation_checkpointing, cache_argument

GUIDE_METHODS = ("merged", "simple", "advanced")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class GuidedDrafterConfig(PretrainedConfig):
    """Configuration of a `GuidedDrafter`.

    Args:
        drafter_config: the base drafter's config (a `PretrainedConfig` or its dict; restored with
            `AutoConfig.for_model` from its `model_type`).
        verifier_hidden_size: hidden size of the target (verifier) whose states steer the drafter.
        verifier_layers: indices into the target's `output_hidden_states` (0 = embeddings, i = input of decoder
            layer i, num_hidden_layers = final normed output), e.g. `[3, 16, 29]` for a 32-layer Llama.
        guide_method: "merged" (delta inside the MLP), "simple" (delta after the MLP) or "advanced" (per-token
            delta inside the MLP).
        drafter_layers: "all", or the indices of the drafter layers to steer.
        verifier_name_or_path: the target the guide was trained against (informational).
        draft_length: the draft length the guide was trained for (its staleness range; SD²'s `ngram`), if known.
    """

    model_type = "hf_specdec_guided_drafter"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "drafter_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")
    }

    drafter_config: dict | PretrainedConfig | None = None
    verifier_hidden_size: int | None = None
    verifier_layers: list[int] | None = None
    guide_method: str = "merged"
    drafter_layers: str | list[int] = "all"
    verifier_name_or_path: str | None = None
    draft_length: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.guide_method not in GUIDE_METHODS:
            raise ValueError(f"guide_method={self.guide_method!r} is unknown; choose one of {list(GUIDE_METHODS)}.")
        if self.verifier_layers is not None:
            layers = list(self.verifier_layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(
                    f"verifier_layers must be a non-empty list of indices into the target's hidden_states (>= 0), "
                    f"got {self.verifier_layers!r}."
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"verifier_layers has repeated entries: {layers}.")
            self.verifier_layers = layers
        if self.verifier_hidden_size is not None and self.verifier_hidden_size <= 0:
            raise ValueError(f"verifier_hidden_size must be positive, got {self.verifier_hidden_size}.")
        self.drafter_layers = _normalise_drafter_layers(self.drafter_layers, self.drafter_config.num_hidden_layers)

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        """The drafter's own config: vocabulary, layers and attention settings are the base drafter's."""
        return self.drafter_config

    @property
    def steered_layers(self) -> list[int]:
        """The drafter layer indices that receive a delta, in order (slice j of the projection → layer j here)."""
        if self.drafter_layers == "all":
            return list(range(self.drafter_config.num_hidden_layers))
        return list(self.drafter_layers)

    @property
    def guide_output_size(self) -> int:
        """Size of one layer's delta: the MLP's intermediate size (merged/advanced) or the hidden size (simple)."""
        text = self.drafter_config
        return text.hidden_size if self.guide_method == "simple" else text.intermediate_size


def _normalise_drafter_layers(drafter_layers, num_layers: int):
    if drafter_layers == "all":
        return "all"
    if isinstance(drafter_layers, str) or not isinstance(drafter_layers, (list, tuple)):
        raise TypeError(f"drafter_layers must be 'all' or a list of drafter layer indices, got {drafter_layers!r}.")
    layers = list(drafter_layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(
            f"drafter_layers={layers} must be distinct indices in [0, {num_layers}) (the drafter has {num_layers} "
            f"layers){f'; out of range or not ints: {bad}' if bad else ''}."
        )
    return sorted(layers)


class GuideModules(nn.Module):
    """The trainable steering parameters: fusion of the verifier states and the per-layer delta producers."""

    def __init__(self, config: GuidedDrafterConfig):
        super().__init__()
        hidden = config.verifier_hidden_size
        num_states, num_steered = len(config.verifier_layers), len(config.steered_layers)
        self.num_states, self.num_steered = num_states, num_steered
        self.output_size = config.guide_output_size
        self.fusion = nn.Linear(num_states * hidden, hidden, bias=True)
        if config.guide_method == "advanced":
            drafter_hidden = config.drafter_config.hidden_size
            self.layer_mlps = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(hidden + drafter_hidden, hidden, bias=False),
                    nn.GELU(),
                    nn.Linear(hidden, self.output_size, bias=False),
                )
                for _ in range(num_steered)
            )
        else:
            self.norm = nn.LayerNorm(hidden)
            self.projection = nn.Linear(hidden, self.output_size * num_steered, bias=False)

    @torch.no_grad()
    def init_submodule(self, module: nn.Module) -> bool:
        """Initialise one of this block's leaves, if `module` is one: fusion = the sum of the states
        (`[I | I | …]`, zero bias); every delta's last layer = 0, so a fresh guide is a no-op. False otherwise.

        Called leaf by leaf from `GuidedDrafter._init_weights` (transformers initialises modules that own
        parameters), so loaded weights are never overwritten."""
        if module is self.fusion:
            eye = torch.eye(self.fusion.out_features, device=module.weight.device, dtype=module.weight.dtype)
            init.copy_(module.weight, eye.repeat(1, self.num_states))
            init.zeros_(module.bias)
        elif module is getattr(self, "projection", None) or any(module is mlp[2] for mlp in self._mlps()):
            init.zeros_(module.weight)
        elif any(module is mlp[0] for mlp in self._mlps()):
            init.normal_(module.weight, std=0.02)
        elif module is getattr(self, "norm", None):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            return False
        return True

    def _mlps(self):
        return self.layer_mlps if hasattr(self, "layer_mlps") else ()

    def fuse(self, guide_states: torch.Tensor) -> torch.Tensor:
        """`[..., L, H_v]` → `[..., H_v]`."""
        return self.fusion(guide_states.flatten(-2))

    def layer_deltas(self, fused: torch.Tensor) -> torch.Tensor:
        """merged/simple: `[..., H_v]` → `[..., n_steered, out_size]` (slice j steers the j-th steered layer)."""
        return self.projection(self.norm(fused)).unflatten(-1, (self.num_steered, self.output_size))


@dataclass
class _Steering:
    """What the hooks of one forward read: per steered layer, a delta (merged/simple) or the fused guide
    (advanced), each `[B, 1 or S, ·]`, and a `[B, S, 1]` mask of the positions to steer (None: all)."""

    deltas: torch.Tensor | None  # [n_steered, B, 1|S, out]
    fused: torch.Tensor | None  # [B, 1|S, H_v]
    mask: torch.Tensor | None
    layer_inputs: dict[int, torch.Tensor]  # advanced: input_layernorm(h) of the layer being run


class GuidedDrafter(PreTrainedModel):
    """A causal-LM drafter (`self.drafter`) steered by the target's hidden states (see the module docstring).

    `forward(..., guide_states=...)` takes the raw target states at `config.verifier_layers`, stacked on dim -2:
    `[B, L, H_v]` (one guide per row, applied to every position of the call) or `[B, S, L, H_v]` (one per
    position). `guide_states=None` runs the drafter unsteered.
    """

    config_class = GuidedDrafterConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: GuidedDrafterConfig, drafter: PreTrainedModel | None = None):
        super().__init__(config)
        if config.verifier_hidden_size is None or config.verifier_layers is None:
            raise ValueError(
                "A GuidedDrafter needs `verifier_hidden_size` and `verifier_layers` in its config; build one around "
                "a drafter with GuidedDrafter.from_drafter(draft_model, target_config=target.config, "
                "verifier_layers=[...])."
            )
        self.drafter = drafter if drafter is not None else AutoModelForCausalLM.from_config(config.drafter_config)
        self._steered_layers = _check_drafter_layout(self.drafter, config)
        self.guide = GuideModules(config)
        self._steering: _Steering | None = None
        self._install_hooks()
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_drafter(
        cls,
        draft_model: PreTrainedModel,
        target_config: PretrainedConfig,
        verifier_layers: list[int],
        guide_method: str = "merged",
        drafter_layers: str | list[int] = "all",
    ) -> GuidedDrafter:
        """Wrap an existing causal LM (its weights are shared, not copied) with fresh, no-op guide modules."""
        target_text = target_config.get_text_config()
        config = GuidedDrafterConfig(
            # a copy: building a config resets its sub-configs' attention implementation, which must not reach the
            # drafter that keeps running on its own config
            drafter_config=copy.deepcopy(draft_model.config),
            verifier_hidden_size=target_text.hidden_size,
            verifier_layers=list(verifier_layers),
            guide_method=guide_method,
            drafter_layers=drafter_layers,
            verifier_name_or_path=getattr(target_config, "_name_or_path", None) or None,
        )
        check_verifier_layers(config, target_config)
        model = cls(config, drafter=draft_model)
        model.guide.to(device=draft_model.device, dtype=draft_model.dtype)
        return model

    @classmethod
    def from_sd2_checkpoint(cls, path_or_hub_id: str, drafter_model=None, **kwargs) -> GuidedDrafter:
        """Load a checkpoint in the SD² paper's published format (see `hf_specdec.guided.convert`)."""
        from .convert import load_sd2_checkpoint

        return load_sd2_checkpoint(path_or_hub_id, drafter_model=drafter_model, **kwargs)

    def as_drafter(self, **kwargs):
        """This model as an hf_specdec drafter for `generate(assistant_model=...)`."""
        from ..drafters.guided import GuidedModelDrafter

        return GuidedModelDrafter(self, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        if not self.guide_initialises(module) and module is not self:
            super()._init_weights(module)

    def guide_initialises(self, module: nn.Module) -> bool:
        guide = self.__dict__.get("_modules", {}).get("guide")
        return guide is not None and guide.init_submodule(module)

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self):
        return self.drafter.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.drafter.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.drafter.get_output_embeddings()

    def get_decoder(self):
        return self.drafter.get_decoder()

    # ------------------------------------------------------------------ guides
    def guide_states_from_hidden_states(self, hidden_states) -> torch.Tensor:
        """Stack the target's `output_hidden_states` at `config.verifier_layers`: `[B, S, L, H_v]`."""
        layers = self.config.verifier_layers
        if len(hidden_states) <= max(layers):
            raise ValueError(
                f"The guide needs the target's hidden_states at {layers}, but the target returned only "
                f"{len(hidden_states)} (indices 0..{len(hidden_states) - 1})."
            )
        return torch.stack([hidden_states[i] for i in layers], dim=-2)

    def _steering_for(self, guide_states: torch.Tensor, guide_mask: torch.Tensor | None) -> _Steering:
        expected = (len(self.config.verifier_layers), self.config.verifier_hidden_size)
        if guide_states.dim() not in (3, 4) or tuple(guide_states.shape[-2:]) != expected:
            raise ValueError(
                f"guide_states must be [B, L, H_v] or [B, S, L, H_v] with L={expected[0]} verifier layers "
                f"{self.config.verifier_layers} and H_v={expected[1]}, got shape {tuple(guide_states.shape)}."
            )
        guide_states = guide_states.to(self.guide.fusion.weight.dtype)
        if guide_states.dim() == 3:
            guide_states = guide_states[:, None]  # one guide per row, broadcast over the positions of this call
        fused = self.guide.fuse(guide_states)  # [B, 1|S, H_v]
        mask = None if guide_mask is None else guide_mask[..., None].to(fused.dtype)
        if self.config.guide_method == "advanced":
            return _Steering(deltas=None, fused=fused, mask=mask, layer_inputs={})
        deltas = self.guide.layer_deltas(fused).movedim(-2, 0)  # [n_steered, B, 1|S, out]
        return _Steering(deltas=deltas, fused=None, mask=mask, layer_inputs={})

    def _masked(self, delta: torch.Tensor) -> torch.Tensor:
        mask = self._steering.mask
        return delta if mask is None else delta * mask

    def _install_hooks(self) -> None:
        layers = self.get_decoder().layers
        method = self.config.guide_method
        for slot, index in enumerate(self._steered_layers):
            layer = layers[index]
            if method == "simple":
                layer.register_forward_hook(partial(self._add_after_layer, slot))
            else:
                layer.mlp.up_proj.register_forward_hook(partial(self._add_to_up_projection, slot))
            if method == "advanced":
                layer.input_layernorm.register_forward_hook(partial(self._record_layer_input, slot))

    # Hooks: bound methods wrapped in `partial`, so `copy.deepcopy` of the model re-binds them to the copy.
    def _add_to_up_projection(self, slot: int, module, args, output):
        if self._steering is None:
            return output
        if self._steering.deltas is not None:
            delta = self._steering.deltas[slot]
        else:  # advanced: per token, from the guide and this layer's normalised input
            normed = self._steering.layer_inputs.pop(slot)
            fused = self._steering.fused.expand(*normed.shape[:-1], -1).to(normed.dtype)
            delta = self.guide.layer_mlps[slot](torch.cat([fused, normed], dim=-1))
        return output + self._masked(delta).to(output.dtype)

    def _record_layer_input(self, slot: int, module, args, output):
        if self._steering is not None:
            self._steering.layer_inputs[slot] = output
        return output

    def _add_after_layer(self, slot: int, module, args, output):
        if self._steering is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + self._masked(self._steering.deltas[slot]).to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        guide_states: torch.Tensor | None = None,
        logits_to_keep=0,
        labels=None,
        guide_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The drafter's forward, steered by `guide_states` (see the class docstring). `guide_mask` (`[B, S]`,
        optional) limits steering to some positions (training steers only positions whose prediction is trained,
        as SD² does). The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (older)."""
        with self._steered(guide_states, guide_mask):
            return self.drafter(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{cache_argument(self.drafter): cache if cache is not None else past_key_values},
                logits_to_keep=logits_to_keep,
                labels=labels,
                **kwargs,
            )

    def final_hidden_states(self, input_ids=None, attention_mask=None, position_ids=None,
                            guide_states: torch.Tensor | None = None, guide_mask: torch.Tensor | None = None,
                            **kwargs) -> torch.Tensor:
        """`[B, S, H]`: the steered drafter's last hidden states (what its LM head reads), without running the head
        (a training loss projects them a chunk at a time)."""
        with self._steered(guide_states, guide_mask):
            return self.drafter.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state

    @contextlib.contextmanager
    def _steered(self, guide_states: torch.Tensor | None, guide_mask: torch.Tensor | None):
        """The hooks steer the drafter with this guide while the block runs."""
        # Under gradient checkpointing the layers re-run in backward and must see the same guide, so the state is
        # then left in place until the next forward replaces it.
        keep_for_recompute = activation_checkpointing(self) and torch.is_grad_enabled() and self.training
        self._steering = None if guide_states is None else self._steering_for(guide_states, guide_mask)
        try:
            yield
        finally:
            if not keep_for_recompute:
                self._steering = None


def _check_drafter_layout(drafter: nn.Module, config: GuidedDrafterConfig) -> list[int]:
    """The steered layers must have a gated MLP (gate/up/down projections) and an input norm; clear error if not."""
    decoder = drafter.get_decoder() if hasattr(drafter, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"GuidedDrafter steers decoder layers with a gated MLP (gate/up/down projections) found at "
            f"`model.layers` (Llama, Qwen2/3, Mistral, ...); {type(drafter).__name__} has no such layers."
        )
    steered = config.steered_layers
    if max(steered) >= len(layers):
        raise ValueError(f"drafter_layers {steered} exceed the drafter's {len(layers)} layers.")
    for index in steered:
        layer = layers[index]
        mlp = getattr(layer, "mlp", None)
        missing = [name for name in MLP_PROJECTIONS if not hasattr(mlp, name)]
        if mlp is None or missing or not hasattr(layer, "input_layernorm"):
            raise ValueError(
                f"GuidedDrafter needs a gated MLP `down(act(gate(x)) * up(x))` with `mlp.gate_proj`, `mlp.up_proj`, "
                f"`mlp.down_proj` and an `input_layernorm` in every steered layer (Llama, Qwen2/3, Mistral); layer "
                f"{index} of {type(drafter).__name__} ({type(layer).__name__}) does not have "
                f"{missing or ['input_layernorm']}."
            )
    if config.guide_method != "simple" and layers[steered[0]].mlp.up_proj.out_features != config.guide_output_size:
        raise ValueError(
            f"drafter_config.intermediate_size={config.guide_output_size} does not match the drafter's up_proj "
            f"({layers[steered[0]].mlp.up_proj.out_features})."
        )
    return steered


def check_verifier_layers(config: GuidedDrafterConfig, target_config: PretrainedConfig) -> None:
    """Clear errors when the target cannot provide the guide this drafter expects."""
    target_text = target_config.get_text_config()
    if target_text.hidden_size != config.verifier_hidden_size:
        raise ValueError(
            f"The guide expects verifier hidden states of size {config.verifier_hidden_size}, but the target's "
            f"hidden size is {target_text.hidden_size}: this GuidedDrafter was built for another target."
        )
    available = target_text.num_hidden_layers + 1  # hidden_states: embeddings + one per decoder layer
    missing = [i for i in config.verifier_layers if i >= available]
    if missing:
        raise ValueError(
            f"verifier_layers {config.verifier_layers} ask for hidden_states {missing}, but the target has "
            f"{target_text.num_hidden_layers} layers (hidden_states indices 0..{available - 1})."
        )


def register_auto_classes() -> None:
    from transformers import AutoModel

    AutoConfig.register(GuidedDrafterConfig.model_type, GuidedDrafterConfig, exist_ok=True)
    AutoModel.register(GuidedDrafterConfig, GuidedDrafter, exist_ok=True)
    AutoModelForCausalLM.register(GuidedDrafterConfig, GuidedDrafter, exist_ok=True)
