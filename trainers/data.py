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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .losses import IGNORE_INDEX

ROW_FORMATS = ("input_ids", "messages", "prompt+completion", "text")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")  # what a batch hands a model's forward


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


def has_trained_token(row: dict[str, list[int]]) -> bool:
    """Position 0 is never predicted, so a row needs a trained label after it."""
    return any(label != IGNORE_INDEX for label in row["labels"][1:])


def tokenize_dataset(dataset, tokenizer, max_length: int, num_proc: int | None = None):
    """Map a `datasets.Dataset` (any format above) to `input_ids` / `labels` rows; drops rows left with nothing to
    train (e.g. a prompt longer than `max_length`)."""
    columns = dataset.column_names
    row_format = detect_row_format(columns)
    tokenized = dataset.map(
        tokenize_row,
        fn_kwargs={"row_format": row_format, "tokenizer": tokenizer, "max_length": max_length},
        remove_columns=columns,
        num_proc=num_proc,
        desc=f"Tokenizing ({row_format})",
    )
    return tokenized.filter(has_trained_token, num_proc=num_proc, desc="Dropping rows with no trained token")


def prepare_dataset(dataset, tokenizer, max_length: int, num_proc: int | None = None, packing: bool = False):
    """`tokenize_dataset`, then (with `packing`) rows packed into rows of up to `max_length` tokens."""
    tokenized = tokenize_dataset(dataset, tokenizer, max_length, num_proc=num_proc)
    if packing:
        raise NotImplementedError("packing: being written")
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


@dataclass
class DraftDataCollator:
    """Batches tokenized rows by right padding (see `pad_rows`)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            raise NotImplementedError("padding_free: being written")
        rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
        return pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
