"""hf_specdec: speculative decoding inside Hugging Face `generate()`.

    import hf_specdec
    from hf_specdec import ModelDrafter
    out = target.generate(**batch, assistant_model=ModelDrafter(draft), max_new_tokens=128)

Drafters: ModelDrafter (chains, EAGLE-2 trees), NGramDrafter, SortedDrafter (SD2 exits), GuidedDrafter (SD² steering),
RoutedDrafter (a drafter per row, chosen by a router and an online policy), Eagle3Drafter (EAGLE-3 heads, speculators
and native checkpoints).
"""

from . import integration
from .draft import Draft
from .drafters import DecodingState, Drafter, Eagle3Drafter, ModelDrafter, NGramDrafter, RoutedDrafter, SortedDrafter, TreeConfig
from .engine import SpeculativeGenerateOutput, speculative_generate
from .eagle3 import Eagle3Config, Eagle3DraftModel  # also registers the Auto classes
from .guided import GuidedDrafter, GuidedDrafterConfig  # also registers the Auto classes
from .routing.policy import OnlinePolicy
from .stats import SpecStats

__version__ = "0.1.0"

integration.install()

__all__ = [
    "DecodingState",
    "Draft",
    "Drafter",
    "Eagle3Config",
    "Eagle3DraftModel",
    "Eagle3Drafter",
    "GuidedDrafter",
    "GuidedDrafterConfig",
    "ModelDrafter",
    "NGramDrafter",
    "OnlinePolicy",
    "RoutedDrafter",
    "SortedDrafter",
    "SpecStats",
    "SpeculativeGenerateOutput",
    "TreeConfig",
    "speculative_generate",
]
