"""Offline teachers: what a frozen target gives a drafter's training, computed once and stored.

`precompute_teacher` (and `recipes/offline_teacher.py`) runs the target over tokenized rows and keeps, per token:

- `teacher_top_ids` [T, k] and `teacher_top_logprobs` [T, k]: the target's k most likely next tokens and their
  log-probabilities (at `temperature`), most likely first;
- `teacher_tail_logprob` [T]: the log of the probability outside them;
- `teacher_states` [T, n·H] (optional): the target's hidden states at `state_layers` (`hidden_states` indices),
  concatenated low to high — what EAGLE-3 heads read.

Floats are stored as bf16 bit patterns in int16 columns (Arrow has no bf16 type): a row of T tokens costs
T·(6k + 4 + 2nH) bytes, against T·V·2 for full bf16 logits (k = 64 at V = 152k: 0.25 %). `teacher.json` beside the
dataset records the target, k, the temperature and the layers, and names the folder of the target's `TargetParts`:
what a drafter still needs of its target without its weights (config, generation config, input embedding).

**Sparse divergences are exact for what is kept.** The teacher is known as a coarse distribution over the k kept
tokens plus one bucket for the rest (its tail); the student's distribution is coarsened the same way (its bucket is
its mass outside the kept ids), and the divergence is computed between the two coarse distributions, with no
approximation. By the data processing inequality it is at most the full divergence and equals it when the tail is
empty; its gradient moves q towards p on every kept token and the student's bucket towards the teacher's tail.

A student over a sub-vocabulary (an EAGLE-3 head's draft vocabulary) cannot express the kept ids outside it: they
leave both coarse distributions and the teacher is renormalised over what is left (its expressible kept ids and its
tail) — what an online loss over that vocabulary does with the full distribution, so the two are equal when k = V.
The tail stays whole in the bucket, since which of its tokens the student has is not stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from .data import pad_rows
from .losses import forward_kl

TEACHER_COLUMNS = ("teacher_top_ids", "teacher_top_logprobs", "teacher_tail_logprob")
STATES_COLUMN = "teacher_states"
METADATA_FILE = "teacher.json"
TARGET_PARTS_DIR = "target"  # beside teacher.json: the target's config.json, generation_config.json and embedding
EMBEDDING_FILE = "embedding.safetensors"
SHARD_ROWS = 256  # rows converted to Arrow at once
# The log-probability of what is not there (an empty tail, an id a student lacks): its exp is exactly 0 in float32,
# yet, unlike -inf, it keeps every divergence's gradient finite where both distributions lack an entry.
ABSENT = -1e4


# ---------------------------------------------------------------------------------------------------- storage
def to_bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """float → the int16 bit patterns of its bf16 rounding (what the dataset stores)."""
    return values.to(torch.bfloat16).view(torch.int16)


def from_bf16_bits(bits) -> torch.Tensor:
    """Stored int16 bit patterns (a list, an array or a tensor) → float32 values."""
    return torch.as_tensor(np.asarray(bits), dtype=torch.int16).view(torch.bfloat16).float()


def is_offline_teacher(column_names) -> bool:
    return set(TEACHER_COLUMNS) <= set(column_names or ())


@dataclass(frozen=True)
class TeacherMetadata:
    """`teacher.json`. `target_parts`: the folder, relative to teacher.json's, of the target's `TargetParts`."""

    teacher: str | None
    top_k: int
    temperature: float
    state_layers: list[int] | None
    vocab_size: int
    target_parts: str | None = None

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, METADATA_FILE), "w") as handle:
            json.dump(self.__dict__, handle, indent=2)

    @classmethod
    def load(cls, directory: str) -> TeacherMetadata:
        with open(os.path.join(directory, METADATA_FILE)) as handle:
            return cls(**json.load(handle))


@dataclass
class TargetParts:
    """What a drafter trained from a teacher dataset still needs of its target, without its weights: its config
    (a fresh EAGLE-3 head is shaped after it), its generation config (the EOS / PAD ids a draft vocabulary keeps) and
    its input embedding (a head reads tokens through the target's own). Offers what a trainer reads of a model:
    `config`, `generation_config` and `get_input_embeddings()`; either part may be missing (None)."""

    config: PretrainedConfig | None
    embedding: nn.Embedding | None
    generation_config: GenerationConfig | None = None

    def __post_init__(self):
        if self.generation_config is None and self.config is not None:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    def get_input_embeddings(self) -> nn.Embedding | None:
        return self.embedding

    @classmethod
    def from_model(cls, model) -> TargetParts:
        return cls(model.config, model.get_input_embeddings(), getattr(model, "generation_config", None))

    @classmethod
    def of(cls, config: PretrainedConfig | str | None = None,
           embedding: nn.Embedding | torch.Tensor | str | None = None) -> TargetParts:
        """From a config (or a folder / config.json that `AutoConfig` reads; a folder's generation_config.json is
        read too) and an embedding (an `nn.Embedding`, its weight, or a .safetensors file holding the weight)."""
        generation_config = None
        if isinstance(config, (str, os.PathLike)):
            if os.path.isfile(os.path.join(config, "generation_config.json")):
                generation_config = GenerationConfig.from_pretrained(config)
            config = AutoConfig.from_pretrained(config)
        if isinstance(embedding, (str, os.PathLike)):
            from safetensors.torch import load_file

            tensors = load_file(str(embedding))
            if len(tensors) != 1:
                raise ValueError(f"{embedding} holds {len(tensors)} tensors ({sorted(tensors)[:3]}...); give a file "
                                 "holding only the input embedding's weight, or the weight itself.")
            embedding = next(iter(tensors.values()))
        if isinstance(embedding, torch.Tensor):
            embedding = nn.Embedding.from_pretrained(embedding, freeze=True)
        return cls(config, embedding, generation_config)

    @classmethod
    def load(cls, directory: str) -> TargetParts:
        return cls.of(directory, os.path.join(directory, EMBEDDING_FILE))

    def save(self, directory: str) -> None:
        """config.json, generation_config.json and the embedding's weight in its own dtype (bf16 for real targets;
        kept exact, since a head reads these very values when it drafts)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
        save_file({"weight": self.embedding.weight.detach().cpu().contiguous()}, os.path.join(directory,
                                                                                              EMBEDDING_FILE))


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
    # the tail summed where it lies (in place): log(1 − Σ p_top) cancels badly when the kept mass is near 1, and
    # leaves rounding noise where nothing is cut
    tail = log_probs.scatter_(-1, top.indices, float("-inf")).logsumexp(-1).clamp(min=ABSENT)
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
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    # typed: inferred from the values, the int16 bit patterns would be stored as int64 (4x the bytes)
    features = Features({"input_ids": List(Value("int64")), "labels": List(Value("int64")),
                         "teacher_top_ids": List(List(Value("int32"))),
                         "teacher_top_logprobs": List(List(Value("int16"))),
                         "teacher_tail_logprob": List(Value("float32"))})
    if state_layers is not None:
        features[STATES_COLUMN] = List(List(Value("int16")))
    shards, pending = [], []
    for row in _teacher_rows(target, rows, top_k, temperature, state_layers, batch_size, pad_token_id, progress):
        pending.append(row)
        if len(pending) == SHARD_ROWS:
            shards.append(Dataset.from_list(pending, features=features))
            pending = []
    if pending or not shards:
        shards.append(Dataset.from_list(pending, features=features))
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
                "teacher_top_ids": stored["teacher_top_ids"].int().numpy(),
                "teacher_top_logprobs": to_bf16_bits(stored["teacher_top_logprobs"]).numpy(),
                "teacher_tail_logprob": stored["teacher_tail_logprob"].float().numpy(),
                **({STATES_COLUMN: to_bf16_bits(stored[STATES_COLUMN]).numpy()} if STATES_COLUMN in stored else {}),
            }


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class OfflineTeacherCollator:
    """Right-pads rows of a teacher dataset: `input_ids`, `labels`, `attention_mask` as `DraftDataCollator`, plus
    `teacher_top_ids` [B, T, k], `teacher_top_logprobs` [B, T, k], `teacher_tail_logprob` [B, T] and, when
    stored, `teacher_states` [B, T, n·H] (float32; padding positions hold zeros, never trained). Rows are cut to
    their first `max_length` tokens. Rows may hold lists or arrays (`dataset.with_format("numpy")`, much faster for
    stored states)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cut = slice(0, self.max_length)
        batch = pad_rows([{"input_ids": list(r["input_ids"][cut]), "labels": list(r["labels"][cut])} for r in rows],
                         self.pad_token_id)
        length = batch["input_ids"].shape[1]
        columns = {"teacher_top_ids": lambda v: torch.from_numpy(v).long(), "teacher_top_logprobs": from_bf16_bits,
                   "teacher_tail_logprob": lambda v: torch.from_numpy(v).float(), STATES_COLUMN: from_bf16_bits}
        for name, decode in columns.items():
            if name in rows[0]:
                values = [np.asarray(row[name])[cut] for row in rows]
                padded = np.zeros((len(rows), length, *values[0].shape[1:]), dtype=values[0].dtype)
                for index, value in enumerate(values):
                    padded[index, : len(value)] = value
                batch[name] = decode(padded)
        return batch


def coarse_student_log_probs(student_logits: torch.Tensor, top_ids: torch.Tensor,
                             expressible: torch.Tensor | None = None):
    """The student's log-probabilities of the teacher's kept ids [.., k] (`top_ids` index the student's logits;
    `ABSENT` where `expressible` [.., k] is False: ids the student's vocabulary lacks) and of everything else, its
    bucket [..]. The bucket is summed over the ids it holds, not taken as 1 − Σ kept, which cancels badly exactly
    when the student is good (and is -inf when every id is kept)."""
    log_q = student_logits.float().log_softmax(-1)
    vocab = log_q.shape[-1]
    if expressible is not None:
        top_ids = top_ids.where(expressible, vocab)  # a spare column for the ids the student lacks
    kept = F.pad(log_q, (0, 1), value=ABSENT).gather(-1, top_ids)
    in_kept = torch.zeros(*log_q.shape[:-1], vocab + 1, dtype=torch.bool, device=log_q.device)
    in_kept = in_kept.scatter_(-1, top_ids, True)[..., :vocab]
    return kept, log_q.masked_fill(in_kept, float("-inf")).logsumexp(-1)


def coarse_log_probs(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                     tail_logprob: torch.Tensor, expressible: torch.Tensor | None = None):
    """`(teacher, student)` log-probabilities [.., k + 1] of the coarse distributions: the k kept ids, then the
    bucket (see the module docstring). Kept ids that are not `expressible` are `ABSENT` in both (probability 0),
    and the teacher is renormalised over its other kept ids and its tail."""
    kept, bucket = coarse_student_log_probs(student_logits, top_ids, expressible)
    teacher = top_logprobs.float()
    if expressible is not None:
        teacher = teacher.masked_fill(~expressible, ABSENT)
    teacher = torch.cat([teacher, tail_logprob.float()[..., None]], dim=-1)
    return teacher - teacher.logsumexp(-1, keepdim=True), torch.cat([kept, bucket[..., None]], dim=-1)


def sparse_forward_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor, expressible: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ q) per token [..] between the coarse teacher (k kept tokens + tail) and the student coarsened the
    same way (see the module docstring)."""
    teacher, student = coarse_log_probs(student_logits, top_ids, top_logprobs, tail_logprob, expressible)
    return forward_kl(student, teacher)  # of normalised log-probabilities: its softmax changes nothing
