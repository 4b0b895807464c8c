"""How a drafter with distributions grows a token tree, level by level (EAGLE-2's expansion).

Every level, the drafter scores its frontier (at most `top_k` nodes) and each frontier node gets up to `top_k`
children. Two constructions share that loop:

`TopKCandidates` (greedy, and `TreeConfig(sampling="top_k")`): a node's children are the `top_k` most likely
tokens of the draft distribution q; the `max_nodes` candidates with the best cumulative draft log-probability are
verified. The children are deterministic (q one-hot for the verifier), so under sampling a child x is accepted with
the target's probability p(x) only: a flat target refuses almost every child.

`SampledCandidates` (sampling; the default): a node's children are drawn *without replacement* (Gumbel top-k,
which yields a without-replacement sample in draw order), the first from q and the later ones from q sharpened to
`TreeConfig.sibling_temperature`, and the verifier runs recursive rejection over them in draw order (Recursive
Speculative Decoding, Jeon et al. 2024, with a proposal per sibling): sibling j was drawn from q_j = q (j = 1) or
r = norm(q^(1/t)) (j > 1) without siblings 1..j-1, renormalised, and is accepted with min(1, p_j(x) / q_j(x)),
where p_j is the target's residual after the earlier siblings were refused (p_1 = p,
p_{j+1} = norm(max(p_j - q_j, 0))); when every sibling is refused the token comes from the last residual.

Why sharpen: sibling j > 1 is only tried after the first was refused, and is then accepted with
sum min(p_2, q_2), where p_2 = norm(max(p - q, 0)) is where the target wants more than the draft gave. For a
drafter less confident than its target (a small distilled drafter at T < 1) that is mostly the draft's own likely
tokens, so drawing siblings from a sharper q raises their acceptance (docs/lab.md measures it per drafter).

Why it is exact (sketch). One step is Leviathan's lemma: x ~ q_j accepted with min(1, p_j/q_j), else a token
from norm(max(p_j - q_j, 0)), gives a token distributed as p_j, for *any* proposal q_j: so every sibling may have
its own, as long as it is verified against the one it was drawn from. Induct over the siblings from the last one: what
follows a refusal outputs a token distributed as p_{j+1} whatever x_1..x_j were (x_{j+1} ~ q_{j+1} is a fresh
draw given them), so each step outputs p_j and the node outputs p_1 = p; an accepted child continues with the
target's distribution after it, so the whole path follows the target. The lemma needs a node's sibling list to be
a prefix of its draw order whose length does not depend on the values of those siblings. Here every node has a
`reach` computed from draw ranks and measured acceptance only (never from a drawn token), non-increasing along
a path and along a node's draw order; the frontier each level is the most-reached nodes (so *which* nodes get
expanded does not depend on any drawn token), and the `max_nodes` kept are the most-reached among the
candidates (ties by id: parents and earlier siblings first). Whether sibling j is kept then depends only on nodes
that outrank it, whose candidacy depends on their own ancestors' distributions: never on sibling j, its
descendants or its later siblings (all rank below it). A node is a candidate when its parent's q wants it
(below) and it was drawn with non-zero probability: both functions of its parent, not of itself. The distribution
each sibling is verified against is built in log space, so a tail that underflows in probability space is still
renormalised correctly.

Shape from the drafter's confidence and its measured acceptance. A node wants as many children as q's most
likely tokens need to cover `coverage` of its mass (a confident drafter drafts a chain, an uncertain one
branches). `SiblingAcceptance` counts, per draw rank, how often a tried sibling is accepted (a rank-0 child is
accepted like a chain's token; later ranks only see the target's residual); a node's reach is the product along
its path of those rates (times the refusals of its earlier siblings), so the budget goes where the walk is most
likely to go: deep along the chain for a drafter the target agrees with, wide near the root for one it does not.
The first-drawn child of the first-drawn path (the spine) is always kept: the spine is distributed exactly like a
sampled chain of `depth` tokens and its first child at every node is accepted exactly as the chain's token would
be, so the tree accepts at least what the chain it contains would (given `max_nodes >= depth`; for model and
guided drafters — a sorted drafter picks its exit per level over the whole frontier, so its spine may be drafted
by another exit than its chain would be, and its nodes are ranked level by level, see `level_major`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..draft import Draft


class TopKCandidates:
    """Every node drafted during one tree expansion, with its cumulative draft log-probability."""

    def __init__(self, batch_size: int, capacity: int, max_depth: int, device):
        self.tokens = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.parents = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.scores = torch.full((batch_size, capacity), float("-inf"), device=device)
        self.depth = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.paths = torch.zeros(batch_size, capacity, max_depth, dtype=torch.long, device=device)
        self.ancestors = torch.eye(capacity, dtype=torch.bool, device=device).repeat(batch_size, 1, 1)
        self.count = 0

    def add_children(self, log_q: torch.Tensor, parents: torch.Tensor | None, top_k: int) -> torch.Tensor:
        """log_q: [B, F, V] draft log-probs at F parents → top_k children each; returns their ids [B, F * top_k]."""
        batch_size, num_parents, _ = log_q.shape
        child_tokens = self._choose_children(log_q, top_k)  # [B, F, k]
        child_log_q = log_q.gather(2, child_tokens)
        if parents is None:
            parent_ids = torch.full((batch_size, num_parents), -1, dtype=torch.long, device=log_q.device)
            parent_scores = torch.zeros(batch_size, num_parents, device=log_q.device)
        else:
            parent_ids, parent_scores = parents, self.scores.gather(1, parents)
        ids = torch.arange(self.count, self.count + num_parents * top_k, device=log_q.device).expand(batch_size, -1)
        self.count += num_parents * top_k
        parent_of = parent_ids[:, :, None].expand(-1, -1, top_k).reshape(batch_size, -1)
        self.tokens[:, ids[0]] = child_tokens.reshape(batch_size, -1)
        self.parents[:, ids[0]] = parent_of
        self.scores[:, ids[0]] = (parent_scores[:, :, None] + child_log_q).reshape(batch_size, -1)
        parent_depth = torch.where(parent_of >= 0, self.depth.gather(1, parent_of.clamp(min=0)), 0)
        depth = parent_depth + 1
        self.depth[:, ids[0]] = depth
        parent_paths = self.paths.gather(1, parent_of.clamp(min=0)[:, :, None].expand(-1, -1, self.paths.shape[-1]))
        parent_paths = torch.where((parent_of >= 0)[:, :, None], parent_paths, 0)
        parent_paths.scatter_(2, (depth - 1)[:, :, None], self.tokens[:, ids[0]][:, :, None])
        self.paths[:, ids[0]] = parent_paths
        parent_rows = self.ancestors.gather(1, parent_of.clamp(min=0)[:, :, None].expand(-1, -1, self.ancestors.shape[-1]))
        parent_rows = parent_rows & (parent_of >= 0)[:, :, None]
        self.ancestors[:, ids[0]] = parent_rows | self.ancestors[:, ids[0]]
        self._children_added(ids[0], log_q, parent_ids, parent_scores, child_log_q)
        return ids

    def _choose_children(self, log_q: torch.Tensor, top_k: int) -> torch.Tensor:
        return log_q.topk(top_k, dim=-1).indices

    def _children_added(self, ids, log_q, parent_ids, parent_scores, child_log_q) -> None:
        """Hook for constructions that keep more per child."""

    def best(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """The next frontier: the `count` children (of `ids`) with the best cumulative draft log-probability."""
        scores = self.scores.gather(1, ids)
        return ids.gather(1, scores.topk(min(count, ids.shape[1]), dim=-1).indices)

    def select(self, max_nodes: int, top_k: int) -> tuple[Draft, torch.Tensor]:
        """The best `max_nodes` candidates as a topologically ordered Draft. A child never scores above its
        parent, and ties go to the shallower node, so the selection is a connected subtree."""
        scores = self.scores[:, : self.count]
        depth = self.depth[:, : self.count]
        # rank by score, then by depth (parents first among equals)
        rank_key = scores - depth.float() * 1e-6
        chosen = rank_key.topk(min(max_nodes, self.count), dim=-1).indices
        chosen_depth = depth.gather(1, chosen)
        order = (chosen_depth.float() * 1e4 - rank_key.gather(1, chosen).clamp(min=-1e3)).argsort(dim=-1)
        chosen = chosen.gather(1, order)
        # a node is usable when it and every ancestor were drawn with non-zero probability and selected
        usable = torch.isfinite(scores) & self._positions(chosen).ge(0)
        return self._draft(chosen, usable, top_k), chosen

    def _positions(self, chosen: torch.Tensor) -> torch.Tensor:
        """[B, count] position of every candidate in `chosen`, -1 when not chosen."""
        position_of = torch.full((chosen.shape[0], self.count), -1, dtype=torch.long, device=chosen.device)
        return position_of.scatter_(1, chosen, torch.arange(chosen.shape[1], device=chosen.device).expand_as(chosen))

    def _draft(self, chosen: torch.Tensor, usable: torch.Tensor, top_k: int, probs=None) -> Draft:
        """The chosen candidates (topologically ordered) as a Draft; a node is valid when it and every ancestor
        are usable."""
        position_of = self._positions(chosen)
        parent_ids = self.parents.gather(1, chosen)
        parents = torch.where(parent_ids >= 0, position_of.gather(1, parent_ids.clamp(min=0)), -1)
        ancestors = self.ancestors[:, : self.count, : self.count]
        node_ok = ~(ancestors & ~usable[:, None, :]).any(-1)
        return Draft(tokens=self.tokens.gather(1, chosen), parents=parents, valid=node_ok.gather(1, chosen),
                     probs=probs, max_depth=self.paths.shape[-1], max_children=top_k)


def _gumbel_like(log_q: torch.Tensor) -> torch.Tensor:
    return -torch.empty_like(log_q).exponential_().log()


LEVEL_GAP = 1e4  # larger than any |log reach| (at most depth * top_k * log(100)): depth dominates the key


class SiblingAcceptance:
    """How often a sampled tree's sibling of each draw rank is accepted once the walk tries it (all earlier
    siblings refused), counted on the device from the verifier's paths with a prior of a few pseudo-rounds.
    Lives on the drafter, so later calls start from what earlier ones measured."""

    PRIOR = (0.6, 0.2)  # rank 0 (the chain's token), later ranks
    PRIOR_ROUNDS = 4.0

    def __init__(self, top_k: int, device):
        prior = torch.full((top_k,), self.PRIOR[1], device=device)
        prior[0] = self.PRIOR[0]
        self.tried = torch.full((top_k,), self.PRIOR_ROUNDS, device=device)
        self.accepted = prior * self.PRIOR_ROUNDS

    def to(self, device) -> SiblingAcceptance:
        self.tried, self.accepted = self.tried.to(device), self.accepted.to(device)
        return self

    def log_reach_by_rank(self) -> torch.Tensor:
        """[top_k] log P(the walk reaches and accepts a node's sibling of rank j | it reached the node),
        sum_{i<j} log(1 - a_i) + log a_j, made non-increasing in j (a running minimum) so that a later sibling
        never outranks an earlier one: the siblings a node keeps must be a prefix of its draw order."""
        rate = (self.accepted / self.tried).clamp(0.01, 0.99)
        value = F.pad(torch.log1p(-rate)[:-1], (1, 0)).cumsum(0) + rate.log()
        return value.cummin(0).values

    def record(self, draft: Draft, ranks: torch.Tensor, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """One round: ranks [B, N] of the draft's nodes, path [B, D] accepted node indices (-1 past the end)."""
        top_k = len(self.tried)
        path, num_accepted = path.to(ranks.device), num_accepted.to(ranks.device)
        columns = torch.arange(top_k, device=ranks.device)
        on_path = path >= 0
        path_rank = ranks.gather(1, path.clamp(min=0))  # the accepted child's rank at every depth
        self.tried += ((columns <= path_rank[..., None]) & on_path[..., None]).sum((0, 1))
        self.accepted += ((columns == path_rank[..., None]) & on_path[..., None]).sum((0, 1))
        # where the walk stopped, every child of that node was tried and refused
        last = path.gather(1, (num_accepted - 1).clamp(min=0)[:, None])[:, 0]
        stop = torch.where(num_accepted > 0, last, -1)
        children = ((draft.parents == stop[:, None]) & draft.valid).sum(-1)
        self.tried += (columns < children[:, None]).sum(0)


class SampledCandidates(TopKCandidates):
    """Children drawn from q without replacement, as many as q's mass asks for, the budget spent on the nodes the
    walk is most likely to reach (see the module docstring for why the recursive-rejection verifier then emits
    exactly the target's distribution)."""

    def __init__(self, batch_size: int, capacity: int, max_depth: int, device, coverage: float,
                 log_reach_by_rank: torch.Tensor, level_major: bool = False, sibling_temperature: float = 1.0):
        super().__init__(batch_size, capacity, max_depth, device)
        self.coverage = coverage
        self.sibling_temperature = sibling_temperature
        # a drafter whose q at a node reads the whole frontier above it (a sorted drafter's exit gate), not only the
        # node's path, must rank nodes level by level: then every node ranked above sibling j has its candidacy
        # decided by shallower levels only, never by sibling j's token
        self.level_major = level_major
        self.log_reach_by_rank = log_reach_by_rank.to(device)
        self.reach = torch.full((batch_size, capacity), float("-inf"), device=device)  # log, from ranks only
        self.spine = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.candidate = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.rank = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)  # sibling rank, draw order
        self.q_slot = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)  # its parent's log q
        self.parent_log_q: list[torch.Tensor] = []  # per level: [B, F, V] what the children were drawn from

    def _choose_children(self, log_q: torch.Tensor, top_k: int) -> torch.Tensor:
        """The first child drawn from q (the chain's token), then top_k - 1 siblings from q sharpened to
        `sibling_temperature` without it: Gumbel top-k, a without-replacement sample in draw order. Once q's
        support is used up the draws repeat the first child or have q = 0; `_children_added` drops those."""
        first = (log_q + _gumbel_like(log_q)).argmax(-1, keepdim=True)
        if top_k == 1:
            return first
        sharpened = self._sibling_log_weights(log_q).scatter(-1, first, float("-inf"))
        later = (sharpened + _gumbel_like(log_q)).topk(top_k - 1, dim=-1).indices
        return torch.cat([first, later], dim=-1)

    def _sibling_log_weights(self, log_q: torch.Tensor) -> torch.Tensor:
        """Unnormalised log weights siblings after the first are drawn from: q^(1 / sibling_temperature)."""
        return log_q if self.sibling_temperature == 1.0 else log_q / self.sibling_temperature

    def _children_added(self, ids, log_q, parent_ids, parent_scores, child_log_q) -> None:
        batch_size, num_parents, top_k = child_log_q.shape
        child_tokens = self.tokens[:, ids].view(batch_size, num_parents, top_k)
        slots = sum(level.shape[1] for level in self.parent_log_q) + torch.arange(num_parents, device=log_q.device)
        self.parent_log_q.append(log_q)
        self.q_slot[:, ids] = slots.repeat_interleave(top_k)
        ranks = torch.arange(top_k, device=log_q.device)
        self.rank[:, ids] = ranks.repeat(num_parents)

        def of_parent(buffer, root_value):
            return torch.where(parent_ids >= 0, buffer.gather(1, parent_ids.clamp(min=0)), root_value)

        # reach: from draw ranks and measured acceptance only, never from drawn tokens (see the module docstring)
        reach = of_parent(self.reach, 0.0)[..., None] + self.log_reach_by_rank[:top_k]
        self.reach[:, ids] = reach.reshape(batch_size, -1)
        self.spine[:, ids] = (of_parent(self.spine, True)[..., None] & (ranks == 0)).reshape(batch_size, -1)
        # children a node wants: the fewest of q's most likely tokens that cover `coverage` of its mass
        top_mass = log_q.exp().topk(top_k, dim=-1).values.cumsum(-1)
        wanted_count = 1 + (top_mass[..., :-1] < self.coverage).sum(-1)
        drawn = torch.isfinite(child_log_q) & ((ranks == 0) | (child_tokens != child_tokens[..., :1]))
        candidate = (ranks < wanted_count[..., None]) & drawn & of_parent(self.candidate, True)[..., None]
        self.candidate[:, ids] = candidate.reshape(batch_size, -1)

    def _key(self, ids: torch.Tensor) -> torch.Tensor:
        """Budget order: the spine first (it is the chain the tree contains), then by reach (level by level when
        `level_major`); ties by id."""
        reach = self.reach.gather(1, ids)
        if self.level_major:
            reach = reach - LEVEL_GAP * self.depth.gather(1, ids).to(reach.dtype)
        return torch.where(self.spine.gather(1, ids), float("inf"), reach)

    def best(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """The next frontier: the `count` children most likely to be reached (the same nodes whatever was drawn)."""
        order = self._key(ids).argsort(dim=-1, descending=True, stable=True)[:, :count]
        return ids.gather(1, order)

    def select(self, max_nodes: int, top_k: int) -> tuple[Draft, torch.Tensor]:
        """The `max_nodes` candidates most likely to be reached, in id order (levels in order, siblings in draw
        order), each with the distribution it was drawn from: its parent's q without the earlier siblings. A child
        never outranks its parent (lower reach, larger id), so the selection is a connected subtree."""
        ids = torch.arange(self.count, device=self.reach.device).expand(self.reach.shape[0], -1)
        key = torch.where(self.candidate[:, : self.count], self._key(ids), float("-inf"))
        width = min(max_nodes, self.count)
        selected = key.argsort(dim=-1, descending=True, stable=True)[:, :width]
        chosen = selected.sort(dim=-1).values
        usable = torch.zeros_like(self.candidate[:, : self.count]).scatter_(1, chosen, True) & self.candidate[:, : self.count]
        return self._draft(chosen, usable, top_k, probs=self._sibling_distributions(chosen, top_k)), chosen

    def ranks_of(self, chosen: torch.Tensor) -> torch.Tensor:
        return self.rank.gather(1, chosen)

    def _sibling_distributions(self, chosen: torch.Tensor, top_k: int) -> torch.Tensor:
        """[B, N, V] what each chosen node was drawn from: its parent's q for a first child; for a later sibling
        q sharpened to `sibling_temperature` with the earlier siblings' tokens removed, renormalised (in log space:
        the earlier siblings may hold all of q's representable mass)."""
        parent_log_q = torch.cat(self.parent_log_q, dim=1)
        slot = self.q_slot.gather(1, chosen)
        log_q = parent_log_q.gather(1, slot[..., None].expand(-1, -1, parent_log_q.shape[-1]))
        rank = self.rank.gather(1, chosen)
        log_q = torch.where((rank > 0)[..., None], self._sibling_log_weights(log_q), log_q)
        offsets = torch.arange(max(top_k - 1, 0), device=log_q.device)
        # a node's siblings have consecutive ids (add_children lays children out parent by parent), so the ones
        # drawn before it are the `rank` ids just below it
        earlier = (chosen - rank)[..., None] + offsets
        earlier_tokens = self.tokens.gather(1, earlier.flatten(1)).view_as(earlier)
        drawn_before = (offsets < rank[..., None]).to(log_q.dtype)
        removed = torch.zeros_like(log_q).scatter_add_(2, earlier_tokens, drawn_before) > 0
        # a padding node may have every token removed: all -inf, softmax NaN; it is never verified, keep it 0
        return log_q.masked_fill_(removed, float("-inf")).softmax(-1).nan_to_num_(0.0)
