"""GuidedModelDrafter: drafting with an SD² guided drafter, steered by the target's own hidden states.

The model (`hf_specdec.guided.GuidedDrafter`) names the target layers it reads (`config.verifier_layers`); the
engine asks the target for exactly those hidden states in every verify forward and hands each row the states at
its last accepted position (the one whose logits produced the bonus token; the prompt's last position after the
prefill). That guide steers every token the row drafts next, catch-up tokens included, as in the paper.
"""

from __future__ import annotations

from .base import DecodingState, TreeConfig
from .model import ModelDrafter


class GuidedModelDrafter(ModelDrafter):
    """Use `GuidedDrafter.as_drafter(...)` (or pass the GuidedDrafter itself as `assistant_model`)."""

    def __init__(self, model, num_draft_tokens: int = 5, schedule: str = "constant", tree: TreeConfig | None = None):
        super().__init__(model, num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)
        self.target_hidden_layers = tuple(model.config.verifier_layers)
        self._guide = None

    def start(self, target, state: DecodingState, num_draft_tokens: int | None = None) -> None:
        _check_target(target, self.model.config)
        self._guide = state.target_hidden
        super().start(target, state, num_draft_tokens)

    def propose(self, state: DecodingState):
        self._guide = state.target_hidden
        return super().propose(state)

    def select_rows(self, rows) -> None:
        super().select_rows(rows)
        # the engine drops the same rows from the states it hands over at the next propose()

    def _model_inputs(self) -> dict:
        guide = None if self._guide is None else self._guide.to(device=self.device, dtype=self.model.dtype)
        return {"guide_states": guide}


def _check_target(target, config) -> None:
    target_config = target.config.get_text_config()
    layers = list(config.verifier_layers)
    if max(layers) > target_config.num_hidden_layers:
        raise ValueError(
            f"The guided drafter reads target hidden states {layers}, but the target has only "
            f"{target_config.num_hidden_layers} layers (hidden_states[0..{target_config.num_hidden_layers}]); use a "
            "drafter trained for this target."
        )
    if target_config.hidden_size != config.verifier_hidden_size:
        raise ValueError(
            f"The guided drafter expects target hidden states of size {config.verifier_hidden_size}, but the target's "
            f"hidden size is {target_config.hidden_size}; use a drafter trained for this target."
        )
