"""OnlinePolicy: per-row drafter switching while a row is generated, a bandit with bounded exploration.

A router picks each row's drafter from the prompt alone; the text a row goes on to generate can suit another
drafter better (a code question answered in prose), or none (a row whose drafts keep being refused). The policy
watches every row's tokens per verification round on its current drafter and, every `check_every` rounds (one read
from the device), may move the row:

- value of a drafter on a row = τ / cost: measured τ (tokens per round, discounted so recent rounds count most)
  over the round's relative cost 1 + c, where c is the drafter's draft cost per round relative to one target
  forward (`draft_costs`; by default the draft model's parameter count ÷ the target's, times the draft length,
  and 0 for n-gram lookup). "No drafting" is an arm of known value 1 (τ = 1 at cost 1) that is never explored;
- a drafter not yet tried on the row is valued at its prior: the router's predicted τ when a router chose, else
  the most it could give (γ + 1, optimism drives exploration);
- at every check the row takes the arm of highest value when it beats the current one by `margin`; taking a
  drafter not tried yet on the row is exploration: the row stays on it for one trial of `trial_rounds` rounds,
  after which the drafter is valued by what it measured (so each drafter is explored at most once per row).

Exploration cost bound: a row spends at most `(K − 1) · trial_checks · check_every` rounds, with
`trial_checks = ceil(trial_rounds / check_every)`, on drafters that turn out worse than its best one (K drafters):
each of the other drafters is tried at most once, for `trial_checks` checks. A round spent on a
worse drafter still emits at least one token (the target's), so the loss per such round is below one round's worth
of the best drafter's extra tokens. Output is lossless whatever the policy does: every drafter's drafts go through
the same verifier, and every drafter's cache keeps following the committed text (see `RoutedDrafter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_DRAFT = "none"  # the arm "stop speculating": the target decodes the row alone


@dataclass
class OnlinePolicy:
    """Settings of the per-row bandit (see the module docstring for the rule and its exploration bound).

    check_every:  rounds between two decisions (each decision reads the device once).
    trial_rounds: rounds a drafter is tried on a row before it is judged.
    explore:      try, once per row, a drafter whose prior beats the current one (off: only measured arms and
                  "no drafting" are taken).
    margin:       relative value advantage needed to switch (hysteresis against noise).
    discount:     weight of earlier observations at each check (1.0: plain averages).
    allow_no_draft: a row whose best drafter is worth less than decoding alone stops speculating.
    draft_costs:  {drafter name: draft cost per round ÷ one target forward}; missing names are estimated.
    """

    check_every: int = 4
    trial_rounds: int = 4
    explore: bool = True
    margin: float = 0.1
    discount: float = 0.8
    allow_no_draft: bool = True
    draft_costs: dict | None = None

    def __post_init__(self):
        if self.check_every < 1 or self.trial_rounds < 1:
            raise ValueError("OnlinePolicy needs check_every >= 1 and trial_rounds >= 1, got "
                             f"{self.check_every} and {self.trial_rounds}.")
        if self.margin < 0 or not 0.0 < self.discount <= 1.0:
            raise ValueError(f"OnlinePolicy needs margin >= 0 and 0 < discount <= 1, got {self.margin}, "
                             f"{self.discount}.")

    @property
    def trial_checks(self) -> int:
        return -(-self.trial_rounds // self.check_every)

    def exploration_bound(self, num_drafters: int) -> int:
        """The most rounds one row can spend trying drafters that are worse than its best."""
        return (num_drafters - 1) * self.trial_checks * self.check_every if self.explore else 0


class RowBandits:
    """The policy's per-row state for one generate() call: arm values, trials left, the current arm.

    Arms 0..K-1 are the drafters; arm K is "no drafting". Everything lives on the host (rows are few; one read of
    the device counters per check).
    """

    def __init__(self, policy: OnlinePolicy, assignment: torch.Tensor, prior_tau: torch.Tensor,
                 costs: torch.Tensor):
        rows, arms = prior_tau.shape
        self.policy = policy
        self.value_prior = prior_tau.double() / (1.0 + costs.double())[None, :]  # [B, K]
        self.costs = costs.double()
        self.tokens = torch.zeros(rows, arms + 1, dtype=torch.double)  # discounted tokens per arm
        self.rounds = torch.zeros(rows, arms + 1, dtype=torch.double)  # discounted rounds per arm
        self.trial_checks_left = torch.zeros(rows, dtype=torch.long)  # > 0: the current arm is on trial
        self.assignment = assignment.clone()
        self.switches = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        for name in ("value_prior", "tokens", "rounds", "trial_checks_left", "assignment"):
            setattr(self, name, getattr(self, name)[rows])

    def values(self) -> torch.Tensor:
        """[B, K + 1] each arm's value per row: measured where tried; the prior for a drafter not tried yet (while
        exploration is on); 1 for "no drafting" (when allowed)."""
        arms = self.value_prior.shape[1]
        measured = self.tokens[:, :arms] / self.rounds[:, :arms].clamp(min=1e-9) / (1.0 + self.costs)[None, :]
        tried = self.rounds[:, :arms] > 0
        unexplored = self.value_prior if self.policy.explore else torch.full_like(measured, float("-inf"))
        drafters = torch.where(tried, measured, unexplored)
        alone = torch.full((len(drafters), 1), 1.0 if self.policy.allow_no_draft else float("-inf"),
                           dtype=torch.double)
        return torch.cat([drafters, alone], dim=1)

    def observe(self, tokens: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
        """Add the rounds since the last check ([B, K + 1] on the host); returns the new assignment [B]."""
        discount = self.policy.discount
        self.tokens = self.tokens * discount + tokens.double()
        self.rounds = self.rounds * discount + rounds.double()
        values = self.values()
        rows = torch.arange(len(values))
        current = values[rows, self.assignment]
        best_value, best = values.max(dim=1)
        # a trial runs to its end; otherwise the best arm is taken when it beats the current one by the margin
        on_trial = self.trial_checks_left > 0
        self.trial_checks_left = (self.trial_checks_left - 1).clamp(min=0)
        switch = ~on_trial & (best != self.assignment) & (best_value > current * (1.0 + self.policy.margin))
        arms = self.value_prior.shape[1]
        exploring = switch & (best < arms) & (self.rounds[rows, best.clamp(max=arms - 1)] == 0)
        self.trial_checks_left = torch.where(exploring, self.policy.trial_checks, self.trial_checks_left)
        self.switches += int(switch.sum())
        self.assignment = torch.where(switch, best, self.assignment)
        return self.assignment
