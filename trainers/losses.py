"""Per-token divergences between a drafter and its target, acceptance metrics, and the token normaliser.

Every divergence takes the drafter's (student's) and the target's (teacher's) logits of shape `(..., vocab)` and
returns one float32 value per token, shape `(...)`. `temperature` divides both models' logits, so the loss compares
the same tempered distributions that sampling at that temperature would use. Nothing here reduces over tokens: the
trainers choose which tokens count and call `normalize_token_loss` once, so every loss in this package is a sum
over tokens divided by the number of tokens that count, which is what makes gradients independent of how a batch
is split into micro-batches and processes.

Zero-probability entries (a teacher restricted by top-k / top-p, or `-inf` logits) are legal inputs: a log
probability of -inf is replaced by the log of the smallest positive float32 before it is multiplied, so `0 · log 0`
is 0 and no NaN appears; finite log-probabilities are never changed, so their gradients stay exact. A divergence that is infinite in exact arithmetic (reverse KL against a teacher with holes in its
support) is therefore large but finite, and its gradient pushes the student's mass out of the holes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# log of the smallest positive normal float32: the floor for log-probabilities (see the module docstring).
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)

IGNORE_INDEX = -100

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-softmax of `logits / temperature` over the last dimension."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _floored(log_prob: torch.Tensor) -> torch.Tensor:
    """Zero probabilities (log = -inf) at the floor; every finite log-probability, however small, stays exact and
    keeps its gradient (a clamp would freeze the gradient of a student's very unlikely tokens)."""
    return torch.where(torch.isneginf(log_prob), LOG_PROB_FLOOR, log_prob)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row; zero-probability entries are floored, so they contribute 0 (p = 0) or a large finite
    penalty (q = 0)."""
    return (log_p.exp() * (_floored(log_p) - _floored(log_q))).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher ‖ q_student): mass-covering; the student is penalised wherever the teacher has mass it lacks."""
    return _kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(q_student ‖ p_teacher): mode-seeking; the student is penalised for mass where the teacher has little."""
    return _kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD convention), `0 < beta < 1`.

    With the mixture `m = beta · p_teacher + (1 - beta) · q_student`:
    `JSD_beta = beta · KL(p_teacher ‖ m) + (1 - beta) · KL(q_student ‖ m)`. `beta = 0.5` is the symmetric JSD;
    divided by `beta` it tends to forward KL as `beta → 0`, divided by `1 - beta` to reverse KL as `beta → 1`.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd needs 0 < beta < 1, got {beta}; use forward_kl / reverse_kl for the ends.")
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """TV(p, q) = ½ Σ_x |p(x) − q(x)| = 1 − Σ_x min(p, q): one minus the expected acceptance of speculative sampling."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def expected_acceptance(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Σ_x min(p(x), q(x)): the probability that speculative sampling accepts a token drafted from q at this position."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return torch.minimum(p, q).sum(-1)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both models' argmax agree: the acceptance of a greedy draft under greedy verification."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()


def token_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """−log q(target) per token, float32; `logits` is `(N, vocab)`, `target_ids` is `(N,)`."""
    return F.cross_entropy(logits.float(), target_ids, reduction="none")


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
}


def get_divergence(name: str, beta: float = 0.5) -> Divergence:
    """The per-token divergence called `name` (a key of `DIVERGENCES`), as `fn(student, teacher, temperature)`."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}.")
    if name == "jsd":
        return lambda student, teacher, temperature=1.0: generalized_jsd(student, teacher, temperature, beta)
    return DIVERGENCES[name]


def shared_vocab(*logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut every tensor to the smallest vocabulary among them.

    Models of one family often pad their LM heads to different sizes (e.g. 152064 vs 151936 rows for one
    tokenizer); the rows past the tokenizer are never real tokens, so comparing on the common prefix and
    renormalising there is exact for every token the tokenizer can produce.
    """
    size = min(t.shape[-1] for t in logits)
    return tuple(t[..., :size] for t in logits)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool `(B, T-1)`: logits at position t are trained iff the token they predict, `labels[t+1]`, is not -100."""
    return labels[:, 1:] != IGNORE_INDEX


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed chunk): metrics are skipped there,
    having been recorded in the forward."""
    return torch._C._current_graph_task_id() != -1


def chunked_token_values(token_values: Callable[[torch.Tensor, slice], dict[str, torch.Tensor]],
                         hidden: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor]:
    """`token_values(hidden[rows], rows)` over consecutive chunks of `chunk_size` rows, each value concatenated.

    This is how every loss here meets the LM head: `token_values` projects its chunk of final hidden states `[c, H]` to
    logits `[c, V]` and returns per-token values `[c]`. When gradients are on, each chunk runs under activation
    checkpointing, so no chunk's logits (or their softmax temporaries) outlive it: backward recomputes one chunk at a
    time, and the loss's peak memory is that of one chunk, whatever the number of tokens. With no rows, one empty
    chunk still runs, so that the LM head and everything before it stay in the graph (DDP expects a gradient for every
    parameter, even a zero one).
    """
    rows = hidden.shape[0]
    if rows == 0 or not torch.is_grad_enabled():
        chunks = [token_values(hidden[start:start + chunk_size], slice(start, start + chunk_size))
                  for start in range(0, max(rows, 1), chunk_size)]
    else:
        from torch.utils.checkpoint import checkpoint

        chunks = [checkpoint(token_values, hidden[start:start + chunk_size], slice(start, start + chunk_size),
                             use_reentrant=False) for start in range(0, rows, chunk_size)]
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


def normalize_token_loss(
    per_token: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    num_processes: int = 1,
) -> torch.Tensor:
    """Σ per-token losses over `token_mask` / the number of tokens that count: the normaliser every trainer uses.

    `num_items_in_batch` is the count of tokens that count over the whole gradient-accumulation window, summed over
    all processes when tokens are averaged across devices; the result is then multiplied by `num_processes` because
    DDP averages gradients over processes and the global sum must not be divided twice. Without it (evaluation, or
    a caller outside `Trainer`) the local count — `token_mask.sum()`, or every element when there is no mask — is
    used and `num_processes` is ignored.
    """
    if token_mask is not None:
        per_token = torch.where(token_mask, per_token, torch.zeros_like(per_token))
    total = per_token.sum()
    if num_items_in_batch is None:
        count = token_mask.sum() if token_mask is not None else per_token.numel()
        return total / max(int(count), 1)
    return total / num_items_in_batch * num_processes
