"""Apply a generation's `LogitsProcessorList` to every position of a draft tree with that position's true prefix.

Plain `generate()` calls each processor once per step with the whole batch, every row at the same length. A draft
tree asks for many positions at once, each with its own prefix (the row's committed text plus the node's
root-to-node path), and rows of a batch are at different lengths. How a processor can be applied then depends on
what it reads, so every processor transformers ships is listed in `PROCESSOR_RULES` with one of four ways:

- `SCORES`: ignores `input_ids` (temperature, top-k/p, min-p, ...): one call over every position of every row.
- `PREFIX`: a pure function of one row's prefix (repetition penalty, no-repeat-ngram, min length, bad words, ...):
  called once per prefix length with exactly the prefixes of that length, whichever rows they belong to.
  Attributes named in `per_row` hold one entry per row of the generate() call (the repetition penalty's padding
  offsets); during a call they are narrowed to the rows in it.
- `BATCH`: needs the row's place in the batch (`PrefixConstrainedLogitsProcessor` passes it to
  `prefix_allowed_tokens_fn`): called with the whole batch of the generate() call, as plain `generate()` does,
  once per prefix length and sibling. Row b of `input_ids` is row b's prefix at that position when row b has one
  there; other rows show their text cut or pad-extended to that length (as plain shows finished rows) and their
  scores are discarded. Processors that are not transformers' own (a user's) are applied this way.
- `REFUSED`: keeps state across calls or runs a model itself (classifier-free guidance, SynthID watermarking),
  so scoring many speculative positions per call cannot reproduce it. `check_processors` names the generate()
  argument that added it.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from transformers.generation import logits_process


class How(enum.Enum):
    SCORES = "scores only"
    PREFIX = "each row's prefix"
    BATCH = "whole batch, row by row"
    REFUSED = "refused"


@dataclass(frozen=True)
class ProcessorRule:
    how: How
    why: str  # what the processor reads, i.e. why it is applied this way (README's table comes from here)
    per_row: tuple[str, ...] = ()  # PREFIX: attributes with one entry per row of the generate() call
    argument: str | None = None  # REFUSED: the generate() argument that adds it


def _scores(why="reads only the scores"):
    return ProcessorRule(How.SCORES, why)


def _prefix(why, per_row=()):
    return ProcessorRule(How.PREFIX, why, per_row)


def _refused(why, argument):
    return ProcessorRule(How.REFUSED, why, argument=argument)


# Every processor in transformers.generation.logits_process (5.20-5.25), by class name. Checked against the source:
# a SCORES processor must never touch `input_ids`; a PREFIX one must read nothing but the rows' prefixes.
PROCESSOR_RULES: dict[str, ProcessorRule] = {
    "TemperatureLogitsWarper": _scores(),
    "TopKLogitsWarper": _scores(),
    "TopPLogitsWarper": _scores(),
    "TopHLogitsWarper": _scores(),
    "MinPLogitsWarper": _scores(),
    "TypicalLogitsWarper": _scores(),
    "EpsilonLogitsWarper": _scores(),
    "EtaLogitsWarper": _scores(),
    "InfNanRemoveLogitsProcessor": _scores(),
    "LogitNormalization": _scores(),
    "SuppressTokensLogitsProcessor": _scores(),
    "BarkEosPrioritizerLogitsProcessor": _scores(),
    "RepetitionPenaltyLogitsProcessor": _prefix("penalises the prefix's tokens (padding offsets per row)",
                                                per_row=("prompt_ignore_length",)),
    "NoRepeatNGramLogitsProcessor": _prefix("bans n-grams of the prefix"),
    "SequenceBiasLogitsProcessor": _prefix("matches the prefix's last tokens"),
    "NoBadWordsLogitsProcessor": _prefix("matches the prefix's last tokens"),
    "MinLengthLogitsProcessor": _prefix("reads the prefix length"),
    "MinNewTokensLengthLogitsProcessor": _prefix("reads the prefix length"),
    "ForcedBOSTokenLogitsProcessor": _prefix("reads the prefix length"),
    "ForcedEOSTokenLogitsProcessor": _prefix("reads the prefix length"),
    "ExponentialDecayLengthPenalty": _prefix("reads the prefix length"),
    "SuppressTokensAtBeginLogitsProcessor": _prefix("reads the prefix length"),
    "AlternatingCodebooksLogitsProcessor": _prefix("reads the prefix length"),
    "WatermarkLogitsProcessor": _prefix("seeds its green list from the prefix"),
    "PrefixConstrainedLogitsProcessor": ProcessorRule(How.BATCH, "calls prefix_allowed_tokens_fn(batch_id, prefix)"),
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": _refused(
        "runs the model on the negative prompt with a cache of its own, one token per call", "guidance_scale"),
    "ClassifierFreeGuidanceLogitsProcessor": _refused("needs a doubled batch of conditional and unconditional rows",
                                                      "guidance_scale"),
    "DiaClassifierFreeGuidanceLogitsProcessor": _refused("needs a doubled batch (Dia)", "guidance_scale"),
    "DiaEOSChannelFilterLogitsProcessor": _refused("Dia's audio channels", "a Dia model"),
    "DiaEOSDelayPatternLogitsProcessor": _refused("keeps a per-call EOS countdown (Dia)", "a Dia model"),
    "SynthIDTextWatermarkLogitsProcessor": _refused("keeps a running context across calls",
                                                    "watermarking_config (SynthID)"),
    "WhisperTimeStampLogitsProcessor": _refused("Whisper (encoder-decoder)", "a Whisper model"),
    "WhisperNoSpeechDetection": _refused("runs the model itself (Whisper)", "a Whisper model"),
    "EncoderRepetitionPenaltyLogitsProcessor": _refused("needs encoder inputs", "encoder_repetition_penalty"),
    "EncoderNoRepeatNGramLogitsProcessor": _refused("needs encoder inputs", "encoder_no_repeat_ngram_size"),
}

USER_PROCESSOR_RULE = ProcessorRule(How.BATCH, "not transformers' own: row b of the call is always row b")


def rule_for(processor) -> ProcessorRule:
    """The rule of a transformers processor (exact class, not a subclass); a user's processor is `BATCH`."""
    name = type(processor).__name__
    if getattr(logits_process, name, None) is type(processor) and name in PROCESSOR_RULES:
        return PROCESSOR_RULES[name]
    if type(processor).__module__.startswith("transformers."):
        _warn_unknown(name)
    return USER_PROCESSOR_RULE


_warned: set[str] = set()


def _warn_unknown(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"hf_specdec does not know transformers' {name}; it is applied with the whole batch at every "
                      "position, which is exact when it is a function of each row's prefix and holds no state.",
                      stacklevel=3)


def reads_input_ids(processors) -> bool:
    """Whether any processor reads `input_ids`: only then are per-position prefixes worth building."""
    return any(rule_for(processor).how is not How.SCORES for processor in processors)


def check_processors(processors) -> None:
    """Refuse, by the generate() argument that added it, any processor speculation cannot apply exactly."""
    for processor in processors:
        rule = rule_for(processor)
        if rule.how is How.REFUSED:
            raise ValueError(
                f"{type(processor).__name__} (added by `{rule.argument}`) {rule.why}, so its result cannot be "
                f"reproduced when many speculative positions are scored at once. Drop `{rule.argument}`, or generate "
                "without a drafter."
            )


@dataclass
class BatchText:
    """The generate() call's whole batch: `sequences` [B, T], pad-filled past each row's length. `BATCH` processors
    and stopping criteria see it cut at one length, as plain generate() shows its batch."""

    sequences: torch.Tensor
    pad_token_id: int

    def at_length(self, length: int) -> torch.Tensor:
        """[B, length]; a drafter may look past the buffer's width (rows out of budget still draft with the
        batch), where every row is padding."""
        missing = length - self.sequences.shape[1]
        if missing <= 0:
            return self.sequences[:, :length]
        return torch.nn.functional.pad(self.sequences, (0, missing), value=self.pad_token_id)


class TreePrefixes:
    """The prefix of every (row, position) of a round: `batch.sequences[row_ids[b], :lengths[b]]` followed by the
    position's path.

    lengths: [B] committed length per active row (the root is the last committed token); paths: [B, Q, D] path
    tokens after the root for each position; depths: [B, Q] their number (0 for the root); row_ids: [B] each
    active row's index in the generate() call's batch.
    """

    def __init__(self, batch: BatchText, row_ids, lengths, paths, depths):
        self.batch, self.row_ids, self.lengths, self.paths, self.depths = batch, row_ids, lengths, paths, depths

    def prefix_lengths(self) -> torch.Tensor:
        return self.lengths[:, None] + self.depths

    def gather(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """[G, length] prefixes of the selected (row, position) pairs, all of total length `length`."""
        committed = self.batch.at_length(length)[self.row_ids[rows]]
        if not self.paths.shape[-1]:
            return committed
        index = torch.arange(length, device=committed.device)[None, :]
        committed_len = self.lengths[rows][:, None]
        path_index = (index - committed_len).clamp(min=0, max=self.paths.shape[-1] - 1)
        from_path = self.paths[rows, positions].gather(1, path_index)
        return torch.where(index < committed_len, committed, from_path)

    def batch_layout(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """[batch, length]: the given (row, position) prefixes in their rows of the generate() call (one position
        per row), every other row as plain generate() would show it at that length."""
        layout = self.batch.at_length(length).clone()
        layout[self.row_ids[rows]] = self.gather(rows, positions, length)
        return layout


def apply_processors(processors, scores: torch.Tensor, prefixes: TreePrefixes | None) -> torch.Tensor:
    """scores: [B, Q, V] raw logits (float32) → processed scores, position by position with true prefixes
    (`prefixes` may be None when no processor reads `input_ids`)."""
    if not processors:
        return scores
    batch_size, num_positions, vocab = scores.shape
    flat = scores.reshape(batch_size * num_positions, vocab)
    groups = None
    for processor in processors:
        rule = rule_for(processor)
        if rule.how is How.SCORES:
            flat = processor(None, flat)
            continue
        if groups is None:
            groups = _group_by_prefix_length(prefixes)
        flat = flat.clone()
        for length, rows, positions in groups:
            flat_index = rows * num_positions + positions
            if rule.how is How.PREFIX:
                with _rows_of(processor, rule.per_row, prefixes.row_ids[rows]):
                    flat[flat_index] = processor(prefixes.gather(rows, positions, length), flat[flat_index])
            else:
                flat[flat_index] = _apply_in_batch_layout(processor, flat[flat_index], prefixes, rows, positions, length)
    return flat.reshape(batch_size, num_positions, vocab)


def _apply_in_batch_layout(processor, scores, prefixes: TreePrefixes, rows, positions, length) -> torch.Tensor:
    """Call a `BATCH` processor with the whole batch, once per sibling rank (a row appears once per call)."""
    result = torch.empty_like(scores)
    rank = _rank_within_row(rows)
    batch_rows = prefixes.batch.sequences.shape[0]
    for sibling in range(int(rank.max()) + 1 if len(rank) else 0):
        chosen = (rank == sibling).nonzero()[:, 0]
        layout = prefixes.batch_layout(rows[chosen], positions[chosen], length)
        full_scores = scores.new_zeros(batch_rows, scores.shape[-1])
        full_scores[prefixes.row_ids[rows[chosen]]] = scores[chosen]
        result[chosen] = processor(layout, full_scores)[prefixes.row_ids[rows[chosen]]]
    return result


def _rank_within_row(rows: torch.Tensor) -> torch.Tensor:
    """For a sorted-by-row list of row indices, how many earlier entries share each entry's row."""
    if not len(rows):
        return rows
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    index = torch.arange(len(rows), device=rows.device)
    first = torch.cummax(torch.where(starts, index, 0), dim=0).values
    return index - first


class _rows_of:
    """While a `PREFIX` processor sees some rows of the batch, narrow its per-row attributes to those rows."""

    def __init__(self, processor, names, row_ids):
        self.processor, self.names, self.row_ids = processor, names, row_ids
        self.saved = {}

    def __enter__(self):
        for name in self.names:
            value = getattr(self.processor, name, None)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                self.saved[name] = value
                setattr(self.processor, name, value[self.row_ids.to(value.device)])

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.processor, name, value)


def _group_by_prefix_length(prefixes: TreePrefixes):
    """[(length, rows, positions)] with rows sorted (nonzero's row-major order)."""
    lengths = prefixes.prefix_lengths()
    groups = []
    for length in torch.unique(lengths).tolist():
        rows, positions = (lengths == length).nonzero(as_tuple=True)
        groups.append((int(length), rows, positions))
    return groups
