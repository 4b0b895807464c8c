"""NGramDrafter: prompt lookup over the row's own text (prompt + generated), zero model cost."""

from __future__ import annotations

import torch

from ..draft import Draft
from .base import DecodingState, Drafter, TreeConfig


class NGramDrafter(Drafter):
    """Draft by finding the row's latest n-gram earlier in its own text and copying what followed it.

    Args:
        max_ngram: longest suffix to match; shorter suffixes are tried down to `min_ngram` (longest match first).
        num_draft_tokens: tokens copied per round (overridden by `generate(num_assistant_tokens=...)`).
        min_ngram: shortest suffix worth matching.
        tree: with a `TreeConfig`, the continuations of up to `top_k` distinct earlier matches (most recent first)
            are merged into a trie of at most `depth` levels and `max_nodes` nodes.

    Drafts are deterministic, so the verifier treats q as one-hot; output is lossless under greedy and sampling.
    The lookup always reads the committed text, so accepted tokens are used from the next round on.
    """

    def __init__(self, max_ngram: int = 3, num_draft_tokens: int = 5, min_ngram: int = 1,
                 schedule: str = "constant", tree: TreeConfig | None = None):
        super().__init__(num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"NGramDrafter needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}.")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, state: DecodingState) -> Draft:
        lengths = self.chain_lengths(state) if self.tree is None else state.budget.clamp(max=self.tree.depth)
        rows = []
        for row in range(state.sequences.shape[0]):
            text = state.sequences[row, : int(state.lengths[row])][state.token_mask[row, : int(state.lengths[row])]]
            depth = int(lengths[row])
            matches = self._continuations(text, depth) if depth > 0 else []
            rows.append(matches)
        if self.tree is None:
            return _chain_draft(rows, state.sequences.device)
        return _trie_draft(rows, self.tree, state.sequences.device)

    def _continuations(self, text: torch.Tensor, depth: int) -> list[list[int]]:
        """Continuations of the most recent earlier occurrences of the longest matching suffix."""
        wanted = 1 if self.tree is None else self.tree.top_k
        length = text.shape[0]
        for size in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = text[length - size:]
            windows = text[: length - 1].unfold(0, size, 1)  # windows that have at least one token after them
            starts = (windows == suffix).all(-1).nonzero()[:, 0].flip(0)  # most recent first
            found, seen = [], set()
            for start in starts.tolist():
                continuation = text[start + size: start + size + depth].tolist()
                if continuation and tuple(continuation) not in seen:
                    seen.add(tuple(continuation))
                    found.append(continuation)
                if len(found) == wanted:
                    break
            if found:
                return found
        return []


def _chain_draft(rows: list[list[list[int]]], device) -> Draft:
    width = max((len(matches[0]) for matches in rows if matches), default=0)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for row, matches in enumerate(rows):
        if matches:
            tokens[row, : len(matches[0])] = torch.tensor(matches[0])
            lengths[row] = len(matches[0])
    return Draft.chain(tokens.to(device), lengths=lengths.to(device))


def _trie_draft(rows: list[list[list[int]]], tree: TreeConfig, device) -> Draft:
    """Merge each row's continuations into a trie (breadth-first node order, so parents precede children)."""
    tries = []
    for matches in rows:
        nodes: dict[tuple, int] = {}
        order: list[tuple] = []
        for level in range(max((len(m) for m in matches), default=0)):
            for continuation in matches:
                key = tuple(continuation[: level + 1])
                if len(continuation) > level and key not in nodes and len(order) < tree.max_nodes:
                    nodes[key] = len(order)
                    order.append(key)
        tries.append((nodes, order))
    width = max((len(order) for _, order in tries), default=0)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    parents = torch.full((len(rows), width), -1, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, (nodes, order) in enumerate(tries):
        for index, key in enumerate(order):
            tokens[row, index] = key[-1]
            parents[row, index] = nodes[key[:-1]] if len(key) > 1 else -1
            valid[row, index] = True
    return Draft(tokens.to(device), parents.to(device), valid.to(device), max_depth=tree.depth,
                 max_children=tree.top_k)
