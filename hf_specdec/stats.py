"""Per-call speculative decoding statistics (`out.spec_stats`, `drafter.last_stats`)."""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass, field

import torch

# Phases of a speculative round (plus "prefill" before the rounds and "draft_forward" inside "draft").
ROUND_PHASES = ("draft", "verify_forward", "processors", "acceptance", "cache", "bookkeeping")
PHASES = ("prefill", *ROUND_PHASES)
_NO_TIMING = contextlib.nullcontext()


class PhaseClock:
    """The one timer of the engine and its drafters: `with clock("draft"): ...`.

    Off (the default) it costs nothing. With `timing=True` it synchronises the device around every phase and adds
    up wall seconds per phase; inside `profiled_phases()` each phase is also a `spec::<phase>` torch.profiler range
    (`recipes/profile_engine.py` attributes every op to its phase).
    """

    profiling = False  # set by profiled_phases()

    def __init__(self, device: torch.device, timing: bool = False):
        self.device, self.timing = torch.device(device), timing
        self.seconds: collections.Counter = collections.Counter()

    def __call__(self, phase: str):
        if not (self.timing or PhaseClock.profiling):
            return _NO_TIMING
        return self._measured(phase)

    @contextlib.contextmanager
    def _measured(self, phase: str):
        ranges = torch.profiler.record_function(f"spec::{phase}") if PhaseClock.profiling else _NO_TIMING
        with ranges:
            if not self.timing:
                yield
                return
            self.synchronize()
            start = time.perf_counter()
            yield
            self.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def profiled_phases():
    """Mark every phase as a `spec::<phase>` torch.profiler range while this is active."""
    PhaseClock.profiling = True
    try:
        yield
    finally:
        PhaseClock.profiling = False


@dataclass
class SpecStats:
    """What one `generate()` call did, per row of the (expanded) batch.

    `drafted[b]`  draft tokens proposed to the target for row b (tree nodes count one each).
    `accepted[b]` draft tokens the verifier accepted for row b (the bonus token is not counted).
    `rounds[b]`   verification forwards row b took part in.
    `rejected[b]` rounds of row b that ended on a refused draft token (the others ran out of draft).
    Phase times are measured only with `generate(..., time_phases=True)` (they synchronise the device around every
    phase; without it they are 0 and the loop never waits for the device). `draft_seconds` / `verify_seconds` are
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
    # routed drafters: {drafter name: {"rows", "rounds", "drafted", "accepted", "alpha", "tau"}} (see RoutedDrafter)
    per_drafter: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str = "cpu") -> SpecStats:
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(drafted=zeros.clone(), accepted=zeros.clone(), rounds=zeros.clone(), rejected=zeros.clone())

    def record_round(self, rows, alive, drafted, accepted, rejected, histogram: torch.Tensor) -> None:
        """Add one round of the rows `rows` (only those `alive`) on the device; nothing is read back."""
        alive = alive.long()
        self.drafted.index_add_(0, rows, drafted * alive)
        self.accepted.index_add_(0, rows, accepted * alive)
        self.rejected.index_add_(0, rows, rejected.long() * alive)
        self.rounds.index_add_(0, rows, alive)
        histogram.index_add_(0, accepted.clamp(max=len(histogram) - 1), alive)

    def finalize(self, histogram: torch.Tensor, clock: PhaseClock) -> None:
        """Bring the device counters to the host once, at the end of generate()."""
        for name in ("drafted", "accepted", "rounds", "rejected"):
            setattr(self, name, getattr(self, name).cpu())
        counts = histogram.tolist()
        while counts and counts[-1] == 0:
            counts.pop()
        self.accepted_length_counts = counts
        seconds = clock.seconds
        self.prefill_seconds = seconds["prefill"]
        self.draft_seconds = seconds["draft"]
        self.verify_seconds = sum(seconds[name] for name in ROUND_PHASES if name != "draft")
        self.target_forward_seconds = seconds["prefill"] + seconds["verify_forward"]
        self.draft_forward_seconds = seconds["draft_forward"]

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
            **({"per_drafter": dict(self.per_drafter)} if self.per_drafter else {}),
        }


def add_counts(total: list[int], more: list[int]) -> list[int]:
    """Element-wise sum of two histograms of possibly different lengths."""
    longer, shorter = (total, more) if len(total) >= len(more) else (more, total)
    return [count + (shorter[index] if index < len(shorter) else 0) for index, count in enumerate(longer)]
