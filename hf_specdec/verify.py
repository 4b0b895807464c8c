"""Decide which draft tokens the target accepts, per row, for chains and trees alike.

The verify forward runs the target on [root, node_1, ..., node_N] (the root is the row's last committed token).
`processed[:, 0]` is the target's processed distribution for the root's children, `processed[:, 1 + i]` for the
children of node i. Walking down from the root:

- greedy: follow the child whose token equals the processed argmax; stop when none does; the bonus is the argmax.
- sampling: try the children in order; child x drawn from q is accepted with probability min(1, p(x) / q(x)); on
  rejection p becomes norm(max(p - q, 0)) and the next sibling is tried (SpecInfer's recursive rejection, which is
  Leviathan's rule for a chain). A deterministic child has q = one-hot, so it is accepted with probability p(x) and
  rejection removes x from p. When no child is accepted, the bonus is drawn from the current (residual) p; when a
  leaf is reached, from the leaf's p. Either way every emitted token follows the target's processed distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft import Draft


@dataclass
class Verdict:
    path: torch.Tensor  # [B, D] accepted node indices (into the draft), root excluded; -1 past num_accepted
    num_accepted: torch.Tensor  # [B]
    next_token: torch.Tensor  # [B] the bonus (or correction) token drawn from the target
    last_position: torch.Tensor  # [B] verify-chunk index (0 = root) whose distribution produced next_token
    rejected: torch.Tensor  # [B] bool: the walk stopped at a node that had draft children (one was refused)


def children_table(draft: Draft) -> torch.Tensor:
    """[B, 1 + N, K] chunk indices (1 + node) of each chunk position's children in draft order, -1 padded."""
    batch_size, num_nodes = draft.tokens.shape
    device = draft.tokens.device
    parent_chunk = torch.where(draft.valid, draft.parents + 1, -1)  # chunk index of each node's parent
    same_parent = (parent_chunk[:, :, None] == parent_chunk[:, None, :]) & draft.valid[:, None, :]
    earlier = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=device).tril(-1)
    sibling_rank = (same_parent & earlier).sum(-1)  # how many valid earlier siblings each node has
    width = int(sibling_rank[draft.valid].max()) + 1 if bool(draft.valid.any()) else 1
    table = torch.full((batch_size, 1 + num_nodes, width), -1, dtype=torch.long, device=device)
    rows, nodes = draft.valid.nonzero(as_tuple=True)
    table[rows, parent_chunk[rows, nodes], sibling_rank[rows, nodes]] = nodes + 1
    return table


def verify(processed: torch.Tensor, draft: Draft, do_sample: bool) -> Verdict:
    """processed: [B, 1 + N, V] target scores after the generation's logits processors."""
    batch_size = processed.shape[0]
    device = processed.device
    children = children_table(draft)
    root = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the root token is never looked up
    chunk_tokens = torch.cat([root, draft.tokens], dim=1)
    max_depth = int(draft.depths()[draft.valid].max()) if bool(draft.valid.any()) else 0
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
    draft_probs = draft.probs
    for depth in range(max_depth + 1):
        candidates = children[rows, current]
        moved = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for rank in range(candidates.shape[1]):
            child = candidates[:, rank]
            trying = alive & ~moved & (child >= 0)
            if not bool(trying.any()):
                break
            token = chunk_tokens.gather(1, child.clamp(min=0)[:, None])[:, 0]
            p_token = target_p.gather(1, token[:, None])[:, 0]
            if draft_probs is None:
                q = None
                q_token = torch.ones_like(p_token)
            else:
                q = draft_probs[rows, (child - 1).clamp(min=0)]
                q_token = q.gather(1, token[:, None])[:, 0]
            accept = trying & (torch.rand_like(p_token) * q_token < p_token)
            reject = trying & ~accept
            residual = _residual(target_p, token, q)
            target_p = torch.where(reject[:, None], residual, target_p)
            moved |= accept
            current = torch.where(accept, child, current)
            if depth < path.shape[1]:
                path[:, depth] = torch.where(accept, child - 1, path[:, depth])
        num_accepted += moved.long()
        alive = moved
        # rows that moved continue from the accepted child's full distribution
        target_p = torch.where(moved[:, None], probs[rows, current], target_p)
        if not bool(alive.any()):
            break
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
