"""AdaSPEC: distil a drafter only on the tokens it can still learn.

A frozen reference drafter (the same initial model, first distilled from the target with forward KL on all tokens)
tells which tokens a drafter of this size can fit. For every trained token

    ΔL = KL(p_target ‖ q_draft) − KL(p_target ‖ q_ref)

and the draft is trained only on the top-`k` fraction of tokens by ΔL: those where it lags furthest behind what the
reference shows is reachable. Tokens too hard for a small model (high loss for both) are left alone, so capacity goes
to tokens that raise acceptance. The selection is recomputed every step from the current draft and is not
differentiated through.

Paper conventions kept as defaults: the threshold is the (1 − k) quantile per micro-batch (`delta >= quantile`),
the loss divides the selected tokens' sum by *all* trained tokens (so it is about `k` times a mean), and training
runs `epochs / k` epochs (3 → 7.5 for k = 0.4) so that each token is selected about as often as in plain
distillation; set `num_train_epochs` accordingly — the trainer does not change it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .distill import DistillConfig, DistillTrainer
from .losses import forward_kl, supervised_positions
from .teachers import LiveTeacher, Teacher

THRESHOLD_SCOPES = ("micro_batch", "accumulation_window")
LOSS_NORMALIZATIONS = ("all_tokens", "selected_tokens")


def select_top_fraction(delta: torch.Tensor, k: float) -> torch.Tensor:
    """Bool mask of the entries at or above the (1 − k) quantile of `delta` (linear interpolation): about a
    fraction `k` of them, all of them when `k == 1`."""
    if delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return delta >= torch.quantile(delta.float(), 1.0 - k)


@dataclass
class AdaSPECConfig(DistillConfig):
    """Configuration of `AdaSPECTrainer`: `DistillConfig` plus the token-selection fields below."""

    _VALID_DICT_FIELDS = DistillConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    k: float = field(
        default=0.4,
        metadata={
            "help": "Fraction of trained tokens (by largest ΔL = KL_draft − KL_ref) the draft learns from, in (0, 1]. "
            "The paper uses 0.4 and trains epochs / k epochs."
        },
    )
    threshold_scope: str = field(
        default="micro_batch",
        metadata={
            "help": "Where the ΔL quantile is taken: per micro-batch (the paper) or over all micro-batches of one "
            "optimizer step on this process (`accumulation_window`: selection independent of how the step is split; "
            "costs one extra no-grad forward of draft, target and reference per micro-batch).",
            "choices": list(THRESHOLD_SCOPES),
        },
    )
    loss_normalization: str = field(
        default="all_tokens",
        metadata={
            "help": "Divide the selected tokens' loss by all trained tokens (the paper; loss ≈ k × a mean) or by the "
            "selected tokens only (a true mean; needs the extra forward described under `threshold_scope`).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `ref_model` is a path (JSON on the CLI)."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability of an on-policy micro-batch (see DistillConfig); the paper trains off-policy."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.k <= 1.0:
            raise ValueError(
                f"k is the fraction of tokens AdaSPEC trains on and must be in (0, 1], got {self.k}. The paper uses "
                "0.4; k=1 is plain distillation."
            )
        if self.threshold_scope not in THRESHOLD_SCOPES:
            raise ValueError(f"threshold_scope={self.threshold_scope!r}; choose one of {THRESHOLD_SCOPES}.")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization={self.loss_normalization!r}; choose one of {LOSS_NORMALIZATIONS}.")


class AdaSPECTrainer(DistillTrainer):
    """Selective distillation (see the module docstring). `teacher_model` is the target, `ref_model` the reference
    drafter; both are frozen and placed like the teacher of `DistillTrainer`."""

    config_class = AdaSPECConfig
    _tag_names = (*DistillTrainer._tag_names, "adaspec")
    _name = "AdaSPEC"
    _paper: ClassVar[dict[str, str]] = {
        "title": "AdaSPEC: Selective Knowledge Distillation for Efficient Speculative Decoders",
        "arxiv": "2510.19779",
    }

    def __init__(self, model, teacher_model=None, args: AdaSPECConfig | None = None, *, ref_model=None, **kwargs):
        if ref_model is None:
            raise ValueError(
                "AdaSPECTrainer needs `ref_model`: the draft's initial model distilled from the target on all tokens "
                "(e.g. with DistillTrainer, divergence='forward_kl', lmbda=0), as a model or a path."
            )
        super().__init__(model, teacher_model=teacher_model, args=args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        ref = self._load_frozen(ref_model, self.args.ref_model_init_kwargs, "ref_model", student, self.processing_class)
        self.ref_model = self.prepare_frozen_model(ref)

    @property
    def uses_window_pass(self) -> bool:
        """Selections are decided before the loss pass when they depend on the whole window or set the normaliser."""
        args = self.args
        return args.threshold_scope == "accumulation_window" or args.loss_normalization == "selected_tokens"

    def frozen_models(self, inputs, positions):
        frozen = super().frozen_models(inputs, positions)
        if "adaspec_selected" not in inputs:  # not decided for the whole window in `prepare_window`
            frozen["ref"] = self.frozen_forward(self.ref_model, inputs, positions)[0]
        return frozen

    def selection_values(self, student, teacher, frozen, rows):
        return {"delta_loss": self.token_delta(student, teacher, frozen["ref"].at(rows))} if "ref" in frozen else {}

    def token_delta(self, student_logits: torch.Tensor, teacher: Teacher, ref: LiveTeacher) -> torch.Tensor:
        """ΔL per trained token: forward KL of the (detached) draft minus that of the reference."""
        with torch.no_grad():
            return (teacher.divergence(forward_kl, student_logits, self.args.temperature)
                    - teacher.divergence(forward_kl, ref.values(), self.args.temperature))

    def _record_selection(self, delta: torch.Tensor, selected: torch.Tensor, mode: str | None = None) -> None:
        if delta.numel():
            self.record_metric("selected_fraction", selected.float(), mode)
            self.record_metric("mean_delta_loss", delta, mode)

    def select_tokens(self, inputs, positions, values):
        if "adaspec_selected" in inputs:  # decided for the whole window in `prepare_window`
            return inputs["adaspec_selected"][positions]
        delta = values.pop("delta_loss")
        selected = select_top_fraction(delta, self.args.k)
        self._record_selection(delta, selected)
        return selected

    def normalizes_over_selected_tokens(self) -> bool:
        return self.args.loss_normalization == "selected_tokens"

    # ----- the optional window pass -------------------------------------------------------------------------------

    @torch.no_grad()
    def _window_delta(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The draft's weights do not change inside an accumulation window, so ΔL computed here is the ΔL the loss
        # pass would see (exactly so with dropout disabled, the default).
        positions, targets = self.trained_targets(batch)
        frozen = {"teacher": self.live_or_stored_teacher(batch, positions)[0],
                  "ref": self.frozen_forward(self.ref_model, batch, positions)[0]}
        values = self.student_token_values(self.model_wrapped, batch, positions, functools.partial(
            self.token_values, frozen=frozen, targets=targets, use_ce=False))
        return values["delta_loss"]

    def prepare_window(self, batches):
        batches = super().prepare_window(batches)  # on-policy / seq_kd regeneration first
        if not self.uses_window_pass:
            return batches
        deltas = [self._window_delta(batch) for batch in batches]
        if self.args.threshold_scope == "accumulation_window":
            window = select_top_fraction(torch.cat(deltas), self.args.k)
            selections = list(window.split([len(d) for d in deltas]))
        else:
            selections = [select_top_fraction(delta, self.args.k) for delta in deltas]
        for batch, delta, selected in zip(batches, deltas, selections):
            positions = supervised_positions(batch["labels"])
            batch["adaspec_selected"] = torch.zeros_like(positions)
            batch["adaspec_selected"][positions] = selected
            self._record_selection(delta, selected, mode="train")
        return batches

    def count_loss_tokens(self, batch):
        if self.normalizes_over_selected_tokens():
            return batch["adaspec_selected"].sum()
        return super().count_loss_tokens(batch)

    def model_card_summary(self) -> dict[str, Any]:
        summary = super().model_card_summary()
        summary.update(
            {
                "token fraction k": self.args.k,
                "threshold scope": self.args.threshold_scope,
                "loss normalisation": self.args.loss_normalization,
            }
        )
        return summary
