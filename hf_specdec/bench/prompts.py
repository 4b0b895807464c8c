"""Benchmark prompts: the built-in category sets (`hf_specdec/prompts/*.jsonl`) or any JSONL file.

One JSON object per line: `{"id": ..., "category": ..., "prompt": "..."}`, or `"messages": [{"role", "content"},
...]` instead of `"prompt"` for multi-turn chat (earlier turns, ending with the user's). Prompts are rendered with
the tokenizer's chat template when it has one (instruction-tuned targets answer in their own format), as plain
"User:/Assistant:" turns otherwise, and keep their last `max_prompt_tokens` tokens (the question sits at the end).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

BUILTIN_CATEGORIES = ("chat", "code", "math", "summarization", "qa", "translation", "rag")


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None


def builtin_prompt_file(category: str) -> Path:
    return Path(str(resources.files("hf_specdec") / "prompts" / f"{category}.jsonl"))


def load_prompts(sources: tuple[str, ...], per_category: int | None = None) -> list[Prompt]:
    """Prompts from built-in category names and/or JSONL paths, the first `per_category` of each category."""
    prompts: list[Prompt] = []
    for source in sources:
        path = builtin_prompt_file(source) if source in BUILTIN_CATEGORIES else Path(source)
        if not path.is_file():
            raise ValueError(
                f"Prompt source {source!r} is neither a built-in category ({', '.join(BUILTIN_CATEGORIES)}) nor a "
                "JSONL file; pass category names or paths to files with one {\"prompt\": ...} object per line."
            )
        prompts += read_prompt_file(path)
    if per_category is not None:
        taken: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            if taken.get(prompt.category, 0) < per_category:
                kept.append(prompt)
                taken[prompt.category] = taken.get(prompt.category, 0) + 1
        prompts = kept
    if not prompts:
        raise ValueError(f"No prompts found in {sources}.")
    return prompts


def read_prompt_file(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
            raise ValueError(f"{where}: each line needs exactly one of \"prompt\" (a string) or \"messages\".")
        messages = record.get("messages")
        if messages is not None and not (
            isinstance(messages, list) and messages
            and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
        ):
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
        prompts.append(Prompt(
            id=str(record.get("id", f"{path.stem}-{number}")), category=str(record.get("category", path.stem)),
            text=record.get("prompt"), messages=None if messages is None else tuple(messages),
        ))
    return prompts


def render(prompt: Prompt, tokenizer) -> tuple[str, bool]:
    """The prompt as text, and whether the tokenizer should still add its special tokens."""
    messages = list(prompt.messages) if prompt.messages else [{"role": "user", "content": prompt.text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    if prompt.messages is None:
        return prompt.text, True
    turns = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n\n".join(turns + ["Assistant:"]), True


def encode(prompt: Prompt, tokenizer, max_prompt_tokens: int) -> list[int]:
    text, add_special_tokens = render(prompt, tokenizer)
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if not ids:
        raise ValueError(f"Prompt {prompt.id!r} encodes to no tokens.")
    return ids[-max_prompt_tokens:]


def left_padded_batches(token_lists: list[list[int]], batch_size: int, pad_token_id: int,
                        device) -> list[dict[str, torch.Tensor]]:
    """Consecutive prompts in left-padded batches of `batch_size` (the last may be smaller)."""
    batches = []
    for start in range(0, len(token_lists), batch_size):
        group = token_lists[start : start + batch_size]
        width = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, ids in enumerate(group):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        batches.append({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)})
    return batches
