"""Per-call speculative decoding statistics (`out.spec_stats`, `drafter.last_stats`)."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import time
from dataclasses import dataclass, field

import torch

# Phases of a speculative round (plus "prefill" before the rounds and "draft_forward" inside "draft").
ROUND_PHASES = ("draft", "verify_forward", "processors", "acceptance", "cache", "bookkeeping")
PHASES = ("prefill", *ROUND_PHASES)
_NO_TIMING = contextlib.nullcontext()
# the timing clock of the generate() call running in this thread / task (see PhaseClock.running)
_ACTIVE_CLOCK: contextvars.ContextVar = contextvars.ContextVar("hf_specdec_active_clock", default=None)


class PhaseClock:
    """The one timer of the engine and its drafters: `with clock("draft"): ...`.

    Off (the default) it costs nothing. With `timing=True` it synchronises the device around every phase and adds
    up wall seconds per phase; inside `profiled_phases()` each phase is also a `spec::<phase>` torch.profiler range
    (`recipes/profile_engine.py` attributes every op to its phase).

    Model time is measured apart from the phases: `SlotCache` wraps each model call in `model_call()`, which times
    the call alone (as plain generate()'s forward hooks would) and credits it to the draft model when it runs inside
    a "draft_forward" phase, else to the target. What a phase does around the call (masks, slots, inputs) is loop
    overhead.
    """

    profiling = False  # set by profiled_phases()

    def __init__(self, device: torch.device, timing: bool = False):
        self.device, self.timing = torch.device(device), timing
        self.seconds: collections.Counter = collections.Counter()
        self.open_phases: list[str] = []

    def __call__(self, phase: str):
        if not (self.timing or PhaseClock.profiling):
            return _NO_TIMING
        return _Phase(self, phase)

    @contextlib.contextmanager
    def running(self):
        """Make this clock the one `model_call()` reports to for the duration of a generate() call."""
        token = _ACTIVE_CLOCK.set(self if self.timing else None)
        try:
            yield
        finally:
            _ACTIVE_CLOCK.reset(token)

    @staticmethod
    def model_call():
        """Time one model call (`target_forward` or `draft_forward` seconds) when a timing clock is running; under
        `profiled_phases()` also mark it as a `spec::model_call` range (the profile splits the model's ops from the
        loop's around it)."""
        clock = _ACTIVE_CLOCK.get()
        if clock is None and not PhaseClock.profiling:
            return _NO_TIMING
        return _ModelCall(clock)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Phase:
    """One measured phase (a class, not a generator: entering and leaving it is cheap)."""

    __slots__ = ("clock", "phase", "range", "start")

    def __init__(self, clock: PhaseClock, phase: str):
        self.clock, self.phase = clock, phase
        self.range = torch.profiler.record_function(f"spec::{phase}") if PhaseClock.profiling else None

    def __enter__(self):
        if self.range is not None:
            self.range.__enter__()
        self.clock.open_phases.append(self.phase)
        if self.clock.timing:
            self.clock.synchronize()
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        clock = self.clock
        if clock.timing:
            clock.synchronize()
            clock.seconds[self.phase] += time.perf_counter() - self.start
        clock.open_phases.pop()
        if self.range is not None:
            self.range.__exit__(*exc)


@contextlib.contextmanager
def timed_forwards(model: torch.nn.Module):
    """Time every forward of `model` as a model call while transformers' own loop runs it (auto's plain decoding),
    so loop efficiency sees those forwards as it sees ours."""
    calls = []

    def before(module, args):
        calls.append(PhaseClock.model_call())
        calls[-1].__enter__()

    def after(module, args, output):
        calls.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _ModelCall:
    """One model call: timed when a clock is given, a profiler range while profiling."""

    __slots__ = ("clock", "range", "start")

    def __init__(self, clock: PhaseClock | None):
        self.clock = clock
        self.range = torch.profiler.record_function("spec::model_call") if PhaseClock.profiling else None

    def __enter__(self):
        if self.range is not None:
            self.range.__enter__()
        if self.clock is not None:
            self.clock.synchronize()
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        clock = self.clock
        if clock is not None:
            clock.synchronize()
            model = "draft_forward" if clock.open_phases and clock.open_phases[-1] == "draft_forward" \
                else "target_forward"
            clock.seconds[f"model:{model}"] += time.perf_counter() - self.start
        if self.range is not None:
            self.range.__exit__(*exc)


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
    model calls themselves (not the masks, slots and inputs built for them: the window plain generate()'s forward
    hooks would time), so `loop_efficiency = model calls / wall time` (1.0 = zero loop overhead).
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
    # during the call: [4, B] on the device whose rows are drafted, accepted, rejected, rounds (one add per round)
    counters: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str = "cpu") -> SpecStats:
        counters = torch.zeros(4, batch_size, dtype=torch.long, device=device)
        drafted, accepted, rejected, rounds = counters  # views: the fields follow the counters
        return cls(drafted=drafted, accepted=accepted, rounds=rounds, rejected=rejected, counters=counters)

    def record_round(self, rows, alive, drafted, accepted, rejected, histogram: torch.Tensor) -> None:
        """Add one round of the rows `rows` (only those `alive`; None: every row) on the device; nothing is read
        back."""
        counts = torch.stack([drafted, accepted, rejected, alive]) * alive
        if rows is None:
            self.counters += counts
        else:
            self.counters.index_add_(1, rows, counts)
        histogram.index_add_(0, accepted.clamp(max=len(histogram) - 1), counts[3])

    def finalize(self, histogram: torch.Tensor, clock: PhaseClock) -> None:
        """Bring the device counters to the host once, at the end of generate()."""
        for name in ("drafted", "accepted", "rounds", "rejected"):
            setattr(self, name, getattr(self, name).cpu())
        self.counters = None
        counts = histogram.tolist()
        while counts and counts[-1] == 0:
            counts.pop()
        self.accepted_length_counts = counts
        seconds = clock.seconds
        self.prefill_seconds = seconds["prefill"]
        self.draft_seconds = seconds["draft"]
        self.verify_seconds = sum(seconds[name] for name in ROUND_PHASES if name != "draft")
        self.target_forward_seconds = seconds["model:target_forward"]
        self.draft_forward_seconds = seconds["model:draft_forward"]

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
