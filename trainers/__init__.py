"""Trainers for speculative-decoding drafters: `transformers.Trainer` subclasses with their configs.

- `DistillTrainer` / `DistillConfig`: DistillSpec-style distillation of a drafter from its target.
- `AdaSPECTrainer` / `AdaSPECConfig`: distillation on the tokens a reference drafter shows are learnable.
- `SoFTTrainer` / `SoFTConfig`: sorted fine-tuning of one model whose first layers form nested drafters.
- `GuidedDrafterTrainer` / `GuidedDrafterConfig`: SD², a drafter steered by the target's hidden states.
- `Eagle3Trainer` / `Eagle3TrainingConfig`: an EAGLE-3 head over the target's hidden states, with the training-time
  test unroll.

- `SpeculativeDecodingCallback`: real speculative decoding (α, τ) with the current drafter, and its expected
  acceptance on the target's own continuations, logged during training.

Shared per-token divergences and the token normaliser live in `trainers.losses`.
"""

from .adaspec import AdaSPECConfig, AdaSPECTrainer
from .base import BaseDrafterConfig, BaseDrafterTrainer
from .callbacks import SpeculativeDecodingCallback
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
    "SpeculativeDecodingCallback",
    "build_draft_vocabulary",
    "exit_logits",
    "truncate_model",
]
