"""DistillSpec-style knowledge distillation of a drafter from its target.

Each micro-batch is trained on one of three data sources: with probability `lmbda` the drafter samples
continuations of the batch's prompts (on-policy, DistillSpec's key ingredient); otherwise, with `seq_kd`, the
teacher does; otherwise the dataset's own completions are used. In every case the teacher scores the tokens and the
loss is a per-token divergence over the full vocabulary, summed over trained tokens and divided by the number of
trained tokens in the optimizer step (recounted after generation).
"""

from __future__ import annotations

import functools
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig

from hf_specdec.bench.prompts import left_padded_batches

from .base import BaseDrafterConfig, BaseDrafterTrainer
from .data import pad_rows, prompt_length, until_eos
from .losses import IGNORE_INDEX, in_backward, normalize_token_loss, token_cross_entropy
from .teachers import Teacher

DATA_SOURCES = ("dataset", "student", "teacher")


@dataclass
class DistillConfig(BaseDrafterConfig):
    """Configuration of `DistillTrainer`: `TrainingArguments` plus the distillation fields below (and the shared
    ones in `BaseDrafterConfig`: `divergence`, `beta`, `temperature`, `max_length`, `disable_dropout`,
    `teacher_model_init_kwargs`, ...)."""

    _VALID_DICT_FIELDS = BaseDrafterConfig._VALID_DICT_FIELDS + ["generation_kwargs"]

    lmbda: float = field(
        default=0.5,
        metadata={
            "help": "Probability that a micro-batch is on-policy: the drafter samples continuations of the batch's "
            "prompts and the teacher scores them. 0 trains on the dataset (or teacher generations) only."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "When a micro-batch is not on-policy, let the teacher generate its completions (sequence-level "
            "KD) instead of using the dataset's."
        },
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Tokens generated per prompt for on-policy and `seq_kd` micro-batches."}
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of on-policy / `seq_kd` generation (separate from the loss one)."},
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Extra `GenerationConfig` fields for on-policy / `seq_kd` generation, e.g. '{\"top_p\": 0.95}'."
        },
    )
    ce_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an added next-token cross-entropy on the batch's labels (dataset or teacher "
            "generations; never on the drafter's own samples)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda is a probability, got {self.lmbda}; use 0 for off-policy, 1 for always on-policy.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.generation_temperature <= 0:
            raise ValueError(
                f"generation_temperature must be > 0, got {self.generation_temperature}; for greedy generation "
                "pass generation_kwargs='{\"do_sample\": false}'."
            )
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {self.ce_weight}.")


class DistillTrainer(BaseDrafterTrainer):
    """Distil a drafter (`model`) from its target (`teacher_model`); see the module docstring.

    Hooks for subclasses: `divergence` (the per-token loss), `select_tokens` (which trained tokens enter the loss),
    `data_source` (where a micro-batch's completions come from), `prepare_window` (rewrite a whole optimizer step).
    """

    config_class = DistillConfig
    requires_teacher = True
    _tag_names = (*BaseDrafterTrainer._tag_names, "distillation", "distillspec")
    _name = "DistillSpec"
    _paper: ClassVar[dict[str, str]] = {
        "title": "DistillSpec: Improving Speculative Decoding via Knowledge Distillation",
        "arxiv": "2310.08461",
    }

    def __init__(self, model, teacher_model=None, args: DistillConfig | None = None, **kwargs):
        super().__init__(model, teacher_model, args, **kwargs)
        regenerates = {name: value for name, value in (("lmbda", self.args.lmbda), ("seq_kd", self.args.seq_kd))
                       if value}
        if regenerates and self.offline:
            raise ValueError(f"{regenerates} regenerate completions that a teacher must then score, but the teacher "
                             "is an offline teacher dataset (stored outputs for its own rows only): set lmbda=0 and "
                             "seq_kd=False, or train with a live `teacher_model`.")
        if regenerates and (self.args.packing or self.args.padding_free):
            raise ValueError(f"{regenerates} regenerate each row's completion from its prompt, which packed and "
                             "padding-free batches do not keep apart: set lmbda=0 and seq_kd=False, or "
                             "packing=False and padding_free=False.")

    # ----- data: where each micro-batch's completions come from ---------------------------------------------------

    def data_source(self, index_in_window: int) -> str:
        """One of `DATA_SOURCES`. The draw is seeded by (seed, step, index) so that every process makes the same
        choice (ZeRO-3 generation is collective) and a resumed run repeats it."""
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{index_in_window}")
        if self.args.lmbda > 0 and rng.random() < self.args.lmbda:
            return "student"
        return "teacher" if self.args.seq_kd else "dataset"

    def generation_seed(self, index_in_window: int) -> int:
        """Sampling seed of one micro-batch's generation. Trainer restores the global RNG of a resumed run only after
        the window's batches are fetched, so generation draws from its own seed: resumed runs repeat the samples."""
        key = f"{self.args.seed}-{self.state.global_step}-{index_in_window}-{self.args.process_index}-generate"
        return random.Random(key).getrandbits(63)

    def prepare_window(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        prepared = []
        for index, batch in enumerate(batches):
            source = self.data_source(index)
            if source != "dataset":
                generator = self.model_wrapped if source == "student" else self.teacher_model
                device = self.args.device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(self.generation_seed(index))
                    batch = self.generate_completions(generator, batch)
            batch["data_source"] = source
            self.record_metric("on_policy", torch.tensor([float(source == "student")]), mode="train")
            prepared.append(batch)
        return prepared

    def eos_token_ids(self) -> list[int]:
        ids = set()
        if self.processing_class is not None and getattr(self.processing_class, "eos_token_id", None) is not None:
            ids.add(self.processing_class.eos_token_id)
        eos = getattr(
            getattr(self.accelerator.unwrap_model(self.model), "generation_config", None), "eos_token_id", None
        )
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return sorted(ids)

    @torch.no_grad()
    def generate_completions(self, generator: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """Replace each row's completion with one sampled from `generator`, keeping its prompt (the tokens before
        the first trained label). Generated tokens up to and including the first EOS are trained."""
        from trl.models import unwrap_model_for_generation

        device = batch["input_ids"].device
        prompts = []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            length = int(mask.sum())
            prompts.append(ids[: prompt_length(labels[:length])].tolist())
        if any(len(prompt) <= 1 for prompt in prompts) and not getattr(self, "_warned_promptless", False):
            self._warned_promptless = True
            warnings.warn("On-policy generation continues each row from its prompt (the tokens before its first "
                          "trained label), but some rows have none (plain `text` or fully trained `input_ids` rows): "
                          "the drafter generates them from their first token, unconditioned. Give prompt/completion "
                          "or `messages` rows (or `labels` / `completion_mask`) to keep on-policy data in context, "
                          "or set lmbda=0.", stacklevel=2)
        # left padding: every prompt ends at the same column, where generation continues
        prompt_batch = left_padded_batches(prompts, len(prompts), self.pad_token_id, device)[0]
        width = prompt_batch["input_ids"].shape[1]
        eos_ids = self.eos_token_ids()
        generation_config = self.generation_config(eos_ids)
        # generation switches gradient checkpointing off and back on: with the user's kwargs, not the defaults
        with unwrap_model_for_generation(generator, self.accelerator,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                         ) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            output = unwrapped.generate(**prompt_batch, generation_config=generation_config)
            unwrapped.train(was_training)
        rows = []
        for prompt, completion in zip(prompts, output[:, width:].tolist()):
            completion = until_eos(completion, eos_ids)
            rows.append(
                {
                    "input_ids": (prompt + completion)[: self.args.max_length],
                    "labels": ([IGNORE_INDEX] * len(prompt) + completion)[: self.args.max_length],
                }
            )
        return {key: value.to(device) for key, value in pad_rows(rows, self.pad_token_id).items()}

    def generation_config(self, eos_ids: list[int]) -> GenerationConfig:
        """On-policy / `seq_kd` generation: plain sampling at `generation_temperature`, with the user's
        `generation_kwargs` replacing any of these fields (e.g. `{"top_p": 0.95}` or `{"do_sample": false}`)."""
        fields = dict(do_sample=True, temperature=self.args.generation_temperature, top_k=0, top_p=1.0,
                      max_new_tokens=self.args.max_new_tokens, pad_token_id=self.pad_token_id,
                      eos_token_id=eos_ids or None)
        return GenerationConfig(**{**fields, **(self.args.generation_kwargs or {})})

    # ----- loss ---------------------------------------------------------------------------------------------------

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> torch.Tensor:
        """Hook: per-token divergence `(N,)` of the student from the teacher, both `(N, vocab)` logits to divide by
        `temperature` (a live teacher: the shared vocabulary; an offline one: the coarse distributions of
        `trainers.offline` as log-probabilities, already tempered, with temperature 1)."""
        return self.divergence_fn(student_logits, teacher_logits, temperature)

    def frozen_models(self, inputs: dict[str, Any], positions: torch.Tensor) -> dict[str, Teacher]:
        """Hook: the frozen distributions the loss reads at the trained positions (`teacher`; subclasses add
        theirs), each produced once per micro-batch and read chunk by chunk."""
        return {"teacher": self.live_or_stored_teacher(inputs, positions)[0]}

    def token_values(self, student: torch.Tensor, rows: slice, frozen: dict[str, Teacher], targets: torch.Tensor,
                     use_ce: bool) -> dict[str, torch.Tensor]:
        """Per-token values of one chunk of trained tokens (`rows`): the differentiated `loss` and the metrics
        (skipped while backward recomputes the chunk)."""
        teacher = frozen["teacher"].at(rows).materialized()  # projected once for this chunk
        values = self.distillation_token_values(student, teacher, self.divergence)
        if not in_backward():
            values.update(self.selection_values(student, teacher, frozen, rows))
        if use_ce:
            cross_entropy = token_cross_entropy(student, targets[rows])
            values["loss"] = values["loss"] + self.args.ce_weight * cross_entropy
            if not in_backward():
                values["ce"] = cross_entropy.detach()
        return values

    def selection_values(self, student: torch.Tensor, teacher: Teacher, frozen: dict[str, Teacher],
                         rows: slice) -> dict[str, torch.Tensor]:
        """Hook: per-token values of one chunk that `select_tokens` reads (not differentiated)."""
        return {}

    def select_tokens(self, inputs: dict[str, Any], positions: torch.Tensor,
                      values: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Hook: a bool `(N,)` mask of the trained tokens that enter the loss, or None for all of them; `values` are
        the per-token values of `token_values`."""
        return None

    def normalizes_over_selected_tokens(self) -> bool:
        """Hook: whether the loss divides by the selected tokens (True) or by all trained tokens (False). A subclass
        returning True must also count selected tokens in `count_loss_tokens`."""
        return False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, targets = self.trained_targets(inputs)
        frozen = self.frozen_models(inputs, positions)
        use_ce = self.args.ce_weight > 0 and inputs.get("data_source", "dataset") != "student"
        values = self.student_token_values(model, inputs, positions, functools.partial(
            self.token_values, frozen=frozen, targets=targets, use_ce=use_ce))
        per_token = values["loss"]
        selected = self.select_tokens(inputs, positions, values)
        if selected is not None:
            per_token = torch.where(selected, per_token, torch.zeros_like(per_token))
        # Trained tokens count in the normaliser unless the trainer counts only selected ones (`count_loss_tokens`
        # decides the training count; this mask gives evaluation the same rule).
        counted = selected if selected is not None and self.normalizes_over_selected_tokens() else None
        loss = normalize_token_loss(per_token, counted, num_items_in_batch, self.loss_scale())
        self.record_token_values(values)
        return (loss, values) if return_outputs else loss

    def model_card_summary(self) -> dict[str, Any]:
        args = self.args
        summary = {"divergence": args.divergence + (f" (beta={args.beta})" if args.divergence == "jsd" else "")}
        summary.update({"temperature": args.temperature, "on-policy fraction (lmbda)": args.lmbda})
        summary.update({"teacher-generated data (seq_kd)": args.seq_kd, "cross-entropy weight": args.ce_weight})
        return summary
