"""Apply a generation's `LogitsProcessorList` to every position of a draft tree with that position's true prefix.

Plain `generate()` calls each processor once per step with the whole text so far. A draft tree asks for many
positions at once, each with its own prefix (the row's committed text plus the node's root-to-node path), and
rows of a batch have different lengths. Processors that read `input_ids` (repetition penalty, no-repeat-ngram,
min length, bad words, user processors, ...) are therefore called once per distinct prefix length with exactly the
prefixes of that length. Processors known not to read `input_ids` at all (temperature, top-k/p, min-p, typical,
epsilon, eta, suppress-tokens, ...) are applied to all positions in one call: row-wise functions of the scores,
so the result is identical to the per-position call.
"""

from __future__ import annotations

import torch
from transformers.generation import logits_process as lp

# Exact types whose __call__ ignores `input_ids` (contents and shape); checked against the installed source.
ROW_WISE_PROCESSORS = tuple(
    getattr(lp, name)
    for name in (
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "InfNanRemoveLogitsProcessor",
        "LogitNormalization",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(lp, name)
)


def is_row_wise(processor) -> bool:
    return type(processor) in ROW_WISE_PROCESSORS


class TreePrefixes:
    """The prefix of every (row, position) of a round: `committed[b, :lengths[b]]` followed by the position's path.

    committed: [B, T] token buffer; lengths: [B] committed length per row (the root is the last committed token);
    paths: [B, Q, D] path tokens after the root for each position; depths: [B, Q] their number (0 for the root).
    """

    def __init__(self, committed, lengths, paths, depths, row_ids=None, batch_size=None):
        self.committed, self.lengths, self.paths, self.depths = committed, lengths, paths, depths
        # rows of the generate() call these prefixes belong to (finished rows are gone), for per-row processor state
        self.row_ids = row_ids if row_ids is not None else torch.arange(len(lengths), device=lengths.device)
        self.batch_size = batch_size if batch_size is not None else len(lengths)

    def prefix_lengths(self) -> torch.Tensor:
        return self.lengths[:, None] + self.depths

    def gather(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """[G, length] prefixes of the selected (row, position) pairs, all of total length `length`."""
        index = torch.arange(length, device=self.committed.device)[None, :]
        committed_len = self.lengths[rows][:, None]
        from_committed = self.committed[rows].gather(1, index.clamp(max=self.committed.shape[1] - 1).expand(len(rows), -1))
        path_index = (index - committed_len).clamp(min=0, max=max(self.paths.shape[-1] - 1, 0))
        if self.paths.shape[-1]:
            from_path = self.paths[rows, positions].gather(1, path_index)
        else:
            from_path = from_committed
        return torch.where(index < committed_len, from_committed, from_path)


def apply_processors(processors, scores: torch.Tensor, prefixes: TreePrefixes) -> torch.Tensor:
    """scores: [B, Q, V] raw logits (float32) → processed scores, position by position with true prefixes."""
    if not processors:
        return scores
    batch_size, num_positions, vocab = scores.shape
    flat = scores.reshape(batch_size * num_positions, vocab)
    groups = None
    for processor in processors:
        if is_row_wise(processor):
            flat = processor(None, flat)
            continue
        if groups is None:
            groups = _group_by_prefix_length(prefixes)
        flat = flat.clone()
        for length, rows, positions in groups:
            input_ids = prefixes.gather(rows, positions, length)
            flat_index = rows * num_positions + positions
            with _per_row_state(processor, prefixes.row_ids[rows], prefixes.batch_size):
                flat[flat_index] = processor(input_ids, flat[flat_index])
    return flat.reshape(batch_size, num_positions, vocab)


class _per_row_state:
    """Some processors keep per-row tensors built for the whole batch of the generate() call (e.g. the repetition
    penalty's `prompt_ignore_length`, one entry per row). While a processor sees a subset of rows, those tensors are
    swapped for the matching entries."""

    def __init__(self, processor, row_ids, batch_size):
        self.processor, self.row_ids, self.batch_size = processor, row_ids, batch_size
        self.saved = {}

    def __enter__(self):
        for name, value in vars(self.processor).items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.batch_size \
                    and self.batch_size > 1:
                self.saved[name] = value
                setattr(self.processor, name, value[self.row_ids.to(value.device)])

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.processor, name, value)


def _group_by_prefix_length(prefixes: TreePrefixes):
    lengths = prefixes.prefix_lengths()
    groups = []
    for length in torch.unique(lengths).tolist():
        rows, positions = (lengths == length).nonzero(as_tuple=True)
        groups.append((int(length), rows, positions))
    return groups
