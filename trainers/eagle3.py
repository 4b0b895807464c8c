"""EAGLE-3: train a head (`hf_specdec.eagle3.Eagle3DraftModel`) over its frozen target's own hidden states.

Each step runs the target once (no grad) on the batch. Its `hidden_states` at the head's `aux_hidden_state_layer_ids`
are the features, its logits the teacher. Row t pairs the feature at t with the token at t + 1 and predicts the
token at t + 2, whose teacher distribution is the target's at t + 1.

Training-time test (TTT): at inference the head drafts several tokens deep, and every draft step after the first
reads the previous step's output state instead of a target state (a draft token has none). Training unrolls the
same computation `ttt_steps` deep. Step i, row t is the chain rooted at the committed pair (feature t, token t + 1),
i tokens deep: it reads step i − 1's output at row t with the token at t + 1 + i, sits at position t + i (the
previous step's state moves one position on) and predicts the token at t + 2 + i. Its query sees what the drafter's
query sees at that depth: the committed pairs up to its root (step-0 keys at positions ≤ t) and its own chain (the
step-j keys of row t, j = 1..i; the head's cache concatenates each step's keys). SpecForge's trainer also hides
step-0 keys t − i + 1..t from step i; drafting does not (nor does speculators' trainer), so neither does this one.

Loss: at every step and trained row, a per-token divergence (`divergence`, forward KL by default: SpecForge's soft
cross-entropy minus the target's entropy, so the same gradients) between the head and the target's distribution
restricted to the draft vocabulary; rows whose target argmax is outside it are skipped (the head cannot propose
that token). Step i is weighted `ttt_decay ** i`; the sum is divided by the number of trained step-0 rows in the
optimizer step (`count_loss_tokens`), which keeps gradients exact under accumulation and across processes.

Offline teachers: a training set written by `recipes/offline_teacher.py` (`trainers.offline`) already holds, per
token, the target's states at the head's layers and its top-k next-token log-probabilities with their tail mass,
so no target runs and none is in memory. The features are the stored states; the teacher is the stored sparse
distribution, restricted to the draft vocabulary as `trainers.offline` describes: the kept ids in the draft
vocabulary keep their probability, the kept ids outside it leave (as the online loss drops them), the teacher is
renormalised over the rest, and the tail is one bucket, matched by the head's mass outside the kept ids. The
divergence (any of `divergence`) is taken between these coarse distributions: the online loss itself when the
stored k covers the vocabulary; otherwise it trains the probability of every kept id and the mass of the rest.
Masking and indexing are the online path's, with the stored most likely id as the target's argmax.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, DynamicCache, PretrainedConfig, set_seed

from hf_specdec.eagle3 import Eagle3DraftModel
from hf_specdec.eagle3.modeling import check_layer_ids

from .base import (
    BaseDrafterConfig,
    BaseDrafterTrainer,
    call_inside_forward,
    check_same_tokenizer,
    load_causal_lm,
    offline_teacher_datasets,
)
from .losses import IGNORE_INDEX, chunked_token_values, in_backward, normalize_token_loss
from .offline import STATES_COLUMN, OfflineTeacherCollator, TargetParts, TeacherMetadata
from .teachers import StoredTeacher, StudentVocabulary, Teacher


@dataclass
class Eagle3TrainingConfig(BaseDrafterConfig):
    """Configuration of `Eagle3Trainer`: `TrainingArguments`, the shared drafter-training fields (`divergence`,
    `temperature`, `max_length`, ...) and the EAGLE-3 fields below."""

    ttt_steps: int = field(
        default=7,
        metadata={"help": "Training-time test length: draft steps unrolled per position (EAGLE-3 and SpecForge: 7). "
                  "Step i trains the head's (i + 1)-th draft token, which reads its own earlier output states."},
    )
    ttt_decay: float = field(
        default=0.8,
        metadata={"help": "Loss weight of TTT step i is ttt_decay ** i (EAGLE-3: 0.8): later draft tokens are only "
                  "reached when the earlier ones are accepted."},
    )
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "A fresh head (no `model` given) drafts over the draft_vocab_size most frequent trained "
                  "tokens of the training set, plus the target's EOS / PAD (see `build_draft_vocabulary`). None: "
                  "the target's whole vocabulary. A given head keeps its own."},
    )
    aux_hidden_state_layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Target hidden_states indices a fresh head reads (0 = embeddings, k = output of decoder "
                  "layer k - 1), low to high. None: an offline teacher's stored layers, else EAGLE-3's (2, L // 2, "
                  "L - 3), or the states at 1/4, 1/2 and 3/4 of the depth for targets too shallow for that. A given "
                  "head keeps its own."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be at least 1 (the first draft step), got {self.ttt_steps}.")
        if self.ttt_decay <= 0:
            raise ValueError(f"ttt_decay must be > 0, got {self.ttt_decay}.")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be at least 1, got {self.draft_vocab_size}.")
        if self.aux_hidden_state_layer_ids is not None and not self.aux_hidden_state_layer_ids:
            raise ValueError("aux_hidden_state_layer_ids is empty: give target hidden_states indices, e.g. "
                             "[2, 16, 29].")


# ----- the draft vocabulary ---------------------------------------------------------------------------------------


def token_counts(dataset_or_token_ids, vocab_size: int) -> torch.Tensor:
    """`[vocab_size]` occurrences of each id: in a tokenized dataset's trained `labels` (its `input_ids` when it has
    no labels), or in a tensor / (nested) list of ids. -100 (untrained) is skipped."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    if hasattr(dataset_or_token_ids, "column_names"):
        column = "labels" if "labels" in dataset_or_token_ids.column_names else "input_ids"
        # that column alone, as Arrow: whatever the dataset's format, and never its other (teacher) columns
        batches = dataset_or_token_ids.select_columns([column]).with_format("arrow").iter(batch_size=1024)
        chunks = (torch.tensor(batch.column(column).combine_chunks().flatten().to_numpy()) for batch in batches)
    else:
        chunks = [dataset_or_token_ids]
    for chunk in chunks:
        ids = _flat_ids(chunk)
        ids = ids[ids != IGNORE_INDEX]
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"Token ids must lie in [0, {vocab_size}) (the target's vocabulary), got "
                             f"{int(ids.min())}..{int(ids.max())}.")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def _flat_ids(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.flatten().long()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = [token for row in ids for token in row]
    return torch.as_tensor(ids, dtype=torch.long)


def build_draft_vocabulary(dataset_or_token_ids, target_vocab_size: int, draft_vocab_size: int,
                           special_token_ids: Iterable[int] = ()) -> torch.Tensor:
    """The draft vocabulary: sorted target ids of the `special_token_ids` (always kept: a head that cannot propose
    EOS never finishes a draft) and of the most frequent tokens (see `token_counts`), ties broken by the lower id,
    `draft_vocab_size` in all."""
    if not 1 <= draft_vocab_size <= target_vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, {target_vocab_size}] (the target's "
                         "vocabulary).")
    special = sorted({int(i) for i in special_token_ids})
    if any(not 0 <= i < target_vocab_size for i in special):
        raise ValueError(f"Special token ids {special} must lie in [0, {target_vocab_size}).")
    if len(special) > draft_vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} cannot hold the {len(special)} special tokens "
                         f"{special} that every draft vocabulary keeps.")
    counts = token_counts(dataset_or_token_ids, target_vocab_size)
    counts[special] = -1  # placed separately, never twice
    by_frequency = torch.argsort(-counts, stable=True)  # stable: equal counts stay in id order
    chosen = torch.cat([torch.tensor(special, dtype=torch.long), by_frequency[: draft_vocab_size - len(special)]])
    return chosen.sort().values


def generation_special_ids(target) -> list[int]:
    """The EOS and PAD ids the target's generation config names (either may be a list, or absent)."""
    config = getattr(target, "generation_config", None)
    ids = []
    for value in (getattr(config, "eos_token_id", None), getattr(config, "pad_token_id", None)):
        ids += value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    return ids


# ----- the TTT unroll ---------------------------------------------------------------------------------------------


def chain_roots(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool `[B, T - 1]`: row t's pair (feature t, token t + 1) is real text, so a draft chain can start there."""
    real = attention_mask.bool()
    return real[:, :-1] & real[:, 1:]


def step_targets(labels: torch.Tensor, roots: torch.Tensor, step: int) -> torch.Tensor:
    """Bool `[B, T - 2 - step]`: rows t whose TTT step `step` predicts a trained token (the one at t + 2 + step)
    from a real chain root."""
    rows = max(labels.shape[1] - 2 - step, 0)
    return (labels[:, 2 + step :] != IGNORE_INDEX) & roots[:, :rows]


def ttt_attention_mask(roots: torch.Tensor, step: int) -> torch.Tensor:
    """Bool `[B, 1, R, (step + 1) R]` over the keys of steps 0..step (the cache's order): the query of row t sees the
    real committed pairs up to its root (step-0 keys ≤ t) and its own chain (row t of steps 1..step). Every query
    sees its own key, so no row is left with nothing to attend to."""
    rows = roots.shape[1]
    index = torch.arange(rows, device=roots.device)
    committed = (index[None, :] <= index[:, None])[None] & roots[:, None, :]
    own_chain = (index[None, :] == index[:, None])[None].expand(len(roots), -1, -1)
    return torch.cat([committed | own_chain, *[own_chain] * step], dim=-1)[:, None]


def ttt_unroll(head: Eagle3DraftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               features: torch.Tensor, ttt_steps: int, pad_token_id: int = 0, project: bool = True) -> list[torch.Tensor]:
    """The head's logits `[B, T - 1, V_draft]` at every TTT step (see the module docstring): row t of step i drafts
    the token at t + 2 + i from the chain rooted at the pair (`features[:, t]`, `input_ids[:, t + 1]`). With
    `project=False`, the states its LM head reads `[B, T - 1, H]` instead (the loss projects them chunk by chunk).

    `features` is `[B, T, n, H_t]` or `[B, T, n·H_t]` (the target's states at the head's layers). Rows whose token
    would lie past the end read `pad_token_id`; only their own chain sees them."""
    roots = chain_roots(attention_mask)
    rows = roots.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, :rows]  # as the drafter counts committed pairs
    padded = F.pad(input_ids, (0, ttt_steps), value=pad_token_id)
    cache = DynamicCache()
    state, step_logits = None, []
    for step in range(ttt_steps):
        tokens = padded[:, 1 + step : 1 + step + rows]
        inputs = {"features": features[:, :rows]} if step == 0 else {"hidden_states": state}
        out = head(input_ids=tokens, attention_mask=ttt_attention_mask(roots, step), position_ids=positions + step,
                   cache=cache, logits_to_keep=0 if project else 1, **inputs)
        state = out.hidden_states
        # the LM head reads norm(layer output); the state handed on is already that when the head norms its output
        step_logits.append(out.logits if project else state if head.config.norm_output else head.norm(state))
    return step_logits


# ----- the teachers -----------------------------------------------------------------------------------------------


# ----- the trainer ------------------------------------------------------------------------------------------------


class Eagle3Trainer(BaseDrafterTrainer):
    """Train an EAGLE-3 head (`model`) for its frozen target (`teacher_model`); see the module docstring.

    `model` is an `Eagle3DraftModel`, a path to one, or None: a fresh head is built for the target
    (`Eagle3DraftModel.from_target`, `args.aux_hidden_state_layer_ids`) with a draft vocabulary of
    `args.draft_vocab_size` tokens counted on `train_dataset`. The head embeds with the target's input embedding
    (held by reference: frozen, never in the optimizer). The tokenizer is the target's (loaded from `teacher_model` when it is a path, or from
    the `teacher_metadata` folder).

    With an offline teacher dataset as `train_dataset` (and `eval_dataset`: `recipes/offline_teacher.py` writes
    both), no target runs or stays in memory. The head still needs two things of its target: the input embedding
    (it reads tokens through it; a head checkpoint does not hold it) and, for a fresh head, the config. They come
    from the first of:

    - `teacher_model`: the target, or a path to it — used for its config and embedding only, never run, not kept;
    - `target_config` (a `PretrainedConfig`, or a folder / config.json) and `target_embedding` (an `nn.Embedding`,
      its weight, or a .safetensors file of it);
    - `teacher_metadata` given as the folder that recipes/offline_teacher.py wrote: its `target/` subfolder.

    `teacher_metadata` (a `TeacherMetadata` or the folder of its teacher.json) is checked against the head: the
    stored layers must be the ones it reads (a fresh head reads them by default), the vocabulary its target's, the
    stored temperature `args.temperature`. Without it only the width of the stored states is checked.
    """

    config_class = Eagle3TrainingConfig
    requires_teacher = False  # checked here: a target to run, or an offline teacher dataset
    supports_packing = False  # the training-time-test unroll builds its chains row by row
    offline_teacher_replaces_model = False  # with an offline teacher, `teacher_model` gives the config and embedding
    logits_for_metrics = False  # the head reads the target's states
    _tag_names = (*BaseDrafterTrainer._tag_names, "eagle3")
    _name = "EAGLE-3"
    _paper: ClassVar[dict[str, str]] = {
        "title": "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test",
        "arxiv": "2503.01840",
    }

    def __init__(self, model: str | Eagle3DraftModel | None = None, teacher_model=None,
                 args: Eagle3TrainingConfig | None = None, *, processing_class=None,
                 teacher_metadata: TeacherMetadata | str | None = None,
                 target_config: PretrainedConfig | str | None = None,
                 target_embedding: nn.Embedding | torch.Tensor | str | None = None, **kwargs):
        if args is None:
            args = Eagle3TrainingConfig(output_dir="eagle3-head")
        elif not isinstance(args, Eagle3TrainingConfig):
            raise TypeError(f"Eagle3Trainer needs an Eagle3TrainingConfig, got {type(args).__name__}.")
        datasets = self._given_datasets(kwargs)
        self.offline = offline_teacher_datasets(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        if isinstance(teacher_model, str):
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(teacher_model)
            else:
                check_same_tokenizer(processing_class, teacher_model, "teacher_model")
        elif (processing_class is None and isinstance(teacher_metadata, (str, os.PathLike))
              and os.path.isfile(os.path.join(teacher_metadata, "tokenizer_config.json"))):
            processing_class = AutoTokenizer.from_pretrained(teacher_metadata)  # recipes/offline_teacher.py saves it
        if self.offline:
            metadata, target = self._offline_target(teacher_model, teacher_metadata, target_config, target_embedding,
                                                    args)
        elif teacher_model is None:
            raise ValueError("Eagle3Trainer needs `teacher_model=` (the target whose hidden states the head reads), "
                             "or an offline teacher dataset as `train_dataset` (recipes/offline_teacher.py).")
        elif not (teacher_metadata is None and target_config is None and target_embedding is None):
            raise ValueError("`teacher_metadata`, `target_config` and `target_embedding` are for training from an "
                             "offline teacher dataset, but the datasets have no teacher columns "
                             "(recipes/offline_teacher.py writes them); a live target needs only `teacher_model`.")
        else:
            metadata, target = None, load_causal_lm(teacher_model, args.teacher_model_init_kwargs, "teacher_model")
        head = self._head(model, target, args, metadata)
        head.attach_target(target)
        head.config.draft_length = args.ttt_steps  # what exports propose and as_drafter() defaults to
        if self.offline:
            self._check_stored_states(head, metadata, args, datasets)
            kwargs["data_collator"] = kwargs.get("data_collator") or OfflineTeacherCollator(
                self._resolve_pad_token_id(processing_class, head), args.max_length)
        self._teacher_top_k = metadata.top_k if metadata is not None else None
        args = copy.copy(args)  # the caller's config stays as given (it may build another trainer)
        args.model_init_kwargs = args.teacher_model_init_kwargs = None  # consumed: the base class must not load again
        # the head's forward takes no `labels`, so Trainer would drop that column; tokenized rows have nothing else
        args.remove_unused_columns = False
        super().__init__(head, None if self.offline else target, args, processing_class=processing_class, **kwargs)
        if self.offline:  # no target is placed, and the head holds the embedding by reference: bring it to the head
            weight = target.get_input_embeddings().weight.detach().to(self.args.device)  # a copy only if elsewhere
            head.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
        if self._fresh_vocabulary:
            self._choose_draft_vocabulary(head, target)

    # ----- construction -----------------------------------------------------------------------------------------------

    @staticmethod
    def _given_datasets(kwargs: dict[str, Any]) -> dict[str, Any]:
        given = {"train_dataset": kwargs.get("train_dataset")}
        eval_dataset = kwargs.get("eval_dataset")
        if isinstance(eval_dataset, dict):
            given.update({f"eval_dataset[{name!r}]": dataset for name, dataset in eval_dataset.items()})
        else:
            given["eval_dataset"] = eval_dataset
        return {name: dataset for name, dataset in given.items() if dataset is not None}

    def _offline_target(self, teacher_model, teacher_metadata, target_config, target_embedding,
                        args: Eagle3TrainingConfig) -> tuple[TeacherMetadata | None, TargetParts]:
        """The stored teacher's metadata and what the head needs of the target (see the class docstring)."""
        folder = None
        if isinstance(teacher_metadata, (str, os.PathLike)):
            folder, teacher_metadata = teacher_metadata, TeacherMetadata.load(teacher_metadata)
        if teacher_model is not None:
            if target_config is not None or target_embedding is not None:
                raise ValueError("Give the target's config and embedding once: `teacher_model=` or "
                                 "`target_config=` / `target_embedding=`, not both.")
            parts = TargetParts.from_model(load_causal_lm(teacher_model, args.teacher_model_init_kwargs,
                                                          "teacher_model"))
        elif target_config is None and target_embedding is None and folder and teacher_metadata.target_parts:
            parts = TargetParts.load(os.path.join(folder, teacher_metadata.target_parts))
        else:
            parts = TargetParts.of(target_config, target_embedding)
        if parts.embedding is None:
            raise ValueError(
                "Training from an offline teacher still needs the target's input embedding: the head reads tokens "
                "through it, and a head checkpoint does not hold it. Pass `target_embedding=` (an nn.Embedding, its "
                "weight, or a .safetensors file of it), `teacher_model=` (the target: used for its config and "
                "embedding only, never run) or `teacher_metadata=` the folder recipes/offline_teacher.py wrote.")
        return teacher_metadata, parts

    def _head(self, model, target, args: Eagle3TrainingConfig, metadata: TeacherMetadata | None) -> Eagle3DraftModel:
        self._fresh_vocabulary = False
        if model is None:
            if target.config is None:
                raise ValueError("A fresh head is shaped after its target: pass `target_config=` (its config, or a "
                                 "folder / config.json), `teacher_model=` (the target, never run) or "
                                 "`teacher_metadata=` the folder recipes/offline_teacher.py wrote; or a head as "
                                 "`model=`.")
            set_seed(args.seed)  # the Trainer seeds itself later; a head built here must be reproducible too
            vocab_size = target.config.get_text_config().vocab_size
            size = args.draft_vocab_size or vocab_size
            self._fresh_vocabulary = size < vocab_size
            # the vocabulary is counted on the tokenized training set, which the base class builds: the head gets
            # its final size now and its ids once the data is there
            placeholder = torch.arange(size) if self._fresh_vocabulary else None
            layers = args.aux_hidden_state_layer_ids or (metadata.state_layers if metadata is not None else None)
            head = Eagle3DraftModel.from_target(target.config, draft_vocab=placeholder,
                                                aux_hidden_state_layer_ids=layers)
            if metadata is not None and metadata.teacher:
                head.config.verifier_name_or_path = metadata.teacher  # the config came from a copy of the target's
            return head
        if isinstance(model, str):
            model = Eagle3DraftModel.from_pretrained(model, **(args.model_init_kwargs or {}))
        elif args.model_init_kwargs:
            raise ValueError("`model_init_kwargs` only apply when `model` is a path to load; you passed a head.")
        if not isinstance(model, Eagle3DraftModel):
            raise TypeError(f"Eagle3Trainer trains an hf_specdec.eagle3.Eagle3DraftModel (or None: a fresh head), "
                            f"got {type(model).__name__}.")
        self._check_given_head(model, target, args)
        return model

    @staticmethod
    def _check_given_head(head: Eagle3DraftModel, target, args: Eagle3TrainingConfig) -> None:
        config = head.config
        for name, own in (("draft_vocab_size", config.draft_vocab_size),
                          ("aux_hidden_state_layer_ids", config.aux_hidden_state_layer_ids)):
            wanted = getattr(args, name)
            if wanted is not None and wanted != own:
                raise ValueError(f"args.{name}={wanted} but the head has {own}; a given head keeps its own, so drop "
                                 f"args.{name} (or pass model=None to build a fresh head).")
        if not config.aux_hidden_state_layer_ids:
            raise ValueError("The head does not say which target states it reads: set "
                             "`head.config.aux_hidden_state_layer_ids`.")
        if target.config is not None:  # an offline teacher may give the embedding alone
            check_layer_ids(config.aux_hidden_state_layer_ids, target.config.get_text_config().num_hidden_layers)

    @staticmethod
    def _check_stored_states(head: Eagle3DraftModel, metadata: TeacherMetadata | None, args: Eagle3TrainingConfig,
                             datasets: dict[str, Any]) -> None:
        """The stored teacher is the one this head reads: its layers, vocabulary and temperature (when the metadata
        says) and the width of its states."""
        layers, hidden = head.config.aux_hidden_state_layer_ids, head.config.target_hidden_size
        if metadata is not None:
            if metadata.state_layers != layers:
                raise ValueError(
                    f"The teacher dataset stores the target's hidden_states {metadata.state_layers}, but the head "
                    f"reads {layers}. Store the head's (recipes/offline_teacher.py --state_layers "
                    f"{' '.join(map(str, layers))}), or train a fresh head, which reads the stored ones.")
            if metadata.vocab_size != head.config.vocab_size:
                raise ValueError(f"The teacher dataset was stored from a target with {metadata.vocab_size} tokens, "
                                 f"but the head's has {head.config.vocab_size}: another target.")
            if metadata.temperature != args.temperature:
                raise ValueError(f"The teacher's distributions are stored at temperature {metadata.temperature}; set "
                                 f"args.temperature to it (it is {args.temperature}).")
        for name, dataset in datasets.items():
            if STATES_COLUMN not in dataset.column_names:
                raise ValueError(f"{name} holds no `{STATES_COLUMN}`, the target states an EAGLE-3 head reads: store "
                                 f"them (recipes/offline_teacher.py --state_layers {' '.join(map(str, layers))}).")
            first = next(iter(dataset.select_columns([STATES_COLUMN])), None)
            width = np.asarray(first[STATES_COLUMN]).shape[-1] if first is not None else len(layers) * hidden
            if width != len(layers) * hidden:
                raise ValueError(f"{name} stores target states {width} wide per token, but the head reads "
                                 f"{len(layers)} states of its target's hidden size {hidden} ({len(layers) * hidden}):"
                                 " they were stored from other layers or another target.")

    def _choose_draft_vocabulary(self, head: Eagle3DraftModel, target) -> None:
        if self.train_dataset is None:
            raise ValueError("A fresh head with draft_vocab_size chooses its vocabulary from `train_dataset`; pass "
                             "one, or a head that has its vocabulary.")
        vocabulary = build_draft_vocabulary(self.train_dataset, head.config.vocab_size, head.config.draft_vocab_size,
                                            generation_special_ids(target))
        head.set_draft_vocabulary(vocabulary.to(head.d2t.device))

    # ----- loss -----------------------------------------------------------------------------------------------------

    def teacher_outputs(self, inputs: dict[str, torch.Tensor], head: Eagle3DraftModel):
        """The head's features `[B, T, n, H_t]` or `[B, T, n·H_t]` and its teacher: the stored states and sparse
        distribution of an offline teacher dataset, or one forward of the target."""
        if self.offline:
            return inputs[STATES_COLUMN], StoredTeacher.from_batch(inputs, None, self.args.temperature)
        teacher, features = self.target_outputs(inputs, head)
        return features, teacher

    def target_outputs(self, inputs: dict[str, torch.Tensor], head: Eagle3DraftModel):
        """The target as a `LiveTeacher` at every position `[B, T, ...]` (TTT step i reads it i positions on;
        projected chunk by chunk) and the head's features `[B, T, n, H_t]`, from one forward."""
        teacher, hidden_states = self.frozen_forward(self.teacher_model, inputs, None, output_hidden_states=True)
        features = torch.stack([hidden_states[k] for k in head.config.aux_hidden_state_layer_ids], dim=-2)
        return teacher, features

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trained rows of TTT step 0: the normaliser of every step's sum."""
        return step_targets(batch["labels"], chain_roots(batch["attention_mask"]), 0).sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = self.accelerator.unwrap_model(model)
        features, teacher = self.teacher_outputs(inputs, head)
        roots = chain_roots(inputs["attention_mask"])
        chunk_size = self.args.loss_chunk_size or inputs["input_ids"].numel()

        def unroll_and_score(input_ids, attention_mask, features):
            # inside the wrapper's forward: DDP then reduces the gradients of every step's forward once
            states = ttt_unroll(head, input_ids, attention_mask, features, self.args.ttt_steps, self.pad_token_id,
                                project=False)
            scored = []
            for step, state in enumerate(states):
                rows = step_targets(inputs["labels"], roots, step)
                where = rows.nonzero(as_tuple=True)  # (row of the batch, chain root) of every trained draft
                step_values = functools.partial(self.step_token_values, head=head, teacher=teacher, step=step,
                                                batch_rows=where[0], targets_at=where[1] + 1 + step)
                scored.append(chunked_token_values(step_values, state[:, : rows.shape[1]][rows], chunk_size))
            return scored

        per_step = call_inside_forward(model, head, unroll_and_score, input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"], features=features)
        per_token = torch.cat([self.args.ttt_decay**step * values["loss"] for step, values in enumerate(per_step)])
        scale = self.loss_scale()
        if num_items_in_batch is None:  # evaluation (or a caller outside Trainer): this batch's own count
            num_items_in_batch, scale = self.count_loss_tokens(inputs).clamp(min=1), 1
        loss = normalize_token_loss(per_token, None, num_items_in_batch, scale)
        for values in per_step:
            self.record_token_values(values)
        return (loss, per_step) if return_outputs else loss

    def step_token_values(self, states: torch.Tensor, chunk: slice, head: Eagle3DraftModel, teacher: Teacher,
                          step: int, batch_rows: torch.Tensor, targets_at: torch.Tensor) -> dict[str, torch.Tensor]:
        """One chunk of TTT step `step`'s trained drafts: the divergence of the head (its LM head applied to the
        chunk's pre-head `states`) from the teacher over the draft vocabulary, zero where the target's argmax is
        outside it (the head can never propose that token); and the metrics: the step's greedy accuracy
        `acc_<step>` and, for the first draft token, the draft vocabulary's coverage and the expected acceptance
        Σ min(p, q) of speculative sampling (a token outside the draft vocabulary is a miss)."""
        vocabulary = StudentVocabulary(head.draft_to_target, head.t2d)
        logits = head.lm_head(states)
        teacher = teacher.at((batch_rows[chunk], targets_at[chunk])).materialized()  # the positions these drafts predict
        wanted = teacher.argmax()
        trained = head.t2d[wanted]
        divergence = teacher.divergence(self.divergence_fn, logits, self.args.temperature, vocabulary)
        values = {"loss": torch.where(trained, divergence, torch.zeros_like(divergence))}
        if not in_backward():
            with torch.no_grad():
                values[f"acc_{step}"] = (head.draft_to_target[logits.argmax(-1)] == wanted).float()
                if step == 0:
                    values["draft_vocab_coverage"] = trained.float()
                    values["expected_acceptance"] = teacher.acceptance(logits, vocabulary)
        return values

    # ----- saving -----------------------------------------------------------------------------------------------------

    def model_card_summary(self) -> dict[str, Any]:
        config = self.accelerator.unwrap_model(self.model).config
        return {
            "divergence": self.args.divergence,
            "temperature": self.args.temperature,
            "TTT steps": f"{self.args.ttt_steps} (step i weighted {self.args.ttt_decay:g}^i)",
            "draft vocabulary": f"{config.draft_vocab_size} of {config.vocab_size} tokens",
            "target hidden states": config.aux_hidden_state_layer_ids,
            "teacher": (f"stored (offline teacher dataset, top-{self._teacher_top_k or 'k'} log-probabilities + tail)"
                        if self.offline else "the live target"),
        }

    def write_model_card(self, output_dir: str, model_name: str | None = None, dataset_name: str | None = None):
        """The shared card, with usage code that loads a head (which is not an `AutoModelForCausalLM`)."""
        super().write_model_card(output_dir, model_name=model_name, dataset_name=dataset_name)
        path = f"{output_dir}/README.md"
        with open(path, encoding="utf-8") as f:
            card = f.read()
        usage = ("import hf_specdec\nfrom hf_specdec.eagle3 import Eagle3DraftModel\n\n"
                 'head = Eagle3DraftModel.from_pretrained("<this checkpoint>")')
        card = card.replace('draft = AutoModelForCausalLM.from_pretrained("<this checkpoint>")', usage)
        card = card.replace("assistant_model=draft)", "assistant_model=head.as_drafter(num_draft_tokens=5))")
        with open(path, "w", encoding="utf-8") as f:
            f.write(card)
