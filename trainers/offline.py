"""Offline teachers: what a frozen target gives a drafter's training, computed once and stored.

`precompute_teacher` (and `recipes/offline_teacher.py`) runs the target over tokenized rows and keeps, per token:

- `teacher_top_ids` [T, k] and `teacher_top_logprobs` [T, k]: the target's k most likely next tokens and their
  log-probabilities (at `temperature`), most likely first;
- `teacher_tail_logprob` [T]: the log of the probability outside them;
- `teacher_states` [T, n·H] (optional): the target's hidden states at `state_layers` (`hidden_states` indices),
  concatenated low to high — what EAGLE-3 heads read.

Floats are stored as bf16 bit patterns in int16 columns (Arrow has no bf16 type): a row of T tokens costs
T·(6k + 2 + 2nH) bytes, against T·V·2 for full bf16 logits (k = 64 at V = 152k: 0.25 %). `teacher.json` beside the
dataset records the target, k, the temperature and the layers.

**Sparse divergences are exact for what is kept.** The teacher is known as a coarse distribution over the k kept
tokens plus one tail bucket; the student's distribution is coarsened the same way (its tail = 1 − Σ q over the
kept ids), and the divergence is computed between the two coarse distributions, with no approximation. By the data
processing inequality it is at most the full divergence and equals it when the tail is empty; its gradient moves
q towards p on every kept token and the student's tail mass towards the teacher's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .data import pad_rows

TEACHER_COLUMNS = ("teacher_top_ids", "teacher_top_logprobs", "teacher_tail_logprob")
STATES_COLUMN = "teacher_states"
METADATA_FILE = "teacher.json"
SHARD_ROWS = 256  # rows converted to Arrow at once


# ---------------------------------------------------------------------------------------------------- storage
def to_bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """float → the int16 bit patterns of its bf16 rounding (what the dataset stores)."""
    return values.to(torch.bfloat16).view(torch.int16)


def from_bf16_bits(bits) -> torch.Tensor:
    """Stored int16 bit patterns → float32 values."""
    return torch.as_tensor(bits, dtype=torch.int16).view(torch.bfloat16).float()


def is_offline_teacher(column_names) -> bool:
    return set(TEACHER_COLUMNS) <= set(column_names)


@dataclass(frozen=True)
class TeacherMetadata:
    teacher: str | None
    top_k: int
    temperature: float
    state_layers: list[int] | None
    vocab_size: int

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, METADATA_FILE), "w") as handle:
            json.dump(self.__dict__, handle, indent=2)

    @classmethod
    def load(cls, directory: str) -> TeacherMetadata:
        with open(os.path.join(directory, METADATA_FILE)) as handle:
            return cls(**json.load(handle))


# ---------------------------------------------------------------------------------------------------- computing
@torch.no_grad()
def teacher_batch(target, input_ids: torch.Tensor, attention_mask: torch.Tensor, top_k: int,
                  temperature: float = 1.0, state_layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """One forward of the target: top-k log-probabilities [B, T, k] (+ ids), tail log-mass [B, T] and the states
    [B, T, n·H] at `state_layers` (None: not kept)."""
    outputs = target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                     output_hidden_states=state_layers is not None)
    log_probs = (outputs.logits.float() / temperature).log_softmax(-1)
    top = log_probs.topk(top_k, dim=-1)
    kept = top.values.logsumexp(-1)
    tail = torch.log1p(-kept.exp().clamp(max=1.0)).clamp(min=-1e4)  # log(1 - Σ p_top); -1e4 ≈ empty tail
    batch = {"teacher_top_ids": top.indices, "teacher_top_logprobs": top.values, "teacher_tail_logprob": tail}
    if state_layers is not None:
        batch[STATES_COLUMN] = torch.cat([outputs.hidden_states[i] for i in state_layers], dim=-1)
    return batch


def precompute_teacher(target, rows, top_k: int = 64, temperature: float = 1.0,
                       state_layers: list[int] | None = None, batch_size: int = 8, pad_token_id: int = 0,
                       progress: bool = True):
    """A `datasets.Dataset` of `rows` (tokenized `input_ids` / `labels`) with the teacher columns added. Rows are
    turned into Arrow tables a shard at a time (not `Dataset.from_generator`, which would hash the model to name a
    cache entry)."""
    from datasets import Dataset, concatenate_datasets

    shards, pending = [], []
    for row in _teacher_rows(target, rows, top_k, temperature, state_layers, batch_size, pad_token_id, progress):
        pending.append(row)
        if len(pending) == SHARD_ROWS:
            shards.append(Dataset.from_list(pending))
            pending = []
    if pending or not shards:
        shards.append(Dataset.from_list(pending))
    return concatenate_datasets(shards)


def _teacher_rows(target, rows, top_k, temperature, state_layers, batch_size, pad_token_id,
                  progress) -> Iterator[dict[str, Any]]:
    from tqdm.auto import tqdm

    target.eval()
    rows = list(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc="Teacher outputs", disable=not progress):
        chunk = [{"input_ids": list(r["input_ids"]), "labels": list(r.get("labels") or r["input_ids"])}
                 for r in rows[start:start + batch_size]]
        batch = pad_rows(chunk, pad_token_id)
        device = target.device
        outputs = teacher_batch(target, batch["input_ids"].to(device), batch["attention_mask"].to(device), top_k,
                                temperature, state_layers)
        for index, row in enumerate(chunk):
            length = len(row["input_ids"])
            stored = {name: value[index, :length].cpu() for name, value in outputs.items()}
            yield {
                "input_ids": row["input_ids"], "labels": row["labels"],
                "teacher_top_ids": stored["teacher_top_ids"].int().tolist(),
                "teacher_top_logprobs": to_bf16_bits(stored["teacher_top_logprobs"]).tolist(),
                "teacher_tail_logprob": stored["teacher_tail_logprob"].tolist(),
                **({STATES_COLUMN: to_bf16_bits(stored[STATES_COLUMN]).tolist()} if STATES_COLUMN in stored else {}),
            }


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class OfflineTeacherCollator:
    """Right-pads rows of a teacher dataset: `input_ids`, `labels`, `attention_mask` as `DraftDataCollator`, plus
    `teacher_top_ids` [B, T, k], `teacher_top_logprobs` [B, T, k], `teacher_tail_logprob` [B, T] and, when
    stored, `teacher_states` [B, T, n·H] (float32; padding positions hold zeros, never trained)."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_rows([{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows],
                         self.pad_token_id)
        length = batch["input_ids"].shape[1]
        columns = {"teacher_top_ids": lambda v: torch.as_tensor(v, dtype=torch.long),
                   "teacher_top_logprobs": from_bf16_bits,
                   "teacher_tail_logprob": lambda v: torch.as_tensor(v, dtype=torch.float32),
                   STATES_COLUMN: from_bf16_bits}
        for name, decode in columns.items():
            if name in rows[0]:
                values = [decode(row[name]) for row in rows]
                padded = values[0].new_zeros(len(rows), length, *values[0].shape[1:])
                for index, value in enumerate(values):
                    padded[index, : len(value)] = value
                batch[name] = padded
        return batch


def coarse_student_log_probs(student_logits: torch.Tensor, top_ids: torch.Tensor):
    """The student's log-probabilities of the teacher's kept ids [.., k] and of the rest (its tail) [..]."""
    log_q = student_logits.float().log_softmax(-1)
    kept = log_q.gather(-1, top_ids)
    tail = torch.log1p(-kept.logsumexp(-1).exp().clamp(max=1.0 - 1e-7))
    return kept, tail


def sparse_forward_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per token [..] between the coarse teacher (k kept tokens + tail) and the student coarsened the
    same way (see the module docstring)."""
    kept, tail = coarse_student_log_probs(student_logits, top_ids)
    teacher_log = torch.cat([top_logprobs, tail_logprob[..., None]], dim=-1)
    student_log = torch.cat([kept, tail[..., None]], dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
