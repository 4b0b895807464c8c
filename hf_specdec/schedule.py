"""`schedule="auto"`: speculate only as much as pays, from costs measured on this hardware and this batch.

A drafter with `schedule="auto"` keeps an `AutoSchedule`. Its cost model, measured once per batch size, device
and compile setting and reused by later generate() calls, holds the cost of a plain decoding step (the first call
runs transformers' own loop, timing its steps: exactly plain speed) and the wall time T(γ) of a whole speculative round
as a function of the draft length γ (the next call times real rounds at a few lengths up to `num_draft_tokens`;
nothing is wasted, they generate tokens). Acceptance
is tracked from the rounds (the per-token acceptance α, read every `CHECK_EVERY` rounds). A round drafts the γ
that maximises expected tokens per second,

    (1 - α^(γ+1)) / (1 - α) / T(γ)      against plain decoding's   1 / T_plain,

the speed-up formula of Leviathan et al. with measured times in place of its cost assumptions. When plain steps
win, rounds draft nothing (and every `EXPLORE_EVERY` rounds one short draft keeps α current). When no draft
length could beat plain steps even if every draft token were accepted, speculation cannot pay on this hardware:
from then on generate() hands the whole call to plain decoding (transformers' own loop, so exactly its speed).
A one-row call also hands over mid-way, at the first round where plain steps win.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

CHECK_EVERY = 4  # rounds between reads of the acceptance counters (one host read each)
EXPLORE_EVERY = 8  # while plain steps win, one round in this many drafts anyway, to keep measuring acceptance
EXPLORE_CALLS = 4  # while plain decoding wins, one generate() call in this many speculates, to re-measure α
SAMPLES = 2  # timed rounds per draft length while calibrating
PRIOR_ACCEPTANCE = 0.7


@dataclass
class CostModel:
    """Measured round seconds by draft length; `seconds(γ)` interpolates linearly between measured lengths."""

    lengths: tuple[int, ...]
    samples: dict[int, list[float]] = field(default_factory=dict)
    plain_step: float | None = None  # seconds per token of plain decoding (transformers' own loop)

    @property
    def calibrated(self) -> bool:
        return all(len(self.samples.get(length, ())) >= SAMPLES for length in self.lengths)

    def next_to_measure(self) -> int:
        return min(self.lengths, key=lambda length: len(self.samples.get(length, ())))

    def add(self, length: int, seconds: float) -> None:
        self.samples.setdefault(length, []).append(seconds)

    def seconds(self, length: int) -> float:
        measured = sorted((g, statistics.median(s)) for g, s in self.samples.items() if s)
        below = [point for point in measured if point[0] <= length]
        above = [point for point in measured if point[0] >= length]
        (g0, t0), (g1, t1) = (below or above)[-1], (above or below)[0]
        return t0 if g1 == g0 else t0 + (t1 - t0) * (length - g0) / (g1 - g0)


def expected_tokens(alpha: float, length: int) -> float:
    """Tokens per round with per-token acceptance α and `length` draft tokens (the bonus token included)."""
    if alpha >= 1.0:
        return length + 1.0
    return (1 - alpha ** (length + 1)) / (1 - alpha)


class AutoSchedule:
    """The draft length of every round, for one drafter (state kept across its generate() calls)."""

    def __init__(self, max_draft_tokens: int):
        self.max_draft_tokens = max_draft_tokens
        self.models: dict[tuple, CostModel] = {}
        self.alpha = PRIOR_ACCEPTANCE
        self.costs: CostModel | None = None
        self.limit = max_draft_tokens
        self.plain_calls = 0

    def start(self, key: tuple, max_draft_tokens: int | None = None) -> None:
        """Begin a generate() call; `key` = (batch size, device type, compiled); `max_draft_tokens` the call's
        longest draft (`num_assistant_tokens`), which the caches are sized for."""
        self.limit = max_draft_tokens or self.max_draft_tokens
        key = (*key, self.limit)
        if key not in self.models:
            grid = {1, 2, self.limit // 2, self.limit}
            self.models[key] = CostModel(tuple(sorted(length for length in grid if length >= 1)))
        self.costs = self.models[key]
        self.rounds = 0

    @property
    def calibrating(self) -> bool:
        return not self.costs.calibrated

    def wants_plain_decoding(self) -> bool:
        """The whole call goes to plain decoding: to measure its speed (first call), because drafting can never
        pay here, or because it did not pay at the acceptance seen so far (one such call in EXPLORE_CALLS
        speculates anyway, so that α stays current)."""
        if self.costs.plain_step is None or self.never_pays():
            return True
        if self.calibrating or self.best_length(self.alpha) > 0:
            return False
        self.plain_calls += 1
        return self.plain_calls % EXPLORE_CALLS != 0

    def observe_plain_step(self, seconds: float) -> None:
        self.costs.plain_step = seconds

    def next_length(self) -> int:
        """This round's draft length; 0 means plain steps are faster (the engine then hands over to plain
        decoding where it can, else drafts nothing and probes every EXPLORE_EVERY rounds)."""
        if self.calibrating:
            return self.costs.next_to_measure()
        best = self.best_length(self.alpha)
        self.rounds += 1
        if best == 0 and self.rounds % EXPLORE_EVERY == 0:
            return self.best_length(1.0)
        return best

    def best_length(self, alpha: float) -> int:
        """The draft length with the most expected tokens per second; 0 when plain steps are faster."""
        rates = {length: expected_tokens(alpha, length) / self.costs.seconds(length)
                 for length in range(1, self.limit + 1)}
        best = max(rates, key=rates.get)
        return best if rates[best] > 1.0 / self.costs.plain_step else 0

    def never_pays(self) -> bool:
        """Even an always-accepted draft would not beat plain steps (with the costs measured so far)."""
        return self.costs is not None and self.costs.calibrated and self.best_length(1.0) == 0

    def observe_round(self, length: int, seconds: float) -> None:
        self.costs.add(length, seconds)

    def observe_acceptance(self, accepted: int, decided: int) -> None:
        """Per-token acceptance over the last rounds (an exponential average, so it follows the text)."""
        if decided:
            self.alpha = 0.5 * self.alpha + 0.5 * min(accepted / decided, 0.999)
