"""SortedDrafter (SD2): one causal LM whose first `e` layers, for each `e` in `exits`, are each a drafter.

Each drafted token (each tree level, for trees) runs the layers up to the first exit; if the drafter's processed
distribution there is confident enough (max probability >= the exit's threshold) the token is drawn from it,
otherwise the next segment of layers runs, and so on; the last exit always accepts. All exits share the final
norm and the LM head, as SoFT trains them.

Deferred KV: a token that exited at layer e has no KV in the layers after e. Its hidden state at e is kept
("pending" for the next segment); when a later token needs that segment, the pending states run through it first,
in order, in the same forward. So every distribution equals what the model truncated to that exit would give on
the same prefix. Committed tokens are run through every segment when the next round starts (one batched forward
per segment), and rejected tokens' pending states are simply dropped.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from transformers import AutoModelForCausalLM

from ..cache import SlotCache, SlotKVCache, right_aligned_order
from ..compat import cache_argument
from ..draft import Draft
from .base import DecodingState, TreeConfig
from .model import ModelDrafter


class SortedDrafter(ModelDrafter):
    """Adaptive-depth drafting with the exits of one model.

    Args:
        model: a Llama/Qwen/Mistral-style causal LM (decoder `.layers`, `.norm`, `.embed_tokens`, `.rotary_emb`).
        exits: increasing layer counts, e.g. `[6, 9, 12]`; each is a sub-model (first `e` layers + norm + head).
        thresholds: one confidence threshold in [0, 1] per exit but the last (a value for the last exit is allowed
            and ignored, as SoFT checkpoints record one per exit). Default 0.5.
        num_draft_tokens, schedule, tree: as for `ModelDrafter`; with a tree the gate is applied per level over
            the whole frontier (the most confident node of the level decides), as in the SD2 paper.
        deep_rows: "needing" runs a deeper segment only for the rows whose token goes that deep (a smaller batch);
            "all" runs it for the whole batch with the other rows' queries masked out (one fixed-shape forward,
            no KV copies). See README for the measured trade-off.
    """

    distributions_read_the_frontier = True  # the exit gate takes the most confident node of the whole level

    def __init__(self, model, exits, thresholds=None, num_draft_tokens: int = 5, schedule: str = "constant",
                 tree: TreeConfig | None = None, deep_rows: str = "needing"):
        super().__init__(model, num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)
        self.parts = _DecoderParts(model)
        self.exits = _validate_exits(exits, len(self.parts.layers))
        self.thresholds = _validate_thresholds(thresholds, self.exits)
        if deep_rows not in ("needing", "all"):
            raise ValueError(f"deep_rows must be 'needing' or 'all', got {deep_rows!r}.")
        self.deep_rows = deep_rows
        self.exit_counts: dict[int, int] = {}

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, exits=None, thresholds=None, num_draft_tokens: int = 5,
                        schedule: str = "constant", tree: TreeConfig | None = None, **model_kwargs):
        """Load any causal LM checkpoint as a sorted drafter; exits/thresholds saved by SoFTTrainer or
        `save_pretrained` (`config.sorted_exits`, `config.sorted_exit_thresholds`) are used when not given."""
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **model_kwargs)
        exits = exits if exits is not None else getattr(model.config, "sorted_exits", None)
        if exits is None:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not record its exits (config.sorted_exits); pass them, e.g. "
                "SortedDrafter.from_pretrained(path, exits=[6, 9, 12])."
            )
        if thresholds is None:
            thresholds = getattr(model.config, "sorted_exit_thresholds", None)
        return cls(model.eval(), exits, thresholds, num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)

    @classmethod
    def from_target(cls, target, exits, thresholds=None, **kwargs):
        """Self-speculation: draft with the target's own first layers (weights shared, no copy; own cache)."""
        return cls(target, exits, thresholds, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the model with its exits and thresholds in the config (loads back with `from_pretrained`)."""
        with self._exits_in_config():
            self.model.save_pretrained(save_directory, **kwargs)

    def save_exit(self, save_directory, exit_layer: int | None = None, **kwargs) -> None:
        """Save the draft model cut at one exit (default: the first) as a plain causal LM: its first `exit_layer`
        decoder layers, the final norm and the LM head, as this drafter drafts at that exit. It loads with
        `AutoModelForCausalLM` and serves as a draft model anywhere (vLLM's `speculative_config={"model": ...}`)."""
        import copy

        exit_layer = self.exits[0] if exit_layer is None else exit_layer
        if exit_layer not in self.exits:
            raise ValueError(f"exit_layer={exit_layer} is not one of this drafter's exits {list(self.exits)}.")
        config = copy.deepcopy(self.model.config)
        text = config.get_text_config()
        text.num_hidden_layers = exit_layer
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = text.layer_types[:exit_layer]
        for name in ("sorted_exits", "sorted_exit_thresholds"):
            if hasattr(config, name):
                delattr(config, name)
        kept = {key: value for key, value in self.model.state_dict().items()
                if not _beyond_exit(key, exit_layer)}
        cut = type(self.model)._from_config(config, dtype=self.model.dtype)
        cut.load_state_dict(kept, strict=True)
        cut.generation_config = copy.deepcopy(self.model.generation_config)
        cut.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        with self._exits_in_config():
            return self.model.push_to_hub(repo_id, **kwargs)

    def _exits_in_config(self):
        drafter = self

        class _Scope:
            def __enter__(self):
                config = drafter.model.config
                self.saved = {name: getattr(config, name, None) for name in ("sorted_exits", "sorted_exit_thresholds")}
                config.sorted_exits = list(drafter.exits)
                config.sorted_exit_thresholds = list(drafter.thresholds)

            def __exit__(self, *exc):
                for name, value in self.saved.items():
                    if value is None:
                        delattr(drafter.model.config, name)
                    else:
                        setattr(drafter.model.config, name, value)

        return _Scope()

    # ------------------------------------------------------------------ per-call state
    def _new_cache(self, batch_size: int, capacity: int, compiled_call) -> SlotCache:
        shared = SlotKVCache(batch_size, capacity)  # segments run layer by layer: never compiled as a whole
        bounds = [0, *self.exits]
        self.segments = [
            SlotCache(self.model, batch_size, capacity, self.device, run=self._segment_runner(start, end),
                      layers=range(start, end), cache=shared, max_round_nodes=self.round_capacity)
            for start, end in pairwise(bounds)
        ]
        hidden_size = self.model.config.get_text_config().hidden_size
        self.pending = [None] + [_Pending(batch_size, hidden_size, self.device, self.model.dtype)
                                 for _ in self.segments[1:]]
        self.exit_counts = {exit_layer: 0 for exit_layer in self.exits}
        self._level_exits: list[torch.Tensor] = []
        return self.segments[0]

    def _prefill(self, tokens, valid):
        self._committed_cascade(tokens.to(self.device), valid.to(self.device))
        self.forward_count = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)  # segment 0 and `fed`
        rows = rows.to(self.device)
        for segment in self.segments[1:]:
            segment.select_rows(rows)
        for pending in self.pending[1:]:
            pending.select_rows(rows)

    def finish(self) -> None:
        super().finish()
        self.segments, self.pending = [], []

    # ------------------------------------------------------------------ scoring with the exit cascade
    def propose(self, state: DecodingState) -> Draft:
        self._level_exits = []
        return super().propose(state)

    def _root_scores(self, state: DecodingState) -> torch.Tensor:
        tokens, valid = self._pending_committed(state)
        for segment in self.segments:
            segment.tighten(state.host_text_length)
        exit_hidden = self._committed_cascade(tokens.to(self.device), valid.to(self.device))
        return self._gate(lambda k, needing: exit_hidden[k][:, -1:], state, state.root_prefixes())[:, 0]

    def _node_scores(self, tokens, node_ids, depths, ancestors, state, prefixes) -> torch.Tensor:
        self._fed_tentative = True
        self._ancestors = ancestors
        first = self._timed(self.segments[0].forward_tentative, self._embeddable(tokens), node_ids, depths, ancestors)
        count = tokens.shape[1]
        if len(self.segments) > 1:
            self.pending[1].append(first, node_ids, depths, torch.ones_like(node_ids, dtype=torch.bool))

        def exit_hidden(k: int, needing: torch.Tensor) -> torch.Tensor:
            return first if k == 0 else self._flush(k, needing)[:, -count:]

        return self._gate(exit_hidden, state, prefixes)

    def _gate(self, exit_hidden, state: DecodingState, prefixes) -> torch.Tensor:
        """Scores [B, F, V] from the first exit whose processed distribution is confident enough, per row."""
        batch_size = state.sequences.shape[0]
        needing = torch.ones(batch_size, dtype=torch.bool, device=self.device)
        chosen = None
        exit_index = torch.full((batch_size,), len(self.exits) - 1, dtype=torch.long, device=self.device)
        for k in range(len(self.exits)):
            hidden = exit_hidden(k, needing)
            logits = self.parts.head(self.parts.norm(hidden))
            scores = self._process(logits, state, prefixes)
            last = k == len(self.exits) - 1
            if last:
                take = needing
            else:  # the level's most confident node decides, per row
                confidence = scores.softmax(-1).amax(-1).amax(-1).to(self.device)
                take = needing & (confidence >= self.thresholds[k])
            taken = take.to(scores.device)[:, None, None]
            chosen = scores if chosen is None else torch.where(taken, scores, chosen)
            exit_index = torch.where(take, k, exit_index)
            needing = needing & ~take
            if not bool(needing.any()):
                break
        self._level_exits.append(exit_index)
        return chosen

    # ------------------------------------------------------------------ segments and deferred KV
    def _segment_runner(self, start: int, end: int):
        layers = self.parts.layers[start:end]

        def run(inputs, attention_mask, position_ids, cache, **unused):
            hidden = self.parts.embed(inputs.to(self.device)) if start == 0 else inputs
            position_embeddings = self.parts.rotary(hidden, position_ids)
            for layer in layers:
                output = layer(hidden, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                               position_embeddings=position_embeddings, **{cache_argument(layer): cache})
                hidden = output[0] if isinstance(output, tuple) else output
            return hidden

        return run

    def _committed_cascade(self, tokens, valid) -> list[torch.Tensor]:
        """Run committed tokens through every segment, each segment taking its older pending states first.
        Returns the hidden states at every exit ([B, W_k, H], right-aligned: the last column is the newest)."""
        hidden = self._timed(self.segments[0].forward_committed, self._embeddable(tokens), valid)
        outputs = [hidden]
        for k in range(1, len(self.segments)):
            older, older_valid = self.pending[k].take_committed()
            chunk, chunk_valid = _right_align(torch.cat([older_valid, valid], 1), torch.cat([older, hidden], 1))
            hidden = self._timed(self.segments[k].forward_committed, chunk, chunk_valid)
            valid = chunk_valid
            outputs.append(hidden)
        return outputs

    def _flush(self, k: int, needing: torch.Tensor) -> torch.Tensor:
        """Run segment k for the rows that need it on their pending (tentative) states, oldest first; the
        outputs become pending for segment k + 1. Returns [B, P, H] right-aligned (newest last)."""
        hidden, nodes, depths, valid = self.pending[k].take(needing)
        hidden, nodes, depths, valid = _right_align(valid, hidden, nodes, depths)
        nodes = torch.where(valid, nodes, -1)
        segment = self.segments[k]
        if self.deep_rows == "needing":  # the other rows' queries would all be holes: skip their compute
            output = self._timed(segment.forward_tentative_rows, needing.nonzero()[:, 0], hidden, nodes, depths,
                                 self._ancestors)
        else:
            output = self._timed(segment.forward_tentative, hidden, nodes, depths, self._ancestors)
        if k + 1 < len(self.segments):
            self.pending[k + 1].append(output, nodes, depths, valid)
        return output

    # ------------------------------------------------------------------ after verification
    def accept(self, state: DecodingState, draft: Draft, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        self._count_exits(draft)
        if not self._fed_tentative:  # nothing fed this round (catch-up only)
            super().accept(state, draft, path, num_accepted)
            return
        accepted = self._accepted_node_ids(path)
        num_accepted = num_accepted.to(self.device)
        for segment in self.segments[1:]:
            segment.keep_path(accepted, num_accepted, in_place=self.tree is None)
        in_path = torch.arange(accepted.shape[1], device=self.device) < num_accepted[:, None]
        for pending in self.pending[1:]:
            pending.commit_accepted(torch.where(in_path, accepted, -2))
        super().accept(state, draft, path, num_accepted)  # segment 0, `fed`, schedule

    def _count_exits(self, draft: Draft) -> None:
        if not self._level_exits or not bool(draft.valid.any()):
            return
        levels = torch.stack(self._level_exits, dim=1)  # [B, levels]: the exit that scored each level's children
        node_exit = levels.gather(1, (draft.depths() - 1).clamp(max=levels.shape[1] - 1).to(self.device))
        for k, exit_layer in enumerate(self.exits):
            self.exit_counts[exit_layer] += int(((node_exit == k) & draft.valid.to(self.device)).sum())


class _Pending:
    """Hidden states waiting for a segment: per row, entries 0..count-1 in sequence order. node -1 = committed."""

    def __init__(self, batch_size, hidden_size, device, dtype):
        self.hidden = torch.zeros(batch_size, 0, hidden_size, device=device, dtype=dtype)
        self.nodes = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.depths = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    def append(self, hidden, nodes, depths, valid):
        self.hidden = torch.cat([self.hidden, hidden], 1)
        self.nodes = torch.cat([self.nodes, nodes], 1)
        self.depths = torch.cat([self.depths, depths], 1)
        self.valid = torch.cat([self.valid, valid], 1)
        self._squeeze()

    def take(self, rows: torch.Tensor):
        """Everything pending for the given rows (other rows' entries come back invalid and stay pending)."""
        taken_valid = self.valid & rows[:, None]
        result = (self.hidden, self.nodes, self.depths, taken_valid)
        self.valid = self.valid & ~rows[:, None]
        self._squeeze()
        return result

    def take_committed(self):
        committed = self.valid & (self.nodes < 0)
        result = (self.hidden, committed)
        self.valid = self.valid & ~committed
        self._squeeze()
        return result

    def commit_accepted(self, accepted_nodes: torch.Tensor):
        """Accepted tentative entries become committed; rejected ones are dropped (their KV is never needed)."""
        is_accepted = (self.nodes[:, :, None] == accepted_nodes[:, None, :]).any(-1) & (self.nodes >= 0)
        self.valid = self.valid & ((self.nodes < 0) | is_accepted)
        self.nodes = torch.where(is_accepted, -1, self.nodes)
        self._squeeze()

    def select_rows(self, rows):
        self.hidden, self.nodes, self.depths, self.valid = (
            self.hidden[rows], self.nodes[rows], self.depths[rows], self.valid[rows])

    def _squeeze(self):
        """Drop columns no row uses (keeps the buffers as small as the longest row's pending list)."""
        used = self.valid.any(0)
        if bool(used.all()):
            return
        keep = used.nonzero()[:, 0]
        self.hidden, self.nodes, self.depths, self.valid = (
            self.hidden[:, keep], self.nodes[:, keep], self.depths[:, keep], self.valid[:, keep])


def _right_align(valid, *tensors):
    """Move each row's valid entries to the right end (stable), so column -1 is every row's newest entry.
    Returns the reordered `tensors` (each [B, W, ...]) followed by the reordered mask."""
    order = right_aligned_order(valid)
    moved = [t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t)) for t in tensors]
    return (*moved, valid.gather(1, order))


class _DecoderParts:
    """The pieces of a Llama/Qwen/Mistral-style causal LM that the exit cascade calls directly."""

    def __init__(self, model):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        missing = [name for name in ("layers", "norm", "embed_tokens", "rotary_emb") if not hasattr(decoder, name)]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is None or missing or head is None:
            raise ValueError(
                f"SortedDrafter needs a Llama/Qwen/Mistral-style causal LM (a decoder with layers, norm, "
                f"embed_tokens and rotary_emb, plus an LM head); {type(model).__name__} lacks {missing or 'a head'}."
            )
        self.layers, self.norm, self.embed, self.rotary, self.head = (
            decoder.layers, decoder.norm, decoder.embed_tokens, decoder.rotary_emb, head)


def _validate_exits(exits, num_layers: int) -> list[int]:
    exits = [int(e) for e in (exits or [])]
    if not exits:
        raise ValueError("SortedDrafter needs at least one exit, e.g. exits=[6, 9, 12].")
    if any(b <= a for a, b in pairwise(exits)) or exits[0] < 1 or exits[-1] > num_layers:
        raise ValueError(
            f"exits must be strictly increasing layer counts between 1 and the model's {num_layers} layers; "
            f"got {exits}."
        )
    return exits


def _validate_thresholds(thresholds, exits) -> list[float]:
    if thresholds is None:
        return [0.5] * (len(exits) - 1)
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) == len(exits):  # SoFT checkpoints record one per exit; the last exit always accepts
        thresholds = thresholds[:-1]
    if len(thresholds) != len(exits) - 1 or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(
            f"thresholds needs one probability in [0, 1] per exit but the last ({len(exits) - 1} for exits "
            f"{exits}); got {thresholds}."
        )
    return thresholds


def _beyond_exit(key: str, exit_layer: int) -> bool:
    """Whether a state-dict key belongs to a decoder layer at or past `exit_layer` (`...layers.<i>.`)."""
    parts = key.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == "layers" and parts[index + 1].isdigit():
            return int(parts[index + 1]) >= exit_layer
    return False
