"""One way to turn a checkpoint name or folder into a drafter, whatever kind of drafter it holds."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .base import Drafter, TreeConfig


def drafter_kind(name_or_path: str) -> str:
    """"guided" (a GuidedDrafter checkpoint), "sorted" (exits recorded in `config.sorted_exits`, as SoFTTrainer
    and `SortedDrafter.save_pretrained` write them) or "model" (any other causal LM)."""
    from ..guided import GuidedDrafterConfig

    config = AutoConfig.from_pretrained(name_or_path)
    if isinstance(config, GuidedDrafterConfig):
        return "guided"
    return "sorted" if getattr(config, "sorted_exits", None) else "model"


def load_drafter(name_or_path: str, *, num_draft_tokens: int = 5, tree: TreeConfig | None = None,
                 model=None, **model_kwargs) -> Drafter:
    """The drafter a checkpoint holds: `GuidedModelDrafter`, `SortedDrafter` (its saved exits and thresholds) or
    `ModelDrafter`. `model_kwargs` (dtype, ...) go to `from_pretrained`; pass an already loaded `model` to reuse
    its weights (a new drafter per call keeps no state between generate() calls)."""
    from ..guided import GuidedDrafter
    from .guided import GuidedModelDrafter
    from .model import ModelDrafter
    from .sorted import SortedDrafter

    kind = drafter_kind(name_or_path)
    if model is None:
        model_class = GuidedDrafter if kind == "guided" else AutoModelForCausalLM
        model = model_class.from_pretrained(name_or_path, **model_kwargs).eval()
    if kind == "sorted":
        return SortedDrafter(model, model.config.sorted_exits, getattr(model.config, "sorted_exit_thresholds", None),
                             num_draft_tokens=num_draft_tokens, tree=tree)
    drafter_class = GuidedModelDrafter if kind == "guided" else ModelDrafter
    return drafter_class(model, num_draft_tokens=num_draft_tokens, tree=tree)
