"""SD²: train a drafter steered by its target's hidden states (`hf_specdec.guided.GuidedDrafter`).

Each training step runs the frozen target once (no grad) on the batch; it gives both the guide — its hidden
states at `verifier_layers` — and the teacher distribution. At inference a drafter's guide is the target's state
at the last accepted position, so the tokens it drafts see a state 1..`draft_length` positions old; training
simulates that staleness: drafter position t is steered by the target's state at `source(t) < t`:

- `offset` (SD²'s default): one offset o ∈ 1..draft_length per optimizer step, `source(t) = max(t − o, 0)`;
- `blocked`: positions are cut into blocks of `draft_length` (at a random phase per step); every position of a
  block reads the state just before the block, as a block drafted after one verification does.

Only positions whose prediction is trained are steered (the prompt runs unsteered, as the drafter's prefill does).
The loss is a per-token divergence between the steered drafter and the target over the full vocabulary, summed
over trained tokens and divided by the number of trained tokens in the optimizer step. The guide modules always
train; the drafter trains fully, through LoRA adapters, or not at all (`train_drafter`).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from hf_specdec.guided import GUIDE_METHODS, GuidedDrafter, check_verifier_layers

from .base import BaseDrafterConfig, BaseDrafterTrainer, load_causal_lm
from .losses import normalize_token_loss
from .offline import STATES_COLUMN

STALENESS_MODES = ("offset", "blocked")
TRAIN_DRAFTER_MODES = ("full", "lora", "frozen")


@dataclass
class GuidedDrafterConfig(BaseDrafterConfig):
    """Configuration of `GuidedDrafterTrainer`: `TrainingArguments`, the shared drafter-training fields
    (`divergence`, `temperature`, `max_length`, ...) and the SD² fields below. (Not to be confused with
    `hf_specdec.guided.GuidedDrafterConfig`, the model's config.)"""

    verifier_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Target hidden_states indices that steer the drafter (input of those decoder layers), e.g. "
            "3 16 29 for a 32-layer Llama. Needed when `model` is a plain causal LM to wrap; a GuidedDrafter "
            "keeps its own."
        },
    )
    guide_method: str = field(
        default="merged",
        metadata={
            "help": "Where the delta goes when wrapping a plain drafter: merged (inside the MLP, the SD² method), "
            "simple (after the MLP) or advanced (per token, inside the MLP).",
            "choices": list(GUIDE_METHODS),
        },
    )
    drafter_layers: str = field(
        default="all",
        metadata={"help": "Drafter layers to steer when wrapping a plain drafter: 'all' or indices like '0,2,3'."},
    )
    train_drafter: str = field(
        default="full",
        metadata={
            "help": "How the drafter's own weights train next to the guide modules (which always train): full, "
            "lora (adapters; the saved model has them merged) or frozen.",
            "choices": list(TRAIN_DRAFTER_MODES),
        },
    )
    draft_length: int = field(
        default=8,
        metadata={"help": "Draft length the guide is trained for: staleness is simulated up to this many positions."},
    )
    staleness: str = field(
        default="offset",
        metadata={
            "help": "How stale the simulated guide is: offset (one random offset 1..draft_length per step) or "
            "blocked (blocks of draft_length positions read the state just before the block).",
            "choices": list(STALENESS_MODES),
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank for train_drafter='lora' (without peft_config)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha for train_drafter='lora'."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout for train_drafter='lora'."})

    def __post_init__(self):
        super().__post_init__()
        if self.guide_method not in GUIDE_METHODS:
            raise ValueError(f"guide_method={self.guide_method!r} is unknown; choose one of {list(GUIDE_METHODS)}.")
        if self.train_drafter not in TRAIN_DRAFTER_MODES:
            raise ValueError(
                f"train_drafter={self.train_drafter!r} is unknown; choose one of {list(TRAIN_DRAFTER_MODES)}."
            )
        if self.staleness not in STALENESS_MODES:
            raise ValueError(f"staleness={self.staleness!r} is unknown; choose one of {list(STALENESS_MODES)}.")
        if self.draft_length < 1:
            raise ValueError(f"draft_length must be at least 1, got {self.draft_length}.")
        self.drafter_layers = parse_drafter_layers(self.drafter_layers)
        if self.verifier_layers is not None and not self.verifier_layers:
            raise ValueError("verifier_layers is empty: give the target hidden_states indices, e.g. [3, 16, 29].")


def parse_drafter_layers(value) -> str | list[int]:
    """'all', a list of ints, or the CLI spelling '0,2,3'."""
    if isinstance(value, str) and value != "all":
        try:
            return [int(part) for part in value.replace(" ", "").strip("[]").split(",") if part]
        except ValueError as error:
            raise ValueError(f"drafter_layers must be 'all' or indices like '0,2,3', got {value!r}.") from error
    return value


def guide_source_positions(length: int, draft_length: int, staleness: str, draw: int, device=None) -> torch.Tensor:
    """`[length]`: the target position whose state steers each drafter position (see the module docstring).

    `draw` is the step's random draw: the offset (1..draft_length) for `offset`, the block phase
    (0..draft_length-1) for `blocked`. Position 0 has no earlier state and reads its own.
    """
    positions = torch.arange(length, device=device)
    if staleness == "offset":
        return (positions - draw).clamp(min=0)
    block_start = torch.div(positions - 1 - draw, draft_length, rounding_mode="floor") * draft_length + draw
    return block_start.clamp(min=0)


class GuidedDrafterTrainer(BaseDrafterTrainer):
    """Train a `GuidedDrafter` (`model`) against its target (`teacher_model`); see the module docstring.

    `model` may be a `GuidedDrafter` (or a path to one), or a plain causal LM (or path) that is wrapped with
    `GuidedDrafter.from_drafter(model, target config, args.verifier_layers, args.guide_method,
    args.drafter_layers)`. The saved checkpoint is a `GuidedDrafter` (`from_pretrained` / `AutoModel`).
    """

    config_class = GuidedDrafterConfig
    requires_teacher = True
    supports_packing = False  # the guide reads the target state of earlier positions of the same row
    offline_teacher_replaces_model = False  # with an offline teacher, `teacher_model` gives the target's config
    logits_for_metrics = False  # steered by the target's states
    _tag_names = (*BaseDrafterTrainer._tag_names, "guided-drafter", "sd2")
    _name = "SD2-guided"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Steering Pretrained Drafters during Speculative Decoding",
        "arxiv": "2511.09844",
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: GuidedDrafterConfig | None = None,
        *,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = GuidedDrafterConfig(output_dir="guided-drafter")
        elif not isinstance(args, GuidedDrafterConfig):
            raise TypeError(f"GuidedDrafterTrainer needs a GuidedDrafterConfig, got {type(args).__name__}.")
        if teacher_model is None:
            raise ValueError("GuidedDrafterTrainer needs `teacher_model=` (the target whose states steer the draft; "
                             "with an offline teacher dataset it gives its config only and is never run or kept).")
        if isinstance(model, str) and processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model)
        model = load_causal_lm(model, args.model_init_kwargs, "model")
        args = copy.copy(args)  # the caller's config stays as given (it may build another trainer)
        args.model_init_kwargs = None  # consumed: the base class must not load again
        target_config = (
            AutoConfig.from_pretrained(teacher_model) if isinstance(teacher_model, str) else teacher_model.config
        )
        model = self._guided_model(model, target_config, args)
        model.config.draft_length = args.draft_length
        if args.train_drafter == "frozen":
            model.drafter.requires_grad_(False)
        if peft_config is not None and args.train_drafter != "lora":
            raise ValueError(f"A peft_config was given but train_drafter={args.train_drafter!r}; set it to 'lora'.")
        if args.train_drafter == "lora" and peft_config is None:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules="all-linear"
            )
        self._staleness_draws = 0
        super().__init__(
            model, teacher_model, args, processing_class=processing_class, peft_config=peft_config, **kwargs
        )

    @staticmethod
    def _guided_model(model, target_config, args: GuidedDrafterConfig) -> GuidedDrafter:
        if isinstance(model, GuidedDrafter):
            if args.verifier_layers is not None and list(args.verifier_layers) != model.config.verifier_layers:
                raise ValueError(
                    f"args.verifier_layers={args.verifier_layers} but the GuidedDrafter was built for "
                    f"{model.config.verifier_layers}; drop one of them."
                )
            check_verifier_layers(model.config, target_config)
            return model
        if args.verifier_layers is None:
            raise ValueError(
                "`model` is a plain causal LM: set `verifier_layers` (target hidden_states indices, e.g. [3, 16, 29])"
                " so it can be wrapped as a GuidedDrafter, or pass a GuidedDrafter."
            )
        return GuidedDrafter.from_drafter(
            model, target_config, list(args.verifier_layers), args.guide_method, args.drafter_layers
        )

    @staticmethod
    def _wrap_peft(model: GuidedDrafter, peft_config, args: GuidedDrafterConfig) -> GuidedDrafter:
        """LoRA inside the drafter only: the model stays a GuidedDrafter (its guide modules fully trainable), so
        checkpoints and the final save are GuidedDrafter checkpoints."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_config, model.drafter)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return model

    # ----- staleness ----------------------------------------------------------------------------------------------

    def staleness_draw(self) -> int:
        """This step's random offset (or block phase). Seeded by (seed, step), so every micro-batch of an
        optimizer step and every process use the same one: the update does not depend on how the batch is split.
        Evaluation batches each get their own draw."""
        if self.model.training:
            key = f"{self.args.seed}-{self.state.global_step}-staleness"
        else:
            self._staleness_draws += 1
            key = f"{self.args.seed}-eval-{self._staleness_draws}-staleness"
        rng = random.Random(key)
        if self.args.staleness == "offset":
            return rng.randint(1, self.args.draft_length)
        return rng.randrange(self.args.draft_length)

    # ----- loss ---------------------------------------------------------------------------------------------------

    def guide_states(self, inputs: dict[str, torch.Tensor], hidden_states) -> torch.Tensor:
        """The target's states at the drafter's `verifier_layers`, `[B, S, L, H_v]`: from the live target's
        forward, or stored in an offline teacher batch (`recipes/offline_teacher.py --state_layers` = those
        layers)."""
        guided = self.accelerator.unwrap_model(self.model)
        if hidden_states is not None:
            return guided.guide_states_from_hidden_states(hidden_states)
        stored = inputs.get(STATES_COLUMN)
        layers = guided.config.verifier_layers
        width = len(layers) * guided.config.verifier_hidden_size
        stored_layers = self.teacher_metadata.state_layers if self.teacher_metadata is not None else layers
        if stored is None or stored.shape[-1] != width or list(stored_layers or []) != list(layers):
            raise ValueError(f"The offline teacher dataset holds no target states for the guide's verifier_layers "
                             f"{layers} ({width} values per token; stored: layers {stored_layers}, "
                             f"{None if stored is None else stored.shape[-1]} values): write it with "
                             f"recipes/offline_teacher.py --state_layers {' '.join(map(str, layers))}.")
        return stored.unflatten(-1, (len(layers), -1)).to(guided.dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, _ = self.trained_targets(inputs)  # [B, S-1]: logits at t predict a trained token
        teacher, hidden_states = self.live_or_stored_teacher(inputs, positions, output_hidden_states=True)
        guide_states = self.guide_states(inputs, hidden_states)
        draw = self.staleness_draw()
        source = guide_source_positions(
            guide_states.shape[1], self.args.draft_length, self.args.staleness, draw, guide_states.device
        )

        def token_values(student: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
            return self.distillation_token_values(student, teacher.at(rows))

        values = self.student_token_values(model, inputs, positions, token_values,
                                           guide_states=guide_states[:, source], guide_mask=F.pad(positions, (0, 1)))
        loss = normalize_token_loss(values["loss"], None, num_items_in_batch, self.loss_scale())
        self.record_token_values(values)
        if values["loss"].numel():
            staleness = (torch.arange(len(source), device=source.device) - source)[1:].float().mean()[None]
            self.record_metric("guide_staleness", staleness)
        return (loss, values) if return_outputs else loss

    # ----- saving -------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the LoRA adapters (so a run resumes); the final model has them merged, a plain
        GuidedDrafter."""
        if self.args.train_drafter != "lora" or _internal_call:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            merged_lora_copy(self.accelerator.unwrap_model(self.model)).save_pretrained(output_dir)
            self.write_model_card(output_dir)
        return None

    def model_card_summary(self) -> dict[str, Any]:
        config = self.accelerator.unwrap_model(self.model).config
        return {
            "divergence": self.args.divergence,
            "temperature": self.args.temperature,
            "guide method": config.guide_method,
            "verifier layers": config.verifier_layers,
            "steered drafter layers": config.drafter_layers,
            "drafter training": self.args.train_drafter,
            "staleness": f"{self.args.staleness} (draft length {self.args.draft_length})",
        }


def merged_lora_copy(model: GuidedDrafter) -> GuidedDrafter:
    """A copy of `model` with every LoRA adapter merged into its base layer and the adapter modules removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    for module in merged.modules():  # the injection leaves its config behind; a merged model has no adapters
        module.__dict__.pop("peft_config", None)
    return merged
