"""Decide which draft tokens the target accepts, per row, for chains and trees alike.

The verify forward runs the target on [root, node_0, ..., node_{N-1}] (chunk indices 0..N; the root is the
row's last committed token). `processed[:, 0]` is the target's processed distribution for the root's children,
`processed[:, 1 + i]` for the children of node i. Walking down from the root:

- greedy: follow the child whose token equals the processed argmax; stop when none does; the bonus is the argmax.
- sampling: try the children in order; child x drawn from q is accepted with probability min(1, p(x) / q(x)); on
  rejection p becomes norm(max(p - q, 0)) and the next sibling is tried (recursive rejection, which is Leviathan's
  rule for a chain). q is each node's own `Draft.probs` row: for siblings drawn without replacement it is the
  parent's distribution without the earlier siblings (see drafters/trees.py for why that is exact). A
  deterministic child has q = one-hot, so it is accepted with probability p(x) and rejection removes x from p.
  When no child is accepted, the bonus is drawn from the current (residual) p; when a leaf is reached, from the
  leaf's p. Either way every emitted token follows the target's processed distribution.

A chain takes a closed form (all positions at once); a tree walks `max_depth` levels over `max_children`
siblings. Neither reads anything back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import shared_arange
from .draft import Draft


@dataclass
class Verdict:
    path: torch.Tensor  # [B, D] accepted node indices (into the draft), root excluded; -1 past num_accepted
    num_accepted: torch.Tensor  # [B]
    next_token: torch.Tensor  # [B] the bonus (or correction) token drawn from the target
    last_position: torch.Tensor  # [B] chunk index (0 = root) whose distribution produced next_token
    rejected: torch.Tensor  # [B] bool: the walk stopped at a node that had draft children (one was refused)


def verify(processed: torch.Tensor, draft: Draft, do_sample: bool) -> Verdict:
    """processed: [B, 1 + N, V] target scores after the generation's logits processors."""
    if draft.is_chain:
        return _verify_chain(processed, draft, do_sample)
    return _verify_tree(processed, draft, do_sample)


def _verify_chain(processed: torch.Tensor, draft: Draft, do_sample: bool) -> Verdict:
    batch_size, num_nodes = draft.tokens.shape
    positions = shared_arange(num_nodes, processed.device)
    drafted = draft.valid.sum(-1)
    if not do_sample:
        choice = processed.argmax(-1)  # [B, 1 + N]
        match = (draft.tokens == choice[:, :num_nodes]) & draft.valid
        accepted = match.long().cumprod(-1).sum(-1)
        next_token = choice.gather(1, accepted[:, None])[:, 0]
    else:
        probs = processed.softmax(-1)
        p_token = probs[:, :num_nodes].gather(2, draft.tokens[:, :, None])[:, :, 0]
        q_token = torch.ones_like(p_token) if draft.probs is None else \
            draft.probs.gather(2, draft.tokens[:, :, None])[:, :, 0]
        keep = (torch.rand_like(p_token) * q_token < p_token) & draft.valid
        accepted = keep.long().cumprod(-1).sum(-1)
        rows = shared_arange(batch_size, processed.device)
        stop = probs[rows, accepted]  # p where the walk stopped
        refused = accepted < drafted
        at = accepted.clamp(max=max(num_nodes - 1, 0))
        if num_nodes:
            q = None if draft.probs is None else draft.probs[rows, at]
            stop = torch.where(refused[:, None], _residual(stop, draft.tokens[rows, at], q), stop)
        next_token = torch.multinomial(stop, 1)[:, 0]
    path = torch.where(positions < accepted[:, None], positions, -1)
    return Verdict(path, accepted, next_token, accepted, accepted < drafted)


def children_table(draft: Draft, width: int) -> torch.Tensor:
    """[B, 1 + N, width] chunk indices (1 + node) of each chunk position's children in draft order, -1 padded."""
    batch_size, num_nodes = draft.tokens.shape
    device = draft.tokens.device
    parent_chunk = torch.where(draft.valid, draft.parents + 1, num_nodes + 1)  # invalid nodes: a dump row
    same_parent = (parent_chunk[:, :, None] == parent_chunk[:, None, :]) & draft.valid[:, None, :]
    earlier = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=device).tril(-1)
    sibling_rank = (same_parent & earlier).sum(-1).clamp(max=width)  # rank >= width: a dump column
    table = torch.full((batch_size, num_nodes + 2, width + 1), -1, dtype=torch.long, device=device)
    nodes = torch.arange(num_nodes, device=device).expand(batch_size, -1)
    table[torch.arange(batch_size, device=device)[:, None], parent_chunk, sibling_rank] = nodes + 1
    return table[:, : num_nodes + 1, :width]


def _verify_tree(processed: torch.Tensor, draft: Draft, do_sample: bool) -> Verdict:
    batch_size, num_nodes = draft.tokens.shape
    device = processed.device
    width = draft.max_children or num_nodes
    children = children_table(draft, width)
    root = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the root token is never looked up
    chunk_tokens = torch.cat([root, draft.tokens], dim=1)
    max_depth = min(draft.max_depth, num_nodes)
    rows = torch.arange(batch_size, device=device)

    current = torch.zeros(batch_size, dtype=torch.long, device=device)  # chunk index of the last accepted position
    alive = torch.ones(batch_size, dtype=torch.bool, device=device)
    path = torch.full((batch_size, max_depth), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch_size, dtype=torch.long, device=device)

    if not do_sample:
        choice = processed.argmax(-1)  # [B, 1 + N]
        for depth in range(max_depth):
            candidates = children[rows, current]  # [B, K]
            wanted = choice[rows, current]
            hit = (candidates >= 0) & (chunk_tokens.gather(1, candidates.clamp(min=0)) == wanted[:, None])
            found = hit.any(-1) & alive
            child = candidates.gather(1, hit.float().argmax(-1, keepdim=True))[:, 0]
            current = torch.where(found, child, current)
            path[:, depth] = torch.where(found, child - 1, -1)
            num_accepted += found.long()
            alive = found
        return Verdict(path, num_accepted, choice[rows, current], current, children[rows, current, 0] >= 0)

    probs = processed.softmax(-1)
    target_p = probs[:, 0]
    for depth in range(max_depth + 1):
        candidates = children[rows, current]
        moved = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for rank in range(width):
            child = candidates[:, rank]
            trying = alive & ~moved & (child >= 0)
            token = chunk_tokens.gather(1, child.clamp(min=0)[:, None])[:, 0]
            p_token = target_p.gather(1, token[:, None])[:, 0]
            if draft.probs is None:
                q = None
                q_token = torch.ones_like(p_token)
            else:
                q = draft.probs[rows, (child - 1).clamp(min=0)]
                q_token = q.gather(1, token[:, None])[:, 0]
            accept = trying & (torch.rand_like(p_token) * q_token < p_token)
            reject = trying & ~accept
            target_p = torch.where(reject[:, None], _residual(target_p, token, q), target_p)
            moved |= accept
            current = torch.where(accept, child, current)
            if depth < max_depth:
                path[:, depth] = torch.where(accept, child - 1, path[:, depth])
        num_accepted += moved.long()
        alive = moved
        # rows that moved continue from the accepted child's full distribution
        target_p = torch.where(moved[:, None], probs[rows, current], target_p)
    next_token = torch.multinomial(target_p, 1)[:, 0]
    return Verdict(path, num_accepted, next_token, current, children[rows, current, 0] >= 0)


def _residual(p: torch.Tensor, token: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """norm(max(p - q, 0)); q = None means one-hot at `token`. Falls back to p if nothing is left (only reachable
    through rounding, since an empty residual means the rejected token had probability one)."""
    if q is None:
        residual = p.scatter(1, token[:, None], 0.0)
    else:
        residual = (p - q).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 1e-12, residual / total.clamp(min=1e-30), p)
