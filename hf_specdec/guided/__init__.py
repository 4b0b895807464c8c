"""Guided drafters (SD²): a pretrained drafter steered by the target's hidden states.

from hf_specdec.guided import GuidedDrafter
drafter = GuidedDrafter.from_drafter(draft, target_config=target.config, verifier_layers=[3, 16, 29])
drafter = GuidedDrafter.from_pretrained("out/guided")           # Auto-registered
drafter = GuidedDrafter.from_sd2_checkpoint("path/or/hub-id")   # the paper's published format
"""

from .convert import convert_sd2_checkpoint, load_sd2_checkpoint, to_sd2_checkpoint
from .modeling import (
    GUIDE_METHODS,
    GuidedDrafter,
    GuidedDrafterConfig,
    GuideModules,
    check_verifier_layers,
    register_auto_classes,
)

register_auto_classes()

__all__ = [
    "GUIDE_METHODS",
    "GuideModules",
    "GuidedDrafter",
    "GuidedDrafterConfig",
    "check_verifier_layers",
    "convert_sd2_checkpoint",
    "load_sd2_checkpoint",
    "register_auto_classes",
    "to_sd2_checkpoint",
]
