"""The drafter interface: the engine never asks which drafter it has."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..draft import Draft
from ..processors import BatchText, TreePrefixes, reads_input_ids
from ..schedule import AutoSchedule
from ..stats import PhaseClock, SpecStats

TREE_SAMPLING_RULES = ("recursive", "top_k")


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2-style dynamic draft tree.

    depth:     how many levels below the root are drafted.
    top_k:     most children per expanded node, and frontier nodes expanded per level.
    max_nodes: at most how many drafted nodes the target verifies.
    sampling:  how children are chosen under `do_sample=True` (greedy trees always take the top-k):
               "recursive" (default): drawn from the drafter's distribution without replacement and verified by
               recursive rejection; a node gets as many children as its `coverage` asks for, and the tree always
               contains the sampled chain of `depth` tokens it replaces (`hf_specdec.drafters.trees`);
               "top_k": the top-k children of greedy trees, accepted with the target's probability of each token
               (the construction before 0.3; kept for comparison).
    coverage:  with sampling="recursive", a node wants the fewest children whose draft probabilities (most likely
               first) add up to this mass, at most `top_k`: a confident drafter drafts a chain, an unsure one
               branches.
    sibling_temperature: with sampling="recursive", a node's first child is drawn from the draft distribution q
               (the chain's token) and its later siblings from q^(1/t), renormalised, without the earlier siblings;
               each is verified against the distribution it was drawn from, so any value is exact. A sibling is
               only tried after the first child was refused, where the target wants more than the draft gave: for
               a drafter less confident than its target that is mostly the draft's likely tokens, and t < 1 (e.g.
               0.33) raises how often siblings are accepted; for an over-confident one it lowers it (docs/lab.md
               measures both). 1.0 (default) draws every sibling from q.
    """

    depth: int = 5
    top_k: int = 4
    max_nodes: int = 24
    sampling: str = "recursive"
    coverage: float = 0.9
    sibling_temperature: float = 1.0

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1:
            raise ValueError(f"TreeConfig needs depth >= 1 and top_k >= 1, got depth={self.depth}, top_k={self.top_k}.")
        most = self.top_k + (self.depth - 1) * self.top_k * self.top_k
        if not 1 <= self.max_nodes <= most:
            raise ValueError(
                f"TreeConfig(max_nodes={self.max_nodes}) must be between 1 and {most}, the number of nodes a tree of "
                f"depth={self.depth} and top_k={self.top_k} drafts; lower max_nodes or raise depth/top_k."
            )
        if self.sampling not in TREE_SAMPLING_RULES:
            raise ValueError(f"TreeConfig(sampling={self.sampling!r}) must be one of {TREE_SAMPLING_RULES}.")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"TreeConfig(coverage={self.coverage}) must be in (0, 1]: the draft mass a node's "
                             "children should cover.")
        if not self.sibling_temperature > 0.0:
            raise ValueError(f"TreeConfig(sibling_temperature={self.sibling_temperature}) must be > 0: the "
                             "temperature later siblings are drawn at (1.0 = the draft distribution itself).")


@dataclass
class DecodingState:
    """What the engine shares with the drafter each round (rows = the still-active rows of the batch).

    sequences: [B, T] committed tokens, left-padded prompt first (`token_mask` marks real tokens).
    lengths:   [B] committed length per row; the last committed token is the root of the next draft.
    budget:    [B] the deepest draft worth verifying per row (remaining new tokens - 1); -1 for rows that
               finished and wait, masked, for the next compaction (they draft nothing).
    """

    sequences: torch.Tensor
    token_mask: torch.Tensor
    lengths: torch.Tensor
    budget: torch.Tensor
    logits_processor: list
    do_sample: bool
    vocab_size: int
    row_ids: torch.Tensor  # index of each active row in the generate() call's batch
    batch: BatchText  # every row of the generate() call (after num_return_sequences expansion)
    target_config: object = None
    # target states at `target_hidden_layers`: [B, L, H] at the last accepted position (target_hidden_scope "last"),
    # or [B, W, L, H] at the text columns `c0 .. c0 + W - 1` ("accepted"): after the prefill every prompt column
    # (c0 = 0), after a round the root and the accepted path (c0 = the root's column; entries past the path are
    # filler). See `Drafter.target_hidden_scope`.
    target_hidden: torch.Tensor | None = None
    # prompt columns the drafter starts from: the whole left-padded prompt, or (where the target reads the prompt in
    # the first round's forward) all of it but the last column, which is then that round's root
    prompt_length: int = 0
    host_text_length: int = 0  # an upper bound of lengths.max(), known on the host
    clock: PhaseClock | None = None  # time a drafter's model forwards with `with state.clock("draft_forward")`
    compile_config: object = None  # a transformers CompileConfig: capture fixed-shape forwards with torch.compile
    prompt_features: torch.Tensor | None = None  # [B, H] prefill states at `prompt_feature_layer`, pooled per prompt
    # whether a logits processor reads `input_ids`: without one, prefixes are never built (None stands for them)
    reads_text: bool = field(init=False)

    def __post_init__(self):
        self.reads_text = reads_input_ids(self.logits_processor)

    def prefixes(self, paths: torch.Tensor, depths: torch.Tensor):
        """Per-position prefixes (committed text + `paths`) for applying the logits processors."""
        return TreePrefixes(self.batch, self.row_ids, self.lengths, paths, depths)

    def root_prefixes(self):
        """The prefixes of the one position after each row's text (the distribution of the root's children); None
        when no processor reads them."""
        if not self.reads_text:
            return None
        rows = len(self.lengths)
        return self.prefixes(self.sequences.new_zeros(rows, 1, 0), self.lengths.new_zeros(rows, 1))


SCHEDULES = ("constant", "heuristic", "auto")


def heuristic_cap(num_draft_tokens: int) -> int:
    """The `schedule="heuristic"` draft length grows by 2 per fully accepted round, up to this."""
    return max(16, 2 * num_draft_tokens)


class Drafter(ABC):
    """Base class of every hf_specdec drafter.

    A drafter proposes a `Draft` for every active row, is told what the target accepted, and drops rows that
    finished. Its own state (a KV cache, n-gram tables, ...) must follow the committed text exactly.
    """

    #: target layers whose hidden states the drafter needs from every verify forward (guided drafters)
    target_hidden_layers: tuple[int, ...] = ()
    #: "last": the states at each row's last accepted position (guided drafters); "accepted": at every position
    #: the target committed, prompt included (EAGLE-3 heads read one state per committed token)
    target_hidden_scope: str = "last"
    #: a `hidden_states` index the engine mean-pools over each prompt's real tokens at prefill into
    #: `state.prompt_features` (routers read the prompt from the target's own prefill)
    prompt_feature_layer: int | None = None

    def __init__(self, num_draft_tokens: int = 5, schedule: str = "constant", tree: TreeConfig | None = None):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if tree is not None and not isinstance(tree, TreeConfig):
            raise TypeError(f"tree must be a hf_specdec.TreeConfig, got {type(tree).__name__}.")
        if tree is not None and schedule == "auto":
            raise ValueError("schedule='auto' chooses a chain's draft length; use it without `tree=`.")
        self.num_draft_tokens = num_draft_tokens
        self.schedule = schedule
        self.tree = tree
        # the cost model and acceptance of schedule="auto" live as long as the drafter (see schedule.py)
        self.auto = AutoSchedule(num_draft_tokens) if schedule == "auto" else None
        self.last_stats: SpecStats | None = None
        self._row_draft_tokens: torch.Tensor | None = None

    # -- lifecycle, called by the engine --------------------------------------------------------------------
    def bind(self, target) -> None:
        """Called first in every generate(), before the engine reads `target_hidden_layers`: a drafter whose needs
        depend on the target (e.g. default layers) settles them here."""

    def start(self, target, state: DecodingState, num_draft_tokens: int | None = None) -> None:
        """Called once per generate() after the target's prefill. Validate, build per-call state."""
        self.draft_length = num_draft_tokens or self.num_draft_tokens
        self.round_length = self.draft_length  # this round's length for every row (constant and auto schedules)
        self._row_draft_tokens = torch.full((state.sequences.shape[0],), self.draft_length, dtype=torch.long)

    @property
    def drafts_chains_only(self) -> bool:
        """Every draft is a chain (then the target can read the prompt in the first round's causal forward); a
        drafter that says so wrongly only costs that round a separate prefill."""
        return getattr(self, "tree", None) is None

    def max_round_nodes(self, num_draft_tokens: int | None = None) -> int:
        """The most draft nodes one round can propose (sizes caches and the fixed shape of captured forwards)."""
        if self.tree is not None:
            return self.tree.max_nodes
        length = num_draft_tokens or self.num_draft_tokens
        return heuristic_cap(length) if self.schedule == "heuristic" else length

    @abstractmethod
    def propose(self, state: DecodingState) -> Draft:
        """Draft trees (or chains) for every row of `state`."""

    def accept(self, state: DecodingState, draft: Draft, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Told what the target accepted this round (before the new tokens are appended to `state`)."""
        if self.schedule == "heuristic" and self.tree is None:
            lengths = self._row_draft_tokens
            full = num_accepted.cpu() >= draft.valid.sum(-1).cpu()  # the one schedule that reads the device
            grown = (lengths + 2).clamp(max=heuristic_cap(self.draft_length))
            drafted = state.budget.cpu() >= 0  # rows that finished (or that another drafter drafts) keep theirs
            self._row_draft_tokens = torch.where(drafted, torch.where(full, grown, (lengths - 1).clamp(min=1)),
                                                 lengths)

    def set_draft_length(self, length: int) -> None:
        """Every row drafts `length` tokens next round (0: no drafting at all); used by schedule="auto"."""
        self.round_length = length
        self._row_draft_tokens.fill_(length)

    def fall_behind(self, tokens: int) -> None:
        """Some rows' committed text may grow by up to `tokens` tokens that `accept()` does not show this drafter
        (another drafter drafted them, or the target decoded alone); a drafter with a cache of the text widens its
        next catch-up by that much. Stateless drafters ignore it."""

    def select_rows(self, rows: torch.Tensor) -> None:
        self._row_draft_tokens = self._row_draft_tokens[rows.cpu()]

    def finish(self) -> None:
        """Release per-call state (caches) once generate() returns."""

    # -- helpers --------------------------------------------------------------------------------------------
    def chain_steps(self) -> int:
        """The longest draft of this round, known on the host (the heuristic schedule reads its row lengths)."""
        return int(self._row_draft_tokens.max()) if self.schedule == "heuristic" else self.round_length

    def chain_lengths(self, state: DecodingState) -> torch.Tensor:
        """Per-row draft length this round: the schedule's length capped by the row's remaining budget."""
        return torch.minimum(self._row_draft_tokens.to(state.budget.device), state.budget).clamp(min=0)

    def with_tree(self, tree: TreeConfig):
        """A copy of this drafter that drafts trees of the given shape."""
        import copy

        if self.auto is not None:
            raise ValueError("schedule='auto' chooses a chain's draft length; use it without a tree.")
        clone = copy.copy(self)
        TreeConfig.__post_init__(tree)
        clone.tree = tree
        clone.last_stats = None
        return clone
