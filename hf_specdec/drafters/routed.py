"""RoutedDrafter: several drafters behind one; every row of a batch is drafted by the one that suits it.

    routed = RoutedDrafter({"code": ModelDrafter(code_model), "prose": ModelDrafter(prose_model)}, router=router)
    out = target.generate(**batch, assistant_model=routed, return_dict_in_generate=True)
    out.spec_stats.per_drafter  # {"code": {"rows": 3, "alpha": ..., "tau": ...}, "prose": {...}}

How a round works: each drafter with rows proposes for the whole batch with the other rows' budgets set to -1
(they draft nothing), the drafts are merged row by row into one `Draft`, and the target verifies every row in one
forward. Each drafter is then told its own rows' verdicts (the others accepted nothing), so a drafter that holds a
cache of the text (model, sorted, guided) keeps every row in step: the tokens of rows it did not draft are fed as
pending committed text at its next proposal (`Drafter.fall_behind` widens that catch-up), and a drafter with no rows
this round skips it and catches up when it next drafts. The verifier sees an ordinary draft (each row's tokens with
the distribution they were drawn from; a deterministic drafter's rows get one-hot q), so the output is exactly
plain decoding's (greedy) or the target's sampling distribution, whoever drafted.

Who drafts a row: `router` (a `DrafterRouter`) picks at prefill from the target's own prefill hidden states,
pooled over the prompt; without one, `default` (the first drafter). With `policy=OnlinePolicy(...)` each row may
then move to another drafter, or stop drafting, as its measured acceptance says (`hf_specdec.routing.policy`).
Cost: at batch size > 1, a drafter that has any rows runs its forwards over the whole batch (rows it does not draft
only catch up on text), so drafter compute grows with the number of drafters in use; at batch size 1 exactly one
drafter runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..draft import Draft
from ..routing.policy import NO_DRAFT, OnlinePolicy, RowBandits
from .base import DecodingState, Drafter, TreeConfig

ROUTING_FILE = "routing.json"


class RoutedDrafter(Drafter):
    """Route each row to one of several drafters (see the module docstring).

    Args:
        drafters: {name: Drafter}; any hf_specdec drafters sharing the target's tokenizer, chains or trees.
        router: a `hf_specdec.routing.DrafterRouter` (its `drafter_names` must be keys of `drafters`) or None.
        policy: an `OnlinePolicy` to switch rows between drafters (or to no drafting) while they generate.
        default: the drafter of every row when there is no router (default: the first).
    """

    def __init__(self, drafters: dict, router=None, policy: OnlinePolicy | None = None, default: str | None = None):
        _check_drafters(drafters)
        self.names = list(drafters)
        self.drafters = list(drafters.values())
        super().__init__(num_draft_tokens=max(drafter.num_draft_tokens for drafter in self.drafters))
        if policy is not None and not isinstance(policy, OnlinePolicy):
            raise TypeError(f"policy must be a hf_specdec.routing.OnlinePolicy, got {type(policy).__name__}.")
        if default is not None and default not in drafters:
            raise ValueError(f"default={default!r} is not one of the drafters {self.names}.")
        self.router, self.policy = router, policy
        self.default = self.names.index(default) if default is not None else 0
        self.router_arms = _router_arms(router, self.names)
        if router is not None and policy is not None and getattr(router.config, "objective", "tau") != "tau":
            raise ValueError(f"The online policy weighs drafters by τ, but this router predicts "
                             f"{router.config.objective}; train the router with objective='tau' to combine them, or "
                             "drop the policy.")
        self.prompt_feature_layer = None if router is None else int(router.config.feature_layer)
        self.target_hidden_layers = tuple(sorted({layer for drafter in self.drafters
                                                  for layer in drafter.target_hidden_layers}))
        self.last_choice: list[str] | None = None  # each row's drafter at prefill in the last call

    def bind(self, target) -> None:
        for drafter in self.drafters:
            drafter.bind(target)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, directory, num_draft_tokens: int = 5, tree: TreeConfig | None = None,
                        policy: OnlinePolicy | None = None, **model_kwargs) -> RoutedDrafter:
        """A routed drafter from a folder holding `routing.json` (as `recipes/route.py` writes it) and its router:
        `{"drafters": {name: {"kind": "checkpoint", "path": ...} | {"kind": "ngram", ...}}, "router": "router"}`
        (paths relative to the folder). `model_kwargs` (dtype, ...) go to every `from_pretrained`."""
        from .loading import load_drafter

        routing = read_routing(directory)
        drafters = {}
        for name, entry in routing["drafters"].items():
            if entry["kind"] == "ngram":
                drafters[name] = ngram_arm(entry, num_draft_tokens, tree)
            else:
                drafters[name] = load_drafter(entry["path"], num_draft_tokens=num_draft_tokens, tree=tree,
                                              **model_kwargs)
        return cls(drafters, router=routing["router"], policy=policy, default=routing["default"])

    # ------------------------------------------------------------------ lifecycle
    def start(self, target, state: DecodingState, num_draft_tokens: int | None = None) -> None:
        super().start(target, state, num_draft_tokens)
        batch_size = state.sequences.shape[0]
        device = state.lengths.device
        prior = self._prior(target, state, num_draft_tokens)  # [B, K] predicted τ per drafter
        if self.router is not None:  # the router's choice among its own drafters (the others' priors are optimism)
            choice = torch.tensor(self.router_arms)[prior[:, self.router_arms].argmax(-1)]
        else:
            choice = torch.full((batch_size,), self.default)
        self.last_choice = [self.names[int(arm)] for arm in choice]
        self.bandits = None if self.policy is None else RowBandits(self.policy, choice, prior,
                                                                     self._draft_costs(target, num_draft_tokens))
        self._assign(choice, device)
        self._layer_index = [None if not drafter.target_hidden_layers or
                             tuple(drafter.target_hidden_layers) == self.target_hidden_layers else
                             torch.tensor([self.target_hidden_layers.index(layer)
                                           for layer in drafter.target_hidden_layers], device=device)
                             for drafter in self.drafters]
        self.rows_at_prefill = torch.bincount(choice, minlength=len(self.drafters) + 1)
        arms = len(self.drafters) + 1
        self.arm_counts = torch.zeros(3, arms, dtype=torch.long, device=device)  # rounds, drafted, accepted per arm
        self.row_counts = torch.zeros(2, batch_size, arms, dtype=torch.long, device=device)  # tokens, rounds
        self.rounds_done = 0
        for index, drafter in enumerate(self.drafters):
            drafter.start(target, self._arm_state(state, index), num_draft_tokens)

    @property
    def drafts_chains_only(self) -> bool:
        return all(drafter.drafts_chains_only for drafter in self.drafters)

    def max_round_nodes(self, num_draft_tokens: int | None = None) -> int:
        return max(drafter.max_round_nodes(num_draft_tokens) for drafter in self.drafters)

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        for drafter in self.drafters:
            drafter.select_rows(rows)
        self.row_counts = self.row_counts[:, rows.to(self.row_counts.device)]
        if self.bandits is not None:
            self.bandits.select_rows(rows.cpu())
        self._assign(self.assignment[rows.cpu()], self.row_counts.device)

    def finish(self) -> None:
        for drafter in self.drafters:
            drafter.finish()

    @property
    def forward_count(self) -> int:
        return sum(getattr(drafter, "forward_count", 0) for drafter in self.drafters)

    @property
    def exit_counts(self) -> dict:
        merged: dict = {}
        for drafter in self.drafters:
            for exit_layer, count in getattr(drafter, "exit_counts", {}).items():
                merged[exit_layer] = merged.get(exit_layer, 0) + count
        return merged

    def with_tree(self, tree: TreeConfig) -> RoutedDrafter:
        """A copy whose drafters all draft trees of the given shape."""
        drafters = {name: drafter.with_tree(tree) for name, drafter in zip(self.names, self.drafters)}
        return RoutedDrafter(drafters, router=self.router, policy=self.policy, default=self.names[self.default])

    # ------------------------------------------------------------------ a round
    def propose(self, state: DecodingState) -> Draft:
        self._drafts = {}
        for index, drafter in enumerate(self.drafters):
            if self.has_rows[index]:
                arm_state = self._arm_state(state, index)
                self._drafts[index] = drafter.propose(arm_state).truncate_depth(arm_state.budget)
        return merge_drafts(self._drafts, self.assignment_device, state.sequences.shape[0], state.vocab_size,
                            state.do_sample, state.sequences.device)

    def accept(self, state: DecodingState, draft: Draft, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        for index, drafter in enumerate(self.drafters):
            mine = self.assignment_device == index
            if index in self._drafts:
                own = self._drafts[index]
                own_path = torch.where(mine[:, None], path, -1)[:, : own.max_depth]
                drafter.accept(self._arm_state(state, index), own, own_path, torch.where(mine, num_accepted, 0))
            if not bool(self.all_rows[index]):  # rows it did not draft grew by up to a round's tokens
                drafter.fall_behind(draft.num_nodes + 1)
        self._count(state, draft, num_accepted)
        self.rounds_done += 1
        if self.bandits is not None and self.rounds_done % self.policy.check_every == 0:
            self._reconsider()

    # ------------------------------------------------------------------ routing
    def _prior(self, target, state: DecodingState, num_draft_tokens) -> torch.Tensor:
        """[B, K] each drafter's expected τ per row: the router's prediction where it has one, else optimism (the
        most a draft can give, γ + 1), which makes the policy try a drafter it knows nothing about."""
        batch_size = state.sequences.shape[0]
        most = torch.tensor([float(_deepest_draft(drafter, num_draft_tokens) + 1) for drafter in self.drafters])
        prior = most.expand(batch_size, -1).clone()
        if self.router is not None:
            if state.prompt_features is None:
                raise ValueError("RoutedDrafter's router needs the prompt features the engine pools at prefill; "
                                 "run it through `generate(..., assistant_model=routed)`.")
            predicted = self.router.predict(state.prompt_features).float().cpu()
            prior[:, self.router_arms] = predicted
        return prior

    def _draft_costs(self, target, num_draft_tokens) -> torch.Tensor:
        """Each drafter's draft cost per round ÷ one target forward: the policy's given costs, else the share of
        the target's parameters one draft step runs (forwards at small batch are memory-bound) times the draft
        steps of a round (γ for chains, the depth for trees: a tree level is one forward)."""
        given = dict(self.policy.draft_costs or {})
        if unknown := set(given) - set(self.names):
            raise ValueError(f"OnlinePolicy(draft_costs=...) names {sorted(unknown)}, which are not drafters of this "
                             f"RoutedDrafter ({self.names}).")
        target_parameters = sum(parameter.numel() for parameter in target.parameters())
        costs = []
        for name, drafter in zip(self.names, self.drafters):
            if name in given:
                costs.append(float(given[name]))
                continue
            steps = _deepest_draft(drafter, num_draft_tokens)
            costs.append(_step_parameters(drafter) / target_parameters * steps)
        return torch.tensor(costs)

    def _assign(self, assignment: torch.Tensor, device) -> None:
        """Each row's arm (K = no drafting), on the host and the device, and which drafters have rows."""
        self.assignment = assignment.cpu()
        self.assignment_device = self.assignment.to(device)
        counts = torch.bincount(self.assignment, minlength=len(self.drafters) + 1)
        self.has_rows = (counts[: len(self.drafters)] > 0).tolist()
        self.all_rows = (counts[: len(self.drafters)] == len(self.assignment)).tolist()

    def _reconsider(self) -> None:
        """The policy's check: one read of the per-row counters, then maybe new arms for some rows."""
        tokens, rounds = self.row_counts.cpu().clone()  # (on a CPU, .cpu() is the same tensor)
        self.row_counts.zero_()
        old = self.assignment
        new = self.bandits.observe(tokens, rounds)
        if bool((new != old).any()):
            self._assign(new, self.row_counts.device)

    def _arm_state(self, state: DecodingState, index: int) -> DecodingState:
        """The state one drafter sees: rows it does not draft have budget -1, and only its own target layers."""
        mine = self.assignment_device == index
        hidden = state.target_hidden
        if hidden is not None and not self.drafters[index].target_hidden_layers:
            hidden = None
        elif hidden is not None and self._layer_index[index] is not None:
            hidden = hidden.index_select(1, self._layer_index[index].to(hidden.device))
        return dataclasses.replace(state, budget=torch.where(mine, state.budget, -1), target_hidden=hidden)

    # ------------------------------------------------------------------ statistics
    def _count(self, state: DecodingState, draft: Draft, num_accepted: torch.Tensor) -> None:
        alive = (state.budget >= 0).long()
        arm = self.assignment_device
        drafted = draft.valid.sum(-1)
        for row, values in enumerate((alive, drafted * alive, num_accepted * alive)):
            self.arm_counts[row].index_add_(0, arm, values)
        rows = torch.arange(len(arm), device=arm.device)
        self.row_counts[0].index_put_((rows, arm), (num_accepted + 1) * alive, accumulate=True)
        self.row_counts[1].index_put_((rows, arm), alive, accumulate=True)

    def per_drafter_stats(self) -> dict[str, dict]:
        """{name: rows routed at prefill, row-rounds drafted, draft tokens drafted and accepted, α, τ}; "none" holds
        the rounds of rows that stopped drafting; "switches" counts the policy's moves."""
        rounds, drafted, accepted = self.arm_counts.cpu().tolist()
        stats = {}
        for index, name in enumerate([*self.names, NO_DRAFT]):
            if name == NO_DRAFT and not rounds[index]:
                continue
            stats[name] = {
                "rows": int(self.rows_at_prefill[index]), "rounds": rounds[index], "drafted": drafted[index],
                "accepted": accepted[index], "alpha": accepted[index] / drafted[index] if drafted[index] else 0.0,
                "tau": (accepted[index] + rounds[index]) / rounds[index] if rounds[index] else 0.0,
            }
        if self.bandits is not None:
            stats["switches"] = self.bandits.switches
        return stats


def read_routing(directory) -> dict:
    """`routing.json` of a routed-drafter folder: {"drafters": {name: entry with "kind" and, for checkpoints, an
    absolute "path"}, "router": the loaded DrafterRouter or None, "default": a drafter name or None}."""
    from ..routing import DrafterRouter

    root = Path(directory)
    if not (root / ROUTING_FILE).is_file():
        raise ValueError(f"{directory} has no {ROUTING_FILE}; write one with `python recipes/route.py` (it lists "
                         "the drafters and the router).")
    spec = json.loads((root / ROUTING_FILE).read_text())
    drafters = {}
    for name, entry in spec["drafters"].items():
        entry = {"kind": "checkpoint", **entry}
        if entry["kind"] == "checkpoint":
            path = Path(entry["path"])
            entry["path"] = str(path if path.is_absolute() else (root / path).resolve())
        elif entry["kind"] != "ngram":
            raise ValueError(f"{root / ROUTING_FILE}: drafter {name!r} has kind {entry['kind']!r}; expected "
                             "'checkpoint' or 'ngram'.")
        drafters[name] = entry
    router = DrafterRouter.from_pretrained(str(root / spec["router"])) if spec.get("router") else None
    return {"drafters": drafters, "router": router, "default": spec.get("default")}


def ngram_arm(entry: dict, num_draft_tokens: int, tree: TreeConfig | None = None) -> Drafter:
    from .ngram import NGramDrafter

    options = {key: value for key, value in entry.items() if key not in ("kind", "num_draft_tokens", "tree")}
    return NGramDrafter(num_draft_tokens=num_draft_tokens, tree=tree, **options)


def merge_drafts(drafts: dict[int, Draft], assignment: torch.Tensor, batch_size: int, vocab_size: int,
                 do_sample: bool, device) -> Draft:
    """One draft whose row b is `drafts[assignment[b]]`'s row b (rows of arms not in `drafts` draft nothing).

    Shapes are padded to the widest draft; a chain stays a chain only if every draft is one. Under sampling every
    row carries the distribution its tokens were drawn from; a deterministic drafter's tokens get one-hot q, which
    is how the verifier treats `probs=None`.
    """
    if not drafts:
        return Draft.empty(batch_size, device)
    width = max(draft.num_nodes for draft in drafts.values())
    padded = {index: draft.padded(width) for index, draft in drafts.items()}
    if len(padded) == 1:
        (index, only), = padded.items()
        mine = (assignment == index).to(device)
        return dataclasses.replace(only, valid=only.valid & mine[:, None])
    is_chain = all(draft.is_chain for draft in padded.values())
    tokens = torch.zeros(batch_size, width, dtype=torch.long, device=device)
    parents = torch.arange(-1, width - 1, device=device).expand(batch_size, -1).clone() if is_chain else \
        torch.full((batch_size, width), -1, dtype=torch.long, device=device)
    valid = torch.zeros(batch_size, width, dtype=torch.bool, device=device)
    depths = torch.ones(batch_size, width, dtype=torch.long, device=device)
    probs = torch.zeros(batch_size, width, vocab_size, device=device) if do_sample and any(
        draft.probs is not None for draft in padded.values()) else None
    for index, draft in padded.items():
        mine = (assignment == index).to(device)[:, None]
        tokens = torch.where(mine, draft.tokens, tokens)
        parents = torch.where(mine, draft.parents, parents)
        valid = torch.where(mine, draft.valid, valid)
        depths = torch.where(mine, draft.depths(), depths)
        if probs is not None and draft.probs is not None:
            probs.addcmul_(draft.probs.to(probs.dtype), mine[:, :, None].to(probs.dtype))
        elif probs is not None:  # deterministic tokens: q is one-hot (what the verifier assumes for probs=None)
            probs.scatter_add_(2, draft.tokens[:, :, None], mine[:, :, None].expand_as(draft.tokens[:, :, None])
                               .to(probs.dtype))
    children = [draft.max_children for draft in padded.values()]
    return Draft(tokens, parents, valid, probs, max_depth=max(draft.max_depth for draft in padded.values()),
                 is_chain=is_chain, max_children=0 if 0 in children else max(children), _depths=depths)


def _check_drafters(drafters) -> None:
    if not isinstance(drafters, dict) or not drafters:
        raise TypeError("RoutedDrafter needs a non-empty dict {name: drafter}, e.g. "
                        "RoutedDrafter({'code': ModelDrafter(code_model), 'chat': ModelDrafter(chat_model)}).")
    if len({id(drafter) for drafter in drafters.values()}) < len(drafters):
        raise ValueError("RoutedDrafter got the same drafter object under two names; each name needs its own drafter "
                         "(they may share one model: ModelDrafter(model) twice).")
    for name, drafter in drafters.items():
        if not isinstance(name, str) or name == NO_DRAFT:
            raise ValueError(f"Drafter names must be strings other than {NO_DRAFT!r} (the policy's arm for no "
                             f"drafting); got {name!r}.")
        if not isinstance(drafter, Drafter) or isinstance(drafter, RoutedDrafter):
            raise TypeError(f"RoutedDrafter's drafter {name!r} must be an hf_specdec Drafter (not a RoutedDrafter), "
                            f"got {type(drafter).__name__}; wrap models with ModelDrafter(model).")
        if drafter.target_hidden_scope != "last":
            raise ValueError(f"Drafter {name!r} ({type(drafter).__name__}) reads the target's state at every "
                             "committed position, which a routed drafter does not hand over yet; use it on its own.")
        if drafter.auto is not None:
            raise ValueError(f"Drafter {name!r} uses schedule='auto', which times whole rounds for one drafter; give "
                             "RoutedDrafter's drafters a 'constant' or 'heuristic' schedule (its policy can stop "
                             "drafting per row instead).")


def _deepest_draft(drafter: Drafter, num_draft_tokens: int | None) -> int:
    """Draft tokens one round can get accepted, which is also its draft forwards: γ for chains, depth for trees."""
    return drafter.tree.depth if drafter.tree is not None else (num_draft_tokens or drafter.num_draft_tokens)


def _step_parameters(drafter: Drafter) -> int:
    """Parameters one draft step runs: the draft model's, or a sorted drafter's layers up to its deepest exit."""
    model = getattr(drafter, "model", None)
    if model is None:
        return 0
    total = sum(parameter.numel() for parameter in model.parameters())
    exits = getattr(drafter, "exits", None)
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    return total * max(exits) // layers if exits and layers else total


def _router_arms(router, names: list[str]) -> list[int]:
    """The index in `names` of each of the router's outputs."""
    if router is None:
        return []
    router_names = list(router.config.drafter_names)
    missing = [name for name in router_names if name not in names]
    if missing:
        raise ValueError(f"The router predicts for drafters {router_names}, but RoutedDrafter has no {missing}; "
                         f"pass drafters named {router_names} (it has {names}).")
    return [names.index(name) for name in router_names]
