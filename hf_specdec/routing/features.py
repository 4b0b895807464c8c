"""The router's features: the target's own prefill hidden states, mean-pooled over each prompt's real tokens.

The engine computes them from the prefill it runs anyway (no extra forward); the router recipe computes the same
thing with `prompt_features` (one extra forward per prompt, offline). Both pool through `PooledPrompt`, so the
router is trained on exactly what it sees at generation time.
"""

from __future__ import annotations

import torch

from ..compat import hidden_states_request


def pool_prompt_states(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, P, H] hidden states and [B, P] real-token mask → [B, H] float32 mean over each row's real tokens."""
    pooled = PooledPrompt(0)
    pooled.add([hidden], valid)
    return pooled.features()


class PooledPrompt:
    """Adds up the pooled sum and token count of one layer's states across prefill chunks."""

    def __init__(self, layer: int):
        self.layer, self.total, self.count = layer, None, None

    def add(self, hidden_states, valid: torch.Tensor) -> None:
        hidden = hidden_states[self.layer]
        if hidden is None:
            raise ValueError(f"The router reads the target's hidden_states[{self.layer}], which the model did not "
                             "return; pick a layer the target has (0 = embeddings, num_hidden_layers = last).")
        valid = valid.to(hidden.device)[..., None]
        # where, not a product: a padding position's state may be anything (even NaN) and must not leak in
        total, count = torch.where(valid, hidden.float(), 0.0).sum(1), valid.float().sum(1)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def features(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1.0)


@torch.no_grad()
def prompt_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """[B, H] router features of left-padded prompts: what the engine pools from its prefill, from one forward."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    outputs = model(input_ids=input_ids, attention_mask=valid.long(), position_ids=positions, use_cache=False,
                    **hidden_states_request([layer]))
    return pool_prompt_states(outputs.hidden_states[layer], valid)
