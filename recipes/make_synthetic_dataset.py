"""Synthetic training data for drafters: the target answers prompts, and a drafter learns the target's own text.

The target generates with hf_specdec's speculative decoding (a `ModelDrafter` over `--draft_model`, or prompt
lookup with `NGramDrafter` when no draft is given): sampling stays exact, so the data has the target's own
distribution (temperature 1 by default, as SD² does), only produced faster. Prompts come from a local JSONL / JSON /
Parquet file or a Hub dataset, with a `prompt` (text) or `messages` (chat; everything but a trailing assistant turn
is the prompt) column; the chat template is applied when the tokenizer has one.

Output (`<output_dir>`): `rows.jsonl`, an append-only log (one row per answered prompt: `prompt_index`,
`input_ids`, `loss_mask`, `prompt_length`, `labels`), and `dataset/`, a `datasets.DatasetDict` with a `train`
split written by `save_to_disk`. A rerun skips the prompts already in the log, so an interrupted run resumes
where it stopped. `labels` (-100 on the prompt) make the data directly usable by every trainer here:

    python recipes/make_synthetic_dataset.py --tiny --output_dir out/synth                       # offline
    python recipes/make_synthetic_dataset.py --target_model Qwen/Qwen3-8B --draft_model Qwen/Qwen3-0.6B \\
        --dataset_name HuggingFaceH4/ultrachat_200k --train_split train_sft --output_dir out/synth-qwen
    python recipes/distill.py --config recipes/configs/distill.yaml --tiny false \\
        --target_model ... --draft_model ... --dataset_path out/synth-qwen/dataset               # or adaspec.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import RecipeArguments, load_models, parse_args, tiny_models, write_tiny_dataset
from tqdm.auto import tqdm

import hf_specdec
from trainers.losses import IGNORE_INDEX

LOG_NAME, DATASET_NAME = "rows.jsonl", "dataset"


@dataclass
class SyntheticDataArguments:
    """How the target answers the prompts."""

    output_dir: str = field(default="out/synthetic", metadata={"help": "Where rows.jsonl and dataset/ go."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column holding the prompt (default: `messages`, else `prompt`)."}
    )
    chat_template: bool = field(
        default=True,
        metadata={
            "help": "Apply the tokenizer's chat template when it has one (the tiny world's target is trained "
            "on plain text, so --tiny turns it off)."
        },
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Answer only the first N prompts."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Prompts keep their last N tokens."})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens the target generates per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together (left-padded)."})
    num_draft_tokens: int = field(default=5, metadata={"help": "Draft tokens per speculative round."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (per batch, so a resumed run repeats it)."})


# ----- prompts -----------------------------------------------------------------------------------------------------


def load_prompts(recipe: RecipeArguments, data: SyntheticDataArguments) -> list:
    """A list of prompts: strings or chat message lists."""
    from datasets import load_dataset, load_from_disk

    if recipe.tiny:
        train_file, _ = write_tiny_dataset(Path(data.output_dir) / "tiny-data", recipe)
        rows = load_dataset("json", data_files=train_file)["train"]
    elif recipe.dataset_path:
        path = Path(recipe.dataset_path)
        if path.is_dir():
            rows = load_from_disk(str(path))
        else:
            rows = load_dataset({".jsonl": "json"}.get(path.suffix, path.suffix.lstrip(".")), data_files=str(path))
        rows = rows[recipe.train_split] if hasattr(rows, "keys") else rows
    elif recipe.dataset_name:
        rows = load_dataset(recipe.dataset_name, recipe.dataset_config, split=recipe.train_split)
    else:
        raise ValueError("Give prompts: --dataset_path <local JSONL>, --dataset_name <hub name>, or --tiny.")
    column = data.prompt_column or next((c for c in ("messages", "prompt") if c in rows.column_names), None)
    if column is None:
        raise ValueError(f"No `messages` or `prompt` column in {rows.column_names}; set --prompt_column.")
    prompts = rows[column] if data.num_prompts is None else rows.select(range(min(data.num_prompts, len(rows))))[column]
    return [_strip_answer(p) if isinstance(p, list) else p for p in prompts]


def _strip_answer(messages: list[dict]) -> list[dict]:
    """A chat's prompt: the conversation up to its first assistant turn (SD² answers the first user turn)."""
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first_answer]


def encode_prompt(tokenizer, prompt, max_tokens: int, chat_template: bool = True) -> list[int]:
    """Token ids of one prompt (chat template when the tokenizer has one), keeping its last `max_tokens`."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes the special tokens
    elif isinstance(prompt, list):
        raise ValueError("Chat `messages` prompts need a tokenizer with a chat template.")
    else:
        ids = tokenizer(prompt)["input_ids"]
    return ids[-max_tokens:]


# ----- generation --------------------------------------------------------------------------------------------------


def answered_prompts(log_path: Path) -> set[int]:
    """Prompt indices already in the log (a torn last line from an interrupted run is ignored)."""
    done = set()
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                done.add(json.loads(line)["prompt_index"])
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def make_drafter(draft, num_draft_tokens: int):
    return (
        hf_specdec.ModelDrafter(draft, num_draft_tokens=num_draft_tokens)
        if draft is not None
        else (hf_specdec.NGramDrafter(num_draft_tokens=num_draft_tokens))
    )


def eos_token_ids(tokenizer, target) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = target.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


@torch.no_grad()
def answer_batch(target, drafter, tokenizer, prompts: list[list[int]], data: SyntheticDataArguments, seed: int):
    """Generate one batch of answers; returns the rows (prompt + answer up to and including the first EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = target.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = eos_token_ids(tokenizer, target)
    sampling = {"do_sample": True, "temperature": data.temperature, "top_p": data.top_p, "top_k": 0}
    torch.manual_seed(seed)
    output = target.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        assistant_model=drafter,
        max_new_tokens=data.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos or None,
        return_dict_in_generate=True,
        **(sampling if data.temperature > 0 else {"do_sample": False}),
    )
    rows = []
    for prompt, answer in zip(prompts, output.sequences[:, width:].tolist()):
        ends = [i for i, token in enumerate(answer) if token in eos]
        answer = answer[: ends[0] + 1] if ends else answer
        rows.append(
            {
                "input_ids": prompt + answer,
                "loss_mask": [0] * len(prompt) + [1] * len(answer),
                "prompt_length": len(prompt),
                "labels": [IGNORE_INDEX] * len(prompt) + answer,
            }
        )
    return rows, output.spec_stats


def generate_synthetic_dataset(
    target, tokenizer, prompts: Iterable, data: SyntheticDataArguments, draft=None, show_progress: bool = True
):
    """Answer every prompt not yet in `<output_dir>/rows.jsonl`, append the rows, and write `<output_dir>/dataset`
    (a DatasetDict with a `train` split). Returns that DatasetDict."""
    from datasets import Dataset, DatasetDict

    output_dir = Path(data.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / LOG_NAME
    done = answered_prompts(log_path)
    todo = [
        (i, encode_prompt(tokenizer, p, data.max_prompt_tokens, data.chat_template))
        for i, p in enumerate(prompts)
        if i not in done
    ]
    # Similar lengths together: less padding per batch.
    todo.sort(key=lambda item: len(item[1]))
    drafter = make_drafter(draft, data.num_draft_tokens)
    target.eval()
    accepted = drafted = 0
    with log_path.open("a") as log, tqdm(total=len(todo), desc="answering prompts", disable=not show_progress) as bar:
        for start in range(0, len(todo), data.batch_size):
            batch = todo[start : start + data.batch_size]
            seed = random.Random(f"{data.seed}-{batch[0][0]}").getrandbits(63)
            rows, stats = answer_batch(target, drafter, tokenizer, [ids for _, ids in batch], data, seed)
            for (index, _), row in zip(batch, rows):
                log.write(json.dumps({"prompt_index": index, **row}) + "\n")
            log.flush()
            if stats is not None:
                accepted += int(stats.accepted.sum())
                drafted += int(stats.drafted.sum())
                bar.set_postfix(acceptance=f"{accepted / max(drafted, 1):.2f}")
            bar.update(len(batch))
    rows = sorted(
        (json.loads(line) for line in log_path.read_text().splitlines() if line.strip()),
        key=lambda row: row["prompt_index"],
    )
    dataset = DatasetDict({"train": Dataset.from_list(rows)})
    dataset.save_to_disk(str(output_dir / DATASET_NAME))
    return dataset


def main(argv=None):
    recipe, data = parse_args((RecipeArguments, SyntheticDataArguments), argv)
    prompts = load_prompts(recipe, data)
    if recipe.tiny:
        from datasets import load_dataset

        train_file, _ = write_tiny_dataset(Path(data.output_dir) / "tiny-data", recipe)
        train = load_dataset("json", data_files=train_file)["train"].select_columns(["prompt", "completion"])
        tokenizer, target, draft = tiny_models(recipe, data.output_dir, train)
        data.chat_template = False
    elif recipe.target_model and not recipe.draft_model:  # prompt lookup only
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recipe.target_model)
        target, draft = AutoModelForCausalLM.from_pretrained(recipe.target_model, dtype="auto"), None
    else:
        tokenizer, target, draft = load_models(recipe)
    if torch.cuda.is_available():
        target, draft = target.cuda(), draft.cuda() if draft is not None else None
    dataset = generate_synthetic_dataset(target, tokenizer, prompts, data, draft=draft)
    print(f"{len(dataset['train'])} rows in {Path(data.output_dir) / DATASET_NAME}")


if __name__ == "__main__":
    main()
