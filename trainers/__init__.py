"""Trainers for speculative-decoding drafters: `transformers.Trainer` subclasses with their configs.

- `DistillTrainer` / `DistillConfig`: DistillSpec-style distillation of a drafter from its target.
- `AdaSPECTrainer` / `AdaSPECConfig`: distillation on the tokens a reference drafter shows are learnable.
- `SoFTTrainer` / `SoFTConfig`: sorted fine-tuning of one model whose first layers form nested drafters.
- `GuidedDrafterTrainer` / `GuidedDrafterConfig`: SD², a drafter steered by the target's hidden states.
- `Eagle3Trainer` / `Eagle3TrainingConfig`: an EAGLE-3 head over the target's hidden states, with the training-time
  test unroll.

Shared per-token divergences and the token normaliser live in `trainers.losses`.
"""

from .adaspec import AdaSPECConfig, AdaSPECTrainer
from .base import BaseDrafterConfig, BaseDrafterTrainer
from .distill import DistillConfig, DistillTrainer
from .eagle3 import Eagle3Trainer, Eagle3TrainingConfig, build_draft_vocabulary
from .guided import GuidedDrafterConfig, GuidedDrafterTrainer
from .soft import SoFTConfig, SoFTTrainer, exit_logits, truncate_model

__all__ = [
    "AdaSPECConfig",
    "AdaSPECTrainer",
    "BaseDrafterConfig",
    "BaseDrafterTrainer",
    "DistillConfig",
    "DistillTrainer",
    "Eagle3Trainer",
    "Eagle3TrainingConfig",
    "GuidedDrafterConfig",
    "GuidedDrafterTrainer",
    "SoFTConfig",
    "SoFTTrainer",
    "build_draft_vocabulary",
    "exit_logits",
    "truncate_model",
]
