"""Teachers: the distribution a drafter's loss compares it with, live or stored, behind one interface.

- `LiveTeacher`: a frozen model's (the target's, or AdaSPEC's reference drafter's) next-token logits at the trained
  positions, in the model's own dtype. Where the model's LM head can be called outside its forward, it holds the
  final hidden states `[N, H]` instead and projects them a chunk at a time, when the loss asks (`at(rows)`): the
  full `[N, V]` logits never exist. A sharded model (FSDP, ZeRO-3) gathers its head only inside its forward, so its
  logits are computed there, whole (`[N, V]` in its dtype: bf16 is half of one float32 copy).
- `StoredTeacher`: an offline teacher's sparse distribution (`trainers.offline`): the k kept ids, their
  log-probabilities and the tail's mass, at the temperature they were stored at.

Both offer `at(index)`, `argmax()`, `divergence(fn, student_logits, temperature)` and `acceptance(student_logits)`,
optionally through a `StudentVocabulary` (a student that scores a sub-vocabulary: an EAGLE-3 head's draft
vocabulary). The helpers below produce the hidden states and logits both teachers and students are projected from.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .losses import expected_acceptance, shared_vocab
from .offline import coarse_log_probs, coarse_student_log_probs


# ----- hidden states and the LM head -----------------------------------------------------------------------------
def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`model`'s logits from its final (normalised) hidden states: the LM head, then the logit soft-cap of the
    models that have one (Gemma). `verify_lm_head_path` checks that this is the model's own computation."""
    base = base_model(model)
    logits = base.get_output_embeddings()(hidden)
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def final_hidden_states(model: nn.Module, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[B, T, H]`: the hidden states the LM head reads — the decoder's output (adapters included), or a model's own
    `final_hidden_states` (a guided drafter's, steered). The LM head itself does not run: under FSDP2 a head unit
    called in the forward and again in the loss's recomputed chunks breaks backward."""
    own = getattr(base_model(model), "final_hidden_states", None)
    if own is not None:
        return own(**model_inputs)
    return base_model(model).get_decoder()(**model_inputs, use_cache=False).last_hidden_state


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def verify_lm_head_path(model: nn.Module, model_inputs: dict[str, torch.Tensor]) -> bool:
    """Whether `lm_head_logits(final_hidden_states(...))` reproduces the model's logits (checked once per model
    instance on a few tokens: whether it does can depend on the config, e.g. Granite's `logits_scaling`): models
    that scale or post-process their logits in other ways do not, and are then trained on their whole logits instead
    (same loss, more memory)."""
    kind = base_model(model)
    if kind not in _VERIFIED:
        few = {key: value[:1, :8] if torch.is_tensor(value) and value.dim() >= 2 else value
               for key, value in model_inputs.items()}
        outputs = type(model).forward(model, **few, output_hidden_states=True, use_cache=False)
        projected = lm_head_logits(model, final_hidden_states(model, few))
        _VERIFIED[kind] = torch.allclose(projected.float(), outputs.logits.float(), rtol=1e-3, atol=1e-3)
        if not _VERIFIED[kind]:
            import warnings

            warnings.warn(f"{type(kind).__name__}'s logits are not its LM head applied to its last hidden state, so its "
                          "loss is computed from whole logits, not in chunks (the same loss, with the memory of "
                          "full [tokens, vocabulary] logits).", stacklevel=3)
    return _VERIFIED[kind]


# ----- a student over a sub-vocabulary ---------------------------------------------------------------------------
@dataclass
class StudentVocabulary:
    """A student that scores `ids` [d] (target ids, ascending) of a `mask.numel()`-token vocabulary (`mask` [V]:
    True at those ids)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def in_target_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """`[.., V]` logits: the student's at its ids, -inf elsewhere (it can never propose those tokens)."""
        full = logits.new_full((*logits.shape[:-1], self.mask.numel()), float("-inf"))
        return full.index_copy(-1, self.ids, logits)

    def student_columns(self, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's column of every target id, and whether it has one."""
        return (self.mask.cumsum(0) - 1)[target_ids], self.mask[target_ids]


# ----- the teachers ----------------------------------------------------------------------------------------------
@dataclass
class LiveTeacher:
    """A frozen model's logits at the trained positions `[N, V]`, or its final hidden states `[N, H]` and the
    projection that makes logits of them (see the module docstring)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    def at(self, index) -> LiveTeacher:
        if self.logits is not None:
            return LiveTeacher(logits=self.logits[index])
        return LiveTeacher(hidden=self.hidden[index], project=self.project)

    def materialized(self) -> LiveTeacher:
        """The same teacher holding its logits (projected once, for a chunk that reads them several times)."""
        return self if self.logits is not None else LiveTeacher(logits=self.values())

    def values(self) -> torch.Tensor:
        """The logits, projected now if held as hidden states (no grad: the teacher is frozen)."""
        if self.logits is not None:
            return self.logits
        with torch.no_grad():
            return self.project(self.hidden)

    def argmax(self) -> torch.Tensor:
        return self.values().argmax(-1)

    def divergence(self, divergence_fn, student_logits: torch.Tensor, temperature: float,
                   vocabulary: StudentVocabulary | None = None) -> torch.Tensor:
        """Per token: `divergence_fn(student, teacher, temperature)` on the shared vocabulary, or over the
        student's sub-vocabulary (the teacher renormalised there)."""
        teacher = self.values()
        if vocabulary is not None:
            return divergence_fn(student_logits, teacher[..., vocabulary.ids], temperature)
        return divergence_fn(*shared_vocab(student_logits, teacher), temperature)

    def acceptance(self, student_logits: torch.Tensor, vocabulary: StudentVocabulary | None = None) -> torch.Tensor:
        """Σ min(p, q) of speculative sampling at temperature 1 (a token the student cannot propose is a miss)."""
        teacher = self.values()
        if vocabulary is not None:
            return expected_acceptance(vocabulary.in_target_vocabulary(student_logits), teacher)
        return expected_acceptance(*shared_vocab(student_logits, teacher))


@dataclass
class StoredTeacher:
    """An offline teacher's sparse distribution at its stored `temperature`: the k kept ids [.., k] (most likely
    first), their log-probabilities [.., k] and the log-mass of the rest [..]."""

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float
    vocab_size: int | None = None  # the teacher's: a student's (padded) rows past it are cut, as a live teacher's are

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], positions: torch.Tensor | None, temperature: float,
                   vocab_size: int | None = None) -> StoredTeacher:
        """At the trained positions `[B, T-1]` of a batch collated by `OfflineTeacherCollator` (None: every
        position, `[B, T, ...]`)."""
        columns = [batch[name] for name in ("teacher_top_ids", "teacher_top_logprobs", "teacher_tail_logprob")]
        if positions is not None:
            columns = [column[:, :-1][positions] for column in columns]
        return cls(*columns, temperature, vocab_size)

    def at(self, index) -> StoredTeacher:
        return StoredTeacher(self.top_ids[index], self.top_logprobs[index], self.tail_logprob[index],
                             self.temperature, self.vocab_size)

    def materialized(self) -> StoredTeacher:
        return self

    def argmax(self) -> torch.Tensor:
        return self.top_ids[..., 0]

    def _shared(self, student_logits: torch.Tensor) -> torch.Tensor:
        return student_logits[..., : self.vocab_size] if self.vocab_size else student_logits

    def _columns(self, student_logits: torch.Tensor, vocabulary: StudentVocabulary | None):
        if vocabulary is not None:
            return vocabulary.student_columns(self.top_ids)
        # a student whose (padded) head is smaller than the teacher's lacks the ids past it: never real tokens
        return self.top_ids.clamp(max=student_logits.shape[-1] - 1), self.top_ids < student_logits.shape[-1]

    def divergence(self, divergence_fn, student_logits: torch.Tensor, temperature: float,
                   vocabulary: StudentVocabulary | None = None) -> torch.Tensor:
        """Between the coarse distributions over the kept ids the student can express and one bucket for the rest
        (`trainers.offline`); at k = V, the live divergence. The trainers check `temperature` against the stored one
        (`teacher_metadata`)."""
        student_logits = student_logits if vocabulary is not None else self._shared(student_logits)
        columns, expressible = self._columns(student_logits, vocabulary)
        teacher, student = coarse_log_probs(student_logits.float() / temperature, columns, self.top_logprobs,
                                            self.tail_logprob, expressible)
        return divergence_fn(student, teacher, 1.0)  # normalised log-probabilities, already tempered

    def acceptance(self, student_logits: torch.Tensor, vocabulary: StudentVocabulary | None = None) -> torch.Tensor:
        """Σ min(p, q) over the kept ids only, at the stored temperature: the tail's share is not stored, so this
        is a lower bound, exact when nothing is cut."""
        student_logits = student_logits if vocabulary is not None else self._shared(student_logits)
        kept, _ = coarse_student_log_probs(student_logits.float() / self.temperature,
                                           *self._columns(student_logits, vocabulary))
        return torch.minimum(self.top_logprobs.float().exp(), kept.exp()).sum(-1)  # q = 0 outside the vocabulary


Teacher = LiveTeacher | StoredTeacher
