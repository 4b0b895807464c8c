"""Turn user datasets into `input_ids` / `labels` rows and pad them into batches.

Accepted row formats (the first that matches the dataset's columns wins):

- `input_ids` (+ optional `labels` or `completion_mask`): already tokenized; `completion_mask` (TRL's name: 1 =
  trained) marks the trained tokens when there are no `labels`; with neither, every token is trained.
- `messages`: a chat rendered with the tokenizer's chat template; every assistant turn is trained (assistant-only
  loss, as TRL's `assistant_only_loss`), everything else (system, user, tool turns, the template's markup before
  each assistant turn) is not.
- `prompt` + `completion`: text, or conversations (lists of messages, TRL's conversational prompt-completion
  format, rendered with the chat template); only the completion (plus EOS for text) is trained.
- `text`: plain text; every token (plus EOS) is trained.

`labels` use -100 for tokens that are not trained (prompt, padding). The prompt of a row is everything before its
first trained token: on-policy distillation regenerates the rest from there.

Datasets may be a `datasets.Dataset` or a `datasets.IterableDataset` (streaming): an iterable one is tokenized,
filtered and packed lazily, as it is read; its format is read from its features, or from its first row when it has
none. Already tokenized `input_ids` rows may also be packed already: their `position_ids` (restarting at 0 at every
sequence) or TRL's `seq_lengths` mark where each sequence starts.

Packing (`prepare_dataset(..., packing=True)`, see `pack_rows`) puts several rows into one row of up to `max_length`
tokens without splitting any, and records their boundaries in a `position_ids` column. Packed rows are batched
padding-free (`DraftDataCollator(padding_free=True)`): one row per micro-batch, no attention mask, and position ids
that restart at 0 at every sequence, from which transformers' attention-mask code (`masking_utils`,
`find_packed_sequence_indices`, used when `attention_mask` is None) builds a block-diagonal causal mask, so no token
attends across sequences. The label of every sequence's first token is -100, so nothing is trained to predict one
sequence from the one before: the trained tokens, the logits and the loss are those of the rows run one by one.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .losses import IGNORE_INDEX

ROW_FORMATS = ("input_ids", "messages", "prompt+completion", "text")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")  # what a batch hands a model's forward
PACKING_WINDOW = 1000  # rows packed together (one `map` batch): a streamed dataset holds this many in memory


def detect_row_format(column_names: Sequence[str]) -> str:
    """Which of `ROW_FORMATS` a dataset with these columns uses; a clear error when none fits."""
    columns = set(column_names)
    if "input_ids" in columns:
        return "input_ids"
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt+completion"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"Cannot tell how to train on a dataset with columns {sorted(columns)}. Give one of: tokenized "
        "`input_ids` (+ `labels` with -100 on ignored tokens), chat `messages`, `prompt` + `completion` text, or "
        "`text`."
    )


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]  # with the tokenizer's own special tokens (BOS)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + _eos_ids(tokenizer)
    return prompt_ids, completion_ids


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize_messages(tokenizer, messages: list[dict[str, str]],
                       trained_from: int = 0) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of a chat: the text of every assistant turn at index >= `trained_from` is trained.
    The conversation is rendered whole and cut where each assistant turn starts and ends (the renderings of its
    prefixes), so the template's own markup and special tokens stay as it writes them."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("A conversational dataset needs a tokenizer with a chat template (`tokenizer.chat_template`).")
    full_text = _render(tokenizer, messages)
    input_ids, labels, done = [], [], 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or index < trained_from:
            continue
        start, end = _render(tokenizer, messages[:index], True), _render(tokenizer, messages[: index + 1])
        if not (full_text.startswith(start) and full_text.startswith(end) and len(start) >= done):
            raise ValueError(
                "The chat template does not render the conversation's beginnings as prefixes of the whole, so its "
                "assistant turns cannot be located. Give `prompt`/`completion` columns instead."
            )
        before = tokenizer(full_text[done : len(start)], add_special_tokens=False)["input_ids"]
        turn = tokenizer(full_text[len(start) : len(end)], add_special_tokens=False)["input_ids"]
        input_ids += before + turn
        labels += [IGNORE_INDEX] * len(before) + turn
        done = len(end)
    rest = tokenizer(full_text[done:], add_special_tokens=False)["input_ids"]
    return input_ids + rest, labels + [IGNORE_INDEX] * len(rest)


def tokenize_row(row: dict[str, Any], row_format: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """One dataset row → `{"input_ids", "labels"}`, truncated to the first `max_length` tokens."""
    if row_format == "input_ids":
        input_ids = list(row["input_ids"])
        if row.get("labels") is not None:
            labels = list(row["labels"])
        elif row.get("completion_mask") is not None:
            labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, row["completion_mask"])]
            if len(row["completion_mask"]) != len(input_ids):
                raise ValueError(f"`completion_mask` has {len(row['completion_mask'])} entries but `input_ids` has "
                                 f"{len(input_ids)}.")
        else:
            labels = list(input_ids)
        if len(labels) != len(input_ids):
            raise ValueError(f"`labels` has {len(labels)} entries but `input_ids` has {len(input_ids)}.")
        position_ids = _given_position_ids(row, len(input_ids))
        if position_ids is not None:  # an already packed row: keep its boundaries
            position_ids = position_ids[:max_length]
            labels = untrain_sequence_starts(labels, position_ids)
            return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "position_ids": position_ids}
    else:
        if tokenizer is None:
            raise ValueError(f"A {row_format!r} dataset must be tokenized: pass `processing_class=<tokenizer>`.")
        if row_format == "messages":
            input_ids, labels = _tokenize_messages(tokenizer, row["messages"])
        elif row_format == "prompt+completion" and isinstance(row["prompt"], list):  # conversational
            input_ids, labels = _tokenize_messages(tokenizer, row["prompt"] + row["completion"],
                                                   trained_from=len(row["prompt"]))
        else:
            if row_format == "prompt+completion":
                prompt_ids, completion_ids = _tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
            else:
                prompt_ids, completion_ids = [], tokenizer(row["text"])["input_ids"] + _eos_ids(tokenizer)
            input_ids = prompt_ids + completion_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _given_position_ids(row: dict[str, Any], length: int) -> list[int] | None:
    """The position ids of an already packed `input_ids` row (`position_ids`, or TRL's `seq_lengths`), checked;
    None for a plain row."""
    if row.get("position_ids") is not None:
        position_ids = _ints(row["position_ids"])
    elif row.get("seq_lengths") is not None:
        position_ids = [p for n in _ints(row["seq_lengths"]) for p in range(n)]
    else:
        return None
    if len(position_ids) != length:
        raise ValueError(f"`position_ids` / `seq_lengths` cover {len(position_ids)} tokens but `input_ids` has "
                         f"{length}.")
    if position_ids and position_ids[0] != 0:
        raise ValueError("`position_ids` of a row must start at 0 (and restart at 0 at every packed sequence).")
    return position_ids


def untrain_sequence_starts(labels: list[int], position_ids: list[int]) -> list[int]:
    """-100 at every sequence's first token (position 0): never a target in its own row, and in a packed row it must
    not become the target of the previous sequence's last token."""
    return [IGNORE_INDEX if position == 0 else label for label, position in zip(labels, position_ids)]


def until_eos(tokens: list[int], eos_ids) -> list[int]:
    """A generated continuation up to and including its first EOS (all of it when there is none)."""
    end = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    return tokens if end is None else tokens[: end + 1]


def has_trained_token(row: dict[str, list[int]]) -> bool:
    """Position 0 is never predicted, so a row needs a trained label after it."""
    return any(label != IGNORE_INDEX for label in row["labels"][1:])


def is_iterable_dataset(dataset) -> bool:
    """A stream: a `datasets.IterableDataset` (or a torch one), read lazily and of unknown length."""
    from datasets import IterableDataset

    return isinstance(dataset, (IterableDataset, torch.utils.data.IterableDataset))


def _check_dataset(dataset) -> None:
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise TypeError(f"Got a dataset dictionary with splits {sorted(dataset)}: pass one split, e.g. "
                        f"`dataset[{next(iter(dataset), 'train')!r}]`.")
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"Datasets must be a `datasets.Dataset` or `datasets.IterableDataset`, got "
                        f"{type(dataset).__name__}: wrap rows with `Dataset.from_list(...)` or a stream with "
                        "`IterableDataset.from_generator(...)`.")


def dataset_columns(dataset) -> list[str]:
    """The columns of a `Dataset` or `IterableDataset`; a streamed dataset without known features (e.g. built from a
    generator) is asked for its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("The dataset is empty: there is nothing to train on.")
    return list(first)


def _int_lists_features(*names: str):
    from datasets import Features, List, Value

    return Features({name: List(Value("int64")) for name in names})


def tokenize_dataset(dataset, tokenizer, max_length: int, num_proc: int | None = None):
    """Map a `datasets.Dataset` or `datasets.IterableDataset` (any format above) to `input_ids` / `labels` rows
    (plus `position_ids` for already packed rows); drops rows left with nothing to train (e.g. a prompt longer than
    `max_length`). An `IterableDataset` is mapped and filtered lazily (`num_proc` does not apply to it)."""
    _check_dataset(dataset)
    columns = dataset_columns(dataset)
    row_format = detect_row_format(columns)
    fn_kwargs = {"row_format": row_format, "tokenizer": tokenizer, "max_length": max_length}
    if is_iterable_dataset(dataset):
        packed = row_format == "input_ids" and ("position_ids" in columns or "seq_lengths" in columns)
        names = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels")
        tokenized = dataset.map(tokenize_row, fn_kwargs=fn_kwargs, remove_columns=columns,
                                features=_int_lists_features(*names))
        return tokenized.filter(has_trained_token)
    tokenized = dataset.map(tokenize_row, fn_kwargs=fn_kwargs, remove_columns=columns, num_proc=num_proc,
                            desc=f"Tokenizing ({row_format})")
    return tokenized.filter(has_trained_token, num_proc=num_proc, desc="Dropping rows with no trained token")


def _ints(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _row_positions(row: dict[str, Any]) -> list[int]:
    """A row's position ids: the stored ones of a packed row, else 0, 1, 2, ..."""
    if row.get("position_ids") is not None:
        return _ints(row["position_ids"])
    return list(range(len(row["input_ids"])))


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding items of total length <= `capacity`: items are placed longest first, each
    into the fullest bin it still fits in (best-fit decreasing), or into a new bin. Bins are ordered by their first
    item's index, and hold their items in index order, so packing keeps the dataset's order roughly."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the first entry with room >= n fits best
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        if n > capacity:
            raise ValueError(f"A row of {n} tokens cannot be packed into rows of {capacity}.")
        slot = bisect_left(free, (n, -1))
        if slot == len(free):
            bins.append([index])
            insort(free, (capacity - n, len(bins) - 1))
        else:
            room, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            insort(free, (room - n, bin_index))
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack_rows(rows: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized rows into rows of at most `max_length` tokens with `best_fit_decreasing`; no row is split.

    Each packed row concatenates its rows' `input_ids` and `labels` and records where each starts in
    `position_ids` (0, 1, ... restarting at every original row; already packed rows keep theirs). The label of
    every row's first token becomes -100: it is never a trained target in its own row (the logits at position t
    predict label t + 1), and in a packed row it must not become the target of the previous row's last token.
    """
    rows = [{"input_ids": _ints(r["input_ids"]), "labels": _ints(r["labels"]), "position_ids": _row_positions(r)}
            for r in rows]
    packed = []
    for members in best_fit_decreasing([len(r["input_ids"]) for r in rows], max_length):
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            row = rows[index]
            out["input_ids"] += row["input_ids"]
            out["labels"] += untrain_sequence_starts(row["labels"], row["position_ids"])
            out["position_ids"] += row["position_ids"]
        packed.append(out)
    return packed


def _pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """`pack_rows` for a batched `map`: columns in, columns out (fewer rows)."""
    names = [name for name in ("input_ids", "labels", "position_ids") if name in batch]
    rows = [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]
    packed = pack_rows(rows, max_length)
    return {name: [row[name] for row in packed] for name in ("input_ids", "labels", "position_ids")}


def pack_dataset(dataset, max_length: int, num_proc: int | None = None, window: int = PACKING_WINDOW):
    """Pack a tokenized `Dataset` or `IterableDataset` (see `pack_rows`) `window` rows at a time: each window of
    rows is packed by best-fit decreasing, in a batched `map` (lazily, as the stream is read, for an
    `IterableDataset`, which then holds one window of rows in memory)."""
    columns = dataset_columns(dataset)
    fn_kwargs = {"max_length": max_length}
    if is_iterable_dataset(dataset):
        return dataset.map(_pack_batch, batched=True, batch_size=window, remove_columns=columns, fn_kwargs=fn_kwargs,
                           features=_int_lists_features("input_ids", "labels", "position_ids"))
    return dataset.map(_pack_batch, batched=True, batch_size=window, remove_columns=columns, fn_kwargs=fn_kwargs,
                       num_proc=num_proc, desc=f"Packing rows into rows of {max_length} tokens")


def prepare_dataset(dataset, tokenizer, max_length: int, num_proc: int | None = None, packing: bool = False,
                    packing_window: int = PACKING_WINDOW):
    """`tokenize_dataset`, then (with `packing`) `pack_dataset`: rows packed into rows of up to `max_length` tokens,
    best-fit decreasing within windows of `packing_window` rows. Works on a `Dataset` and, lazily, on an
    `IterableDataset`. Packed rows must be batched padding-free (`DraftDataCollator(padding_free=True)`)."""
    tokenized = tokenize_dataset(dataset, tokenizer, max_length, num_proc=num_proc)
    if packing:
        return pack_dataset(tokenized, max_length, num_proc=num_proc, window=packing_window)
    return tokenized


def prompt_length(labels: torch.Tensor) -> int:
    """Tokens before the first trained label of one row (at least 1, so generation always has a prefix)."""
    trained = (labels != IGNORE_INDEX).nonzero()
    return max(int(trained[0]) if len(trained) else len(labels), 1)


def pad_rows(rows: list[dict[str, list[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad `input_ids` (with `pad_token_id`) and `labels` (with -100); build `attention_mask`."""
    length = max(len(row["input_ids"]) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def concat_rows(rows: Iterable[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """A padding-free batch: the rows concatenated into one row `[1, total tokens]`, with `position_ids` that restart
    at 0 at every row (or, for packed rows, at every sequence they hold), the label of each sequence's first token
    set to -100 (nothing is trained across a boundary), and no `attention_mask`: transformers then reads the
    sequence boundaries from the position ids and keeps attention inside each sequence. With `pad_to_multiple_of`,
    padding is appended as a sequence of its own (its own positions from 0, labels -100), so nothing attends to it."""
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        positions = _row_positions(row)
        if positions and positions[0] != 0:
            raise ValueError("`position_ids` of a row must start at 0 (and restart at 0 at every packed sequence).")
        if not len(positions) == len(row["input_ids"]) == len(row["labels"]):
            raise ValueError("A row's `input_ids`, `labels` and `position_ids` must have the same length.")
        input_ids += _ints(row["input_ids"])
        labels += untrain_sequence_starts(_ints(row["labels"]), positions)
        position_ids += positions
    if pad_to_multiple_of:
        padding = -len(input_ids) % pad_to_multiple_of
        input_ids += [pad_token_id] * padding
        labels += [IGNORE_INDEX] * padding
        position_ids += list(range(padding))
    columns = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {name: torch.tensor([values], dtype=torch.long) for name, values in columns.items()}


def _is_packed(row: dict[str, Any]) -> bool:
    """Whether a row holds several sequences (its position ids restart somewhere after the first token)."""
    return row.get("position_ids") is not None and 0 in _ints(row["position_ids"])[1:]


@dataclass
class DraftDataCollator:
    """Batches tokenized rows: by right padding (`pad_rows`: `input_ids`, `labels`, `attention_mask`), or, with
    `padding_free`, into one row without padding (`concat_rows`: `input_ids`, `labels`, `position_ids`).

    Packed rows (several sequences per row, see `pack_rows`) need `padding_free`: with an `attention_mask`,
    transformers applies plain causal attention and would let each sequence attend to the ones before it."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return concat_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
        if any(_is_packed(row) for row in rows):
            raise ValueError(
                "These rows are packed (their `position_ids` restart inside a row): batch them padding-free, with "
                "`DraftDataCollator(pad_token_id, padding_free=True)` (what `packing=True` sets up). A padded batch "
                "with an attention mask would let each packed sequence attend to the ones before it."
            )
        rows = [{"input_ids": _ints(r["input_ids"]), "labels": _ints(r["labels"])} for r in rows]
        return pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
