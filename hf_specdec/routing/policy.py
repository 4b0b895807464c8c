"""OnlinePolicy: per-row drafter switching while a row is generated, a bandit with bounded exploration.

A router picks each row's drafter from the prompt alone; the text a row goes on to generate can suit another
drafter better (a code question answered in prose), or none (a row whose drafts keep being refused). The policy
watches every row's tokens per verification round on its current drafter and, every `check_every` rounds (one read
from the device), may move the row:

- value of a drafter on a row = τ / cost: τ (tokens per round) measured on the row, discounted so its recent
  rounds count most, over the round's relative cost 1 + c, where c is the drafter's draft cost per round
  relative to one target forward (`draft_costs`; by default the draft model's parameter count ÷ the target's,
  times the draft steps of a round — γ for chains, the depth for trees — and 0 for n-gram lookup). "No drafting"
  is an arm of known value 1 (τ = 1 at cost 1) that is never explored. The cost model is per row, so it is exact
  at batch size 1; in a batch, a drafter still running for other rows costs the same whether this row uses it;
- a drafter's prior: the router's predicted τ when a router chose, else the most it could give (γ + 1: optimism
  drives exploration);
- a row starts with a trial of its first drafter; every check after a trial the row takes the arm of highest value
  when it beats the current one by `margin` (hysteresis for the incumbent); taking a drafter not tried yet on the
  row is exploration: the row stays on it for one trial of `trial_rounds` rounds, then the trial's drafter and the
  best other arm are compared without the margin, so a drafter that was only tried never keeps a row on
  hysteresis. Each drafter is tried at most once per row; a value measured earlier stays as measured.

Exploration cost bound: a row spends at most `K · trial_checks · check_every` rounds, with
`trial_checks = ceil(trial_rounds / check_every)`, on drafters that turn out worse than its best arm (K
drafters): every drafter, the first one included, is tried at most once, for `trial_checks` checks. A round spent on a worse drafter still emits at least
one token (the target's), so the loss per such round is below one round's worth of the best drafter's extra
tokens. Output is lossless whatever the policy does: every drafter's drafts go through the same verifier, and
every drafter's cache keeps following the committed text (see `RoutedDrafter`).
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
    margin:       relative value advantage needed to leave the current drafter (hysteresis against noise).
    discount:     weight of a drafter's earlier observations on a row at each check it plays (1.0: plain averages).
    allow_no_draft: a row whose best drafter is worth less than decoding alone stops speculating.
    draft_costs:  {drafter name: draft cost per round ÷ one target forward}; missing names are estimated.
    """

    check_every: int = 4
    trial_rounds: int = 4
    explore: bool = True
    margin: float = 0.1
    discount: float = 0.9
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
        return (num_drafters if self.explore else 1) * self.trial_checks * self.check_every


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
        # every row starts with a trial of its first drafter (one short window is no verdict)
        self.trial_checks_left = torch.full((rows,), policy.trial_checks, dtype=torch.long)
        self.ending_trial = torch.ones(rows, dtype=torch.bool)  # the current arm is (or just was) on trial
        self.tried = torch.zeros(rows, arms, dtype=torch.bool)  # drafters measured on the row (ever)
        self.assignment = assignment.clone()
        self.switches = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        for name in ("value_prior", "tokens", "rounds", "trial_checks_left", "ending_trial", "tried",
                     "assignment"):
            setattr(self, name, getattr(self, name)[rows])

    def values(self) -> torch.Tensor:
        """[B, K + 1] each arm's value per row: measured where tried; the prior for a
        drafter not tried yet (while exploration is on); 1 for "no drafting" (when allowed)."""
        arms = self.value_prior.shape[1]
        tau = self.tokens[:, :arms] / self.rounds[:, :arms].clamp(min=1e-9)
        measured = tau / (1.0 + self.costs)[None, :]
        unexplored = self.value_prior if self.policy.explore else torch.full_like(measured, float("-inf"))
        drafters = torch.where(self.tried, measured, unexplored)
        alone = torch.full((len(drafters), 1), 1.0 if self.policy.allow_no_draft else float("-inf"),
                           dtype=torch.double)
        return torch.cat([drafters, alone], dim=1)

    def observe(self, tokens: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
        """Add the rounds since the last check ([B, K + 1] on the host); returns the new assignment [B]. A row
        with no round since the last check has finished: it moves to "no drafting", so no drafter keeps running
        for it."""
        # only the arm that played is discounted: a value measured earlier stays as measured (it does not drift back
        # to the prior, which would re-explore without bound)
        discount = torch.where(rounds > 0, self.policy.discount, 1.0).double()
        self.tokens = self.tokens * discount + tokens.double()
        self.rounds = self.rounds * discount + rounds.double()
        arms = self.value_prior.shape[1]
        self.tried |= rounds[:, :arms] > 0
        values = self.values()
        rows = torch.arange(len(values))
        current = values[rows, self.assignment]
        best_value, best = values.max(dim=1)
        # a trial runs to its end; then its drafter holds the row only if it is the best, margin or not
        self.trial_checks_left = (self.trial_checks_left - 1).clamp(min=0)
        on_trial = self.trial_checks_left > 0
        trial_ended = self.ending_trial & ~on_trial
        margin = torch.where(trial_ended, 0.0, self.policy.margin)
        switch = ~on_trial & (best != self.assignment) & (best_value > current * (1.0 + margin))
        exploring = switch & (best < arms) & ~self.tried[rows, best.clamp(max=arms - 1)]
        self.trial_checks_left = torch.where(exploring, self.policy.trial_checks, self.trial_checks_left)
        self.ending_trial = exploring | on_trial
        finished = rounds.sum(-1) == 0
        new = torch.where(switch, best, self.assignment)
        new = torch.where(finished, arms, new)
        self.switches += int((switch & ~finished).sum())
        self.assignment = new
        return self.assignment
