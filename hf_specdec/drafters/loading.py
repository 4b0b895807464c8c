"""One way to turn a checkpoint name or folder into a drafter, whatever kind of drafter it holds."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .base import Drafter, TreeConfig


def drafter_kind(name_or_path: str) -> str:
    """"eagle3" (an EAGLE-3 head, speculators or native format), "guided" (a GuidedDrafter checkpoint), "sorted"
    (exits recorded in `config.sorted_exits`, as SoFTTrainer and `SortedDrafter.save_pretrained` write them) or
    "model" (any other causal LM)."""
    from ..eagle3.formats import is_eagle3_checkpoint
    from ..guided import GuidedDrafterConfig

    if is_eagle3_checkpoint(name_or_path):
        return "eagle3"
    config = AutoConfig.from_pretrained(name_or_path)
    if isinstance(config, GuidedDrafterConfig):
        return "guided"
    return "sorted" if getattr(config, "sorted_exits", None) else "model"


def load_drafter_model(name_or_path: str, kind: str | None = None, **model_kwargs):
    """The model behind a drafter checkpoint (an `Eagle3DraftModel`, a `GuidedDrafter` or a causal LM), in eval
    mode."""
    from ..eagle3 import Eagle3DraftModel
    from ..guided import GuidedDrafter

    kind = kind or drafter_kind(name_or_path)
    model_class = {"eagle3": Eagle3DraftModel, "guided": GuidedDrafter}.get(kind, AutoModelForCausalLM)
    return model_class.from_pretrained(name_or_path, **model_kwargs).eval()


def lab_checkpoints(lab_dir: str | Path) -> tuple[str, dict[str, str]]:
    """The target folder and {name: folder} of every drafter a `recipes/lab.py` run saved."""
    root = Path(lab_dir)
    if not (root / "target" / "config.json").is_file():
        raise ValueError(f"{lab_dir} is not a lab directory — not a lab output (expected target/config.json and "
                         f"drafters/<name>/); write one with `python recipes/lab.py --output_dir {lab_dir}`.")
    drafters = {path.parent.name: str(path.parent) for path in sorted((root / "drafters").glob("*/config.json"))}
    return str(root / "target"), drafters


def load_drafter(name_or_path: str, *, num_draft_tokens: int = 5, tree: TreeConfig | None = None,
                 model=None, schedule: str = "constant", **model_kwargs) -> Drafter:
    """The drafter a checkpoint holds: `Eagle3Drafter`, `GuidedModelDrafter`, `SortedDrafter` (its saved exits and
    thresholds) or `ModelDrafter`. `model_kwargs` (dtype, ...) go to `from_pretrained`; pass an already loaded `model` to reuse
    its weights (a new drafter per call keeps no state between generate() calls)."""
    from .eagle3 import Eagle3Drafter
    from .guided import GuidedModelDrafter
    from .model import ModelDrafter
    from .sorted import SortedDrafter

    kind = drafter_kind(name_or_path)
    if model is None:
        model = load_drafter_model(name_or_path, kind, **model_kwargs)
    if kind == "sorted":
        return SortedDrafter(model, model.config.sorted_exits, getattr(model.config, "sorted_exit_thresholds", None),
                             num_draft_tokens=num_draft_tokens, tree=tree, schedule=schedule)
    drafter_class = {"eagle3": Eagle3Drafter, "guided": GuidedModelDrafter}.get(kind, ModelDrafter)
    return drafter_class(model, num_draft_tokens=num_draft_tokens, tree=tree, schedule=schedule)
