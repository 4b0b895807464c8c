"""Per-call speculative decoding statistics (`out.spec_stats`, `drafter.last_stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpecStats:
    """What one `generate()` call did, per row of the (expanded) batch.

    `drafted[b]`  draft tokens proposed to the target for row b (tree nodes count one each).
    `accepted[b]` draft tokens the verifier accepted for row b (the bonus token is not counted).
    `rounds[b]`   verification forwards row b took part in.
    `rejected[b]` rounds of row b that ended on a refused draft token (the others ran out of draft).
    Times are wall-clock seconds, measured with the device synchronised. `draft_seconds` / `verify_seconds` are
    the two phases of the rounds (Python included); `target_forward_seconds` / `draft_forward_seconds` only the
    model forwards, so `loop_efficiency = model forwards / wall time` (1.0 = zero loop overhead).
    """

    drafted: torch.Tensor
    accepted: torch.Tensor
    rounds: torch.Tensor
    rejected: torch.Tensor | None = None
    target_forwards: int = 0  # prefill + verification forwards of the target
    draft_forwards: int = 0  # forwards of the drafter's model (0 for n-gram drafting)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    wall_seconds: float = 0.0
    target_forward_seconds: float = 0.0  # prefill + verify forwards of the target
    draft_forward_seconds: float = 0.0  # forwards of the drafter's model
    new_tokens: torch.Tensor | None = None  # tokens generated per row (after EOS / length truncation)
    exit_counts: dict[int, int] = field(default_factory=dict)  # sorted drafters: drafted tokens per exit layer
    # rounds by number of accepted draft tokens: accepted_length_counts[k] = rounds (over all rows) that accepted k
    accepted_length_counts: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, batch_size: int) -> SpecStats:
        zeros = torch.zeros(batch_size, dtype=torch.long)
        return cls(drafted=zeros.clone(), accepted=zeros.clone(), rounds=zeros.clone(), rejected=zeros.clone())

    def record_accepted_lengths(self, num_accepted: torch.Tensor) -> None:
        """Add one round's accepted counts (one per active row) to the histogram."""
        self.accepted_length_counts = add_counts(self.accepted_length_counts, torch.bincount(num_accepted).tolist())

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted over the whole batch (α for chains)."""
        drafted = int(self.drafted.sum())
        return int(self.accepted.sum()) / drafted if drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """Probability that a draft token reaching verification is accepted: accepted / (accepted + refused). This
        is the α of the i.i.d. speed-up formula (accepted / drafted also counts tokens drafted past a refusal)."""
        decided = int(self.accepted.sum()) + int(self.rejected.sum())
        return int(self.accepted.sum()) / decided if decided else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ: tokens produced per verification round, bonus included (1.0 = no speed-up from drafting)."""
        rounds = int(self.rounds.sum())
        return (int(self.accepted.sum()) + rounds) / rounds if rounds else 0.0

    @property
    def row_acceptance_rate(self) -> torch.Tensor:
        return self.accepted.double() / self.drafted.clamp(min=1).double()

    @property
    def row_mean_accepted_length(self) -> torch.Tensor:
        return (self.accepted + self.rounds).double() / self.rounds.clamp(min=1).double()

    @property
    def model_seconds(self) -> float:
        return self.target_forward_seconds + self.draft_forward_seconds

    @property
    def loop_efficiency(self) -> float:
        """Share of wall time spent inside model forwards (1.0 = zero loop overhead)."""
        return self.model_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> dict:
        return {
            "acceptance_rate": self.acceptance_rate,
            "per_token_acceptance": self.per_token_acceptance,
            "mean_accepted_length": self.mean_accepted_length,
            "drafted": self.drafted.tolist(),
            "accepted": self.accepted.tolist(),
            "rounds": self.rounds.tolist(),
            "rejected": self.rejected.tolist(),
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "loop_efficiency": self.loop_efficiency,
            "wall_seconds": self.wall_seconds,
            "accepted_length_counts": list(self.accepted_length_counts),
            **({"exit_counts": dict(self.exit_counts)} if self.exit_counts else {}),
        }


def add_counts(total: list[int], more: list[int]) -> list[int]:
    """Element-wise sum of two histograms of possibly different lengths."""
    longer, shorter = (total, more) if len(total) >= len(more) else (more, total)
    return [count + (shorter[index] if index < len(shorter) else 0) for index, count in enumerate(longer)]
