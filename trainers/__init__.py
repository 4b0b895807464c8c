"""Trainers for speculative-decoding drafters: `transformers.Trainer` subclasses with their configs.

- `DistillTrainer` / `DistillConfig`: DistillSpec-style distillation of a drafter from its target.
- `AdaSPECTrainer` / `AdaSPECConfig`: distillation on the tokens a reference drafter shows are learnable.
- `SoFTTrainer` / `SoFTConfig`: sorted fine-tuning of one model whose first layers form nested drafters.
- `GuidedDrafterTrainer` / `GuidedDrafterConfig`: SD², a drafter steered by the target's hidden states.

Shared per-token divergences and the token normaliser live in `trainers.losses`.
"""

from .adaspec import AdaSPECConfig, AdaSPECTrainer
from .base import BaseDrafterConfig, BaseDrafterTrainer
from .distill import DistillConfig, DistillTrainer
from .guided import GuidedDrafterConfig, GuidedDrafterTrainer
from .soft import SoFTConfig, SoFTTrainer, exit_logits, truncate_model

__all__ = [
    "AdaSPECConfig",
    "AdaSPECTrainer",
    "BaseDrafterConfig",
    "BaseDrafterTrainer",
    "DistillConfig",
    "DistillTrainer",
    "GuidedDrafterConfig",
    "GuidedDrafterTrainer",
    "SoFTConfig",
    "SoFTTrainer",
    "exit_logits",
    "truncate_model",
]
