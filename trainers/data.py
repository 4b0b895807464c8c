"""Turn user datasets into `input_ids` / `labels` rows and pad them into batches.

Accepted row formats (the first that matches the dataset's columns wins):

- `input_ids` (+ optional `labels`): already tokenized; without `labels` every token is trained.
- `messages`: a chat; everything before the last message is the prompt (rendered with the generation prompt), the
  last message is the completion.
- `prompt` + `completion`: text; only the completion (plus EOS) is trained.
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


def _tokenize_messages(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("A `messages` dataset needs a tokenizer with a chat template (`tokenizer.chat_template`).")
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "The chat template renders the conversation without its last message as something that is not a "
            "prefix of the whole conversation, so the completion cannot be located. Give `prompt`/`completion` "
            "columns instead."
        )
    # The template writes the special tokens itself.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def tokenize_row(row: dict[str, Any], row_format: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """One dataset row → `{"input_ids", "labels"}`, truncated to the first `max_length` tokens."""
    if row_format == "input_ids":
        input_ids = list(row["input_ids"])
        labels = list(row["labels"]) if row.get("labels") is not None else list(input_ids)
        if len(labels) != len(input_ids):
            raise ValueError(f"`labels` has {len(labels)} entries but `input_ids` has {len(input_ids)}.")
    else:
        if tokenizer is None:
            raise ValueError(f"A {row_format!r} dataset must be tokenized: pass `processing_class=<tokenizer>`.")
        if row_format == "messages":
            prompt_ids, completion_ids = _tokenize_messages(tokenizer, row["messages"])
        elif row_format == "prompt+completion":
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

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
        return pad_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
