"""Sorted fine-tuning (SoFT): train one model so that its first `e` layers, for every `e` in `exits`, are good
language models on their own, all sharing the final norm and the LM head.

Exit `e` computes `lm_head(final_norm(h_e))`, where `h_e` is the hidden state after `e` decoder layers. In
transformers the last entry of `output_hidden_states` is already normalised (the model applies the final norm
before storing it) while the others are not, so the norm is applied to every exit except the last layer. The loss
is a weighted mean over exits of each exit's next-token cross-entropy — or, given a teacher, of each exit's
divergence from the teacher — for all exits at every step (as in Sorted LLaMA / SD2), normalised over tokens like
every loss in this package.

The trained checkpoint records its exits in `config.sorted_exits` (and `config.sorted_exit_thresholds` when given)
so that a sorted-draft drafter can load it. `truncate_model` builds the drafter to start from, the way SD2 did:
keep a big model's first `n` layers, its embeddings, final norm and LM head.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .base import BaseDrafterConfig, BaseDrafterTrainer, call_inside_forward
from .losses import chunked_token_values, in_backward, normalize_token_loss, token_cross_entropy
from .teachers import Teacher, base_model, lm_head_logits

_LAYER_LIST_NAMES = ("layers", "h", "blocks")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """`(decoder, layers, final_norm, lm_head)` of a causal LM (Llama/Qwen/Mistral-style or GPT-2-style)."""
    base = base_model(model)
    decoder = base.get_decoder()
    layers = next(
        (getattr(decoder, n) for n in _LAYER_LIST_NAMES if isinstance(getattr(decoder, n, None), nn.ModuleList)), None
    )
    norm = next(
        (getattr(decoder, n) for n in _FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None
    )
    if layers is None or norm is None:
        raise ValueError(
            f"Cannot find the decoder layers and final norm of {type(base).__name__}: sorted exits need a decoder "
            f"with a layer list named one of {_LAYER_LIST_NAMES} and a final norm named one of {_FINAL_NORM_NAMES}."
        )
    return decoder, layers, norm, base.get_output_embeddings()


def num_layers(model: nn.Module) -> int:
    return len(decoder_parts(model)[1])


def check_exits(exits: list[int], model: nn.Module) -> None:
    total = num_layers(model)
    bad = [e for e in exits if not 1 <= e <= total]
    if bad:
        raise ValueError(
            f"exits {bad} are out of range: the model has {total} decoder layers, so every exit must be in "
            f"1..{total} (exit e = the first e layers)."
        )
    if exits[-1] != total:
        # Layers past the last exit would run without receiving gradients (and break DDP's reduction).
        raise ValueError(
            f"The last exit must be the model's full depth ({total} layers), got {exits[-1]}: add {total} to exits, "
            f"or cut the model to {exits[-1]} layers first with `truncate_model(model, {exits[-1]})`."
        )


def exit_hidden_states(model: nn.Module, input_ids, attention_mask=None, exits=None,
                       position_ids=None) -> dict[int, torch.Tensor]:
    """Normalised hidden state after `e` layers for each exit (all layers when `exits` is None)."""
    decoder, layers, norm, _ = decoder_parts(model)
    exits = list(exits) if exits is not None else list(range(1, len(layers) + 1))
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False)
    states = outputs.hidden_states  # embeddings, then one entry per layer; the last one already normalised
    return {e: states[e] if e == len(layers) else norm(states[e]) for e in exits}


def exit_logits(model: nn.Module, input_ids, attention_mask=None, exits=None) -> dict[int, torch.Tensor]:
    """`{e: logits of the first e layers + final norm + LM head}`, each `(B, T, vocab)`."""
    hidden = exit_hidden_states(model, input_ids, attention_mask, exits)
    return {e: lm_head_logits(model, h) for e, h in hidden.items()}


def truncate_model(model: nn.Module, num_layers_to_keep: int) -> nn.Module:
    """A new model with the first `num_layers_to_keep` decoder layers of `model`, its embeddings, final norm and LM
    head (copied, so the two can be trained independently). Its logits equal `exit_logits(model, ...)` at that exit."""
    if hasattr(model, "get_base_model"):
        raise ValueError(
            "truncate_model takes a plain transformers model; merge a PEFT adapter first (merge_and_unload)."
        )
    _, layers, _, _ = decoder_parts(model)
    total = len(layers)
    if not 1 <= num_layers_to_keep <= total:
        raise ValueError(
            f"num_layers_to_keep must be in 1..{total} (the model's decoder layers), got {num_layers_to_keep}."
        )
    layers_prefix = next(name for name, module in model.named_modules() if module is layers)
    config = copy.deepcopy(model.config)
    for key, value in config.to_dict().items():
        # Per-layer settings (e.g. `layer_types` for sliding-window models) are lists with one entry per layer.
        if isinstance(value, list) and len(value) == total and not key.startswith("sorted_"):
            setattr(config, key, value[:num_layers_to_keep])
    config.num_hidden_layers = num_layers_to_keep
    if getattr(config, "sorted_exits", None):
        config.sorted_exits = [e for e in config.sorted_exits if e <= num_layers_to_keep]
    dropped = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.")
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not ((match := dropped.match(key)) and int(match.group(1)) >= num_layers_to_keep)
    }
    with no_init_weights():  # every weight is loaded just below
        draft = type(model)(config)
    draft.load_state_dict(state)
    draft.to(device=model.device, dtype=model.dtype)
    if getattr(model, "generation_config", None) is not None:
        draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.train(model.training)


@dataclass
class SoFTConfig(BaseDrafterConfig):
    """Configuration of `SoFTTrainer`: `TrainingArguments` plus the sorted-exit fields below (`divergence`,
    `temperature` and `beta` apply only when a teacher is given)."""

    exits: list[int] | None = field(
        default=None,
        metadata={
            "help": "Exit layers, e.g. 6 9 12 (SD2): exit e = the first e decoder layers + final norm + LM head."
        },
    )
    exit_weights: list[float] | None = field(
        default=None, metadata={"help": "Loss weight per exit (normalised to sum to 1); default: the plain mean."}
    )
    exit_thresholds: list[float] | None = field(
        default=None,
        metadata={
            "help": "Confidence thresholds a sorted-draft drafter uses at inference to stop at each exit (SD2: 0.5 "
            "0.5 0). Not used in training; saved as `config.sorted_exit_thresholds`."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.exits:
            raise ValueError(
                "SoFTConfig needs `exits`, the layer counts of the nested drafters, e.g. exits=[6, 9, 12]."
            )
        if sorted(set(self.exits)) != list(self.exits) or self.exits[0] < 1:
            raise ValueError(f"exits must be strictly increasing positive layer counts, got {self.exits}.")
        weights = self.exit_weights
        if weights is not None and (len(weights) != len(self.exits) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(
                f"exit_weights needs one non-negative weight per exit ({len(self.exits)}), not all zero; got {weights}."
            )
        thresholds = self.exit_thresholds
        if thresholds is not None and (len(thresholds) != len(self.exits) or not all(0 <= t <= 1 for t in thresholds)):
            raise ValueError(
                f"exit_thresholds needs one probability in [0, 1] per exit ({len(self.exits)}), got {thresholds}."
            )

    @property
    def normalized_exit_weights(self) -> list[float]:
        weights = self.exit_weights or [1.0] * len(self.exits)
        return [w / sum(weights) for w in weights]


class SoFTTrainer(BaseDrafterTrainer):
    """Sorted fine-tuning of one model's nested exits (see the module docstring); `teacher_model` is optional."""

    config_class = SoFTConfig
    _tag_names = (*BaseDrafterTrainer._tag_names, "soft", "sorted-draft")
    _name = "SoFT"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Sorted LLaMA: Unlocking the Potential of Intermediate Layers of Large Language Models for "
        "Dynamic Inference",
        "arxiv": "2309.08968",
    }

    def __init__(self, model, teacher_model=None, args: SoFTConfig | None = None, **kwargs):
        if args is None and not isinstance(teacher_model, SoFTConfig):  # a misplaced config: the base class says so
            raise ValueError("SoFTTrainer needs `args=SoFTConfig(exits=[...], ...)`: there is no default set of exits.")
        super().__init__(model, teacher_model=teacher_model, args=args, **kwargs)
        inner = self.accelerator.unwrap_model(self.model)
        check_exits(self.args.exits, inner)
        # Recorded in the config so that every checkpoint says which sub-models it was trained to serve.
        config = base_model(inner).config
        config.sorted_exits = list(self.args.exits)
        if self.args.exit_thresholds is not None:
            config.sorted_exit_thresholds = list(self.args.exit_thresholds)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, targets = self.trained_targets(inputs)
        inner = self.accelerator.unwrap_model(model)
        teacher = None
        if self.teacher_model is not None or self.offline:
            teacher = self.live_or_stored_teacher(inputs, positions)[0]
        chunk_size = self.args.loss_chunk_size or max(int(positions.sum()), 1)

        def exit_values(input_ids, attention_mask=None, position_ids=None):
            # Runs inside the wrapper's forward (FSDP gathers, DDP tracks); only trained positions reach the head,
            # a chunk at a time
            with self.accelerator.autocast():
                hidden = exit_hidden_states(inner, input_ids, attention_mask, self.args.exits, position_ids)
                # A tuple in `exits` order, not a dict keyed by the int exits: DeepSpeed ZeRO-3's post-forward hook
                # reads a dict output's keys as attribute names (`name.startswith`) and fails on ints.
                return tuple(chunked_token_values(
                    functools.partial(self.exit_token_values, targets=targets, teacher=teacher),
                    hidden[e][:, :-1][positions], chunk_size) for e in self.args.exits)

        values = dict(zip(self.args.exits, call_inside_forward(model, inner, exit_values, **self.model_inputs(inputs))))
        per_token = torch.zeros(targets.shape, device=targets.device, dtype=torch.float32)
        for exit_layer, weight in zip(self.args.exits, self.args.normalized_exit_weights):
            per_token = per_token + weight * values[exit_layer]["loss"]
            self.record_token_values(values[exit_layer], prefix=f"exit_{exit_layer}/")
        loss = normalize_token_loss(per_token, None, num_items_in_batch, self.loss_scale())
        return (loss, values) if return_outputs else loss

    def exit_token_values(self, hidden: torch.Tensor, rows: slice, targets: torch.Tensor,
                          teacher: Teacher | None) -> dict[str, torch.Tensor]:
        """Per-token values of one exit on one chunk of trained tokens: CE on the labels, or the configured
        divergence from the teacher, as `loss`; and the metrics (skipped while backward recomputes the chunk)."""
        logits = lm_head_logits(self.accelerator.unwrap_model(self.model), hidden)
        if teacher is None:
            values = {"loss": token_cross_entropy(logits, targets[rows])}
            if not in_backward():
                values["ce"] = values["loss"].detach()
                values["accuracy"] = (logits.detach().argmax(-1) == targets[rows]).float()
            return values
        return self.distillation_token_values(logits, teacher.at(rows))

    def model_card_summary(self) -> dict[str, Any]:
        summary = {"exits": self.args.exits, "exit weights": [round(w, 4) for w in self.args.normalized_exit_weights]}
        if self.args.exit_thresholds is not None:
            summary["exit thresholds (inference)"] = self.args.exit_thresholds
        if self.teacher_model is not None:
            summary.update({"teacher divergence": self.args.divergence, "temperature": self.args.temperature})
        return summary
