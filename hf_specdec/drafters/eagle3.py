"""Eagle3Drafter: drafting with an EAGLE-3 head over the target's own hidden states.

The head (`hf_specdec.eagle3.Eagle3DraftModel`) reads one target state per committed token: the engine hands the
states at every position it committed (`target_hidden_scope = "accepted"`: the whole prompt after the prefill, the
root and the accepted path after each round). The head's cache holds, at text column c, the pair (target state at
c, token at c + 1); the pair at the last committed column but one gives the root's children.

Each round:
1. catch up: feed the pairs the target committed last round, with the target's states (right-aligned, so the last
   one's output is the root's); its output state seeds the draft;
2. draft a chain or a dynamic tree like `ModelDrafter`, each node reading its parent's output state instead of a
   target state (there is none for a draft token);
3. drop every draft node from the head's cache: the accepted ones come back in step 1 with the target's states.

q is the head's distribution mapped into the target's vocabulary (`d2t`): tokens outside the draft vocabulary have
q = 0, so sampled drafts stay exact.
"""

from __future__ import annotations

import torch

from ..draft import Draft
from ..eagle3.modeling import Eagle3DraftModel, check_layer_ids, default_aux_layer_ids
from .base import DecodingState, TreeConfig
from .model import ModelDrafter

PROMPT_CHUNK = 256  # the prompt's pairs are fed in chunks of this many columns (bounds the mask's size)


class Eagle3Drafter(ModelDrafter):
    """Use `Eagle3DraftModel.as_drafter(...)` (or pass the head itself as `assistant_model`)."""

    target_hidden_scope = "accepted"

    def __init__(self, model, num_draft_tokens: int | None = None, schedule: str = "constant",
                 tree: TreeConfig | None = None):
        """`num_draft_tokens` defaults to the depth the head was trained for (`config.draft_length`), else 5."""
        if not isinstance(model, Eagle3DraftModel):
            raise TypeError(f"Eagle3Drafter needs an hf_specdec.eagle3.Eagle3DraftModel, got {type(model).__name__}; "
                            "load heads with Eagle3DraftModel.from_pretrained(...).")
        num_draft_tokens = num_draft_tokens or getattr(model.config, "draft_length", None) or 5
        super().__init__(model, num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)
        self.hidden_size = model.config.hidden_size

    # ------------------------------------------------------------------ lifecycle
    def bind(self, target) -> None:
        """Read the target's states the head names (EAGLE-3's default (2, L // 2, L - 3) when a checkpoint names
        none, as vLLM does) and share the target's embedding."""
        config = self.model.config
        if config.aux_hidden_state_layer_ids is None:
            config.aux_hidden_state_layer_ids = default_aux_layer_ids(target.config.get_text_config().num_hidden_layers)
        check_target(target, config)
        self.target_hidden_layers = tuple(config.aux_hidden_state_layer_ids)
        if self.model.get_input_embeddings() is not target.get_input_embeddings():
            self.model.attach_target(target)

    def start(self, target, state: DecodingState, num_draft_tokens: int | None = None) -> None:
        super().start(target, state, num_draft_tokens)
        self.fed = torch.zeros_like(state.lengths)  # text columns whose pair the head holds: [0, fed)
        self.catch_up_width = 1 + (self.tree.depth if self.tree is not None else self.max_round_nodes(self.draft_length))
        eager_call, self.cache.call = self.cache.call, self.model.__call__  # the prompt's shapes are one-offs
        try:
            self._catch_up(state, chunk=PROMPT_CHUNK)
        finally:
            self.cache.call = eager_call
        self._behind = False

    def _prefill(self, tokens, valid):
        """The prompt is fed in `start`, paired with the target's prompt states."""

    def fall_behind(self, tokens: int) -> None:
        """Nothing to widen: every round starts by feeding all the text committed since the last one."""

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        rows = rows.to(self.device)
        self._root_logits, self._root_state = self._root_logits[rows], self._root_state[rows]

    # ------------------------------------------------------------------ drafting
    def propose(self, state: DecodingState) -> Draft:
        if self._behind:
            self._catch_up(state)
        self._behind = True  # the target commits at least one token every round
        return super().propose(state)

    def _catch_up(self, state: DecodingState, chunk: int | None = None) -> None:
        """Feed the (target state, next token) pairs of every column the target committed since the last call,
        right-aligned so each row's last pair (its root's) is the last position of the call."""
        states = state.target_hidden  # [B, W, L, H]: entry j is text column fed + j
        pending = (state.lengths - 1 - self.fed).clamp(min=0, max=states.shape[1])
        width = states.shape[1] if not self.cache.compiled or chunk else max(states.shape[1], self.catch_up_width)
        offset = torch.arange(width, device=pending.device)[None, :] - (width - pending)[:, None]  # pair index
        valid = offset >= 0
        index = offset.clamp(min=0)
        columns = self.fed[:, None] + index
        valid &= state.token_mask.gather(1, columns.clamp(max=state.token_mask.shape[1] - 1))
        tokens = state.sequences.gather(1, (columns + 1).clamp(max=state.sequences.shape[1] - 1))
        features = states.gather(1, index[:, :, None, None].expand(-1, -1, *states.shape[2:]))
        features = features.to(device=self.device, dtype=self.model.dtype)
        self.cache.tighten(state.host_text_length)
        step = chunk or width
        for start in range(0, width, step):
            end = min(start + step, width)
            outputs = self._timed(self.cache.forward_committed, self._embeddable(tokens[:, start:end]),
                                  valid[:, start:end].to(self.device), features=features[:, start:end],
                                  logits_to_keep=1)
        self._root_logits, self._root_state = outputs.logits[:, -1], outputs.hidden_states[:, -1]
        self.fed = torch.maximum(self.fed, state.lengths - 1)

    def _root_scores(self, state: DecodingState) -> torch.Tensor:
        rows = len(self._root_state)
        self._node_states = self._root_state.new_zeros(rows, self.round_capacity + 2, self.hidden_size)
        self._node_states[:, 0] = self._root_state  # slot 0: the root; node n at n + 1; the last: holes
        return self._process(self._root_logits[:, None], state, state.root_prefixes())[:, 0]

    def _node_scores(self, tokens, node_ids, depths, ancestors, state, prefixes) -> torch.Tensor:
        """Feed draft nodes [B, F], each reading its parent's output state; scores for their children."""
        self._fed_tentative = True
        node_ids, ancestors = node_ids.to(self.device), ancestors.to(self.device)
        slots = torch.where(node_ids >= 0, node_ids + 1, self._node_states.shape[1] - 1)[:, :, None]
        inputs = self._node_states.gather(1, (parent_ids(ancestors, node_ids) + 1)[:, :, None].expand(
            -1, -1, self.hidden_size))
        outputs = self._timed(self.cache.forward_tentative, self._embeddable(tokens), node_ids, depths, ancestors,
                              hidden_states=inputs)
        self._node_states.scatter_(1, slots.expand(-1, -1, self.hidden_size), outputs.hidden_states)
        return self._process(outputs.logits, state, prefixes)

    def _resolve_round(self, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Drop every draft node: the accepted ones return in the next catch-up, with the target's states."""
        self.cache.keep(path[:, :0], torch.zeros_like(num_accepted))

    def _process(self, logits, state, prefixes):
        scores = super()._process(self.model.logits_in_target_vocabulary(logits.float()), state, prefixes)
        # The processors may remove every token of the draft vocabulary (a top-k or an allow-list outside it):
        # such a position then drafts token 0 with q = 1, which the verifier refuses unless the target agrees, so
        # the output stays exact.
        stuck = ~torch.isfinite(scores).any(-1)
        scores[..., 0] = torch.where(stuck, 0.0, scores[..., 0])
        return scores


def parent_ids(ancestors: torch.Tensor, node_ids: torch.Tensor) -> torch.Tensor:
    """[B, F] the parent of each node (-1: the root), from the ancestor-or-self relation [B, M, M] of round ids
    in which a parent's id is below its children's."""
    width = ancestors.shape[-1]
    rows = ancestors.gather(1, node_ids.clamp(min=0)[:, :, None].expand(-1, -1, width))
    ids = torch.arange(width, device=ancestors.device)
    proper = rows & (ids[None, None, :] != node_ids[:, :, None])
    return torch.where(proper, ids + 1, 0).amax(-1) - 1


def check_target(target, config) -> None:
    """Clear errors when the target cannot feed this head."""
    text = target.config.get_text_config()
    if text.hidden_size != config.target_hidden_size:
        raise ValueError(f"The EAGLE-3 head reads target states of size {config.target_hidden_size}, but the target's "
                         f"hidden size is {text.hidden_size}: use a head trained for this target.")
    if text.vocab_size != config.vocab_size:
        raise ValueError(f"The EAGLE-3 head embeds the target's vocabulary of {config.vocab_size} tokens, but the "
                         f"target has {text.vocab_size}: use a head trained for this target.")
    check_layer_ids(config.aux_hidden_state_layer_ids, text.num_hidden_layers)
