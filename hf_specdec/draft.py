"""What a drafter proposes: a token tree per row (a chain is a tree with one child per node)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """A batch of draft trees hanging off each row's last committed token (the root).

    tokens:  [B, N] proposed token ids, in topological order (a parent always comes before its children).
    parents: [B, N] index of each node's parent in this draft, -1 when the parent is the root.
    valid:   [B, N] False for padding nodes (rows may propose fewer nodes than N; an invalid node has no valid child).
    probs:   [B, N, V] the exact distribution each token was drawn from, or None when every token was chosen
             deterministically (argmax, top-k children, n-gram lookup): the verifier then treats q as one-hot.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    valid: torch.Tensor
    probs: torch.Tensor | None = None
    _depths: torch.Tensor | None = None  # computed once, on first use

    @classmethod
    def chain(cls, tokens: torch.Tensor, lengths: torch.Tensor | None = None, probs: torch.Tensor | None = None):
        batch_size, num_nodes = tokens.shape
        parents = torch.arange(-1, num_nodes - 1, device=tokens.device).expand(batch_size, -1)
        positions = torch.arange(num_nodes, device=tokens.device)
        valid = positions < (lengths[:, None] if lengths is not None else num_nodes)
        return cls(tokens=tokens, parents=parents.contiguous(), valid=valid, probs=probs)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device) -> Draft:
        none = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls(tokens=none, parents=none.clone(), valid=none.bool())

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def depths(self) -> torch.Tensor:
        """[B, N] depth of each node (children of the root have depth 1)."""
        if self._depths is None:
            self._depths = node_depths(self.parents)
        return self._depths

    def truncate_depth(self, max_depth: torch.Tensor) -> Draft:
        """Drop nodes deeper than `max_depth[b]` (a row's remaining token budget)."""
        valid = self.valid & (self.depths() <= max_depth[:, None])
        return Draft(self.tokens, self.parents, valid, self.probs, self._depths)


def node_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (children of the root have depth 1): one step up the tree per level, all nodes at once."""
    depth = torch.ones_like(parents)
    current = parents
    while bool((current >= 0).any()):
        has_parent = current >= 0
        depth = depth + has_parent.long()
        current = torch.where(has_parent, parents.gather(1, current.clamp(min=0)), current)
    return depth


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """[B, N, N] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    batch_size, num_nodes = parents.shape
    eye = torch.eye(num_nodes, dtype=torch.bool, device=parents.device).expand(batch_size, -1, -1)
    if num_nodes == 0:
        return eye.clone()
    ancestors = eye.clone()
    current = parents.clone()
    rows = torch.arange(num_nodes, device=parents.device).expand(batch_size, -1)
    batch = torch.arange(batch_size, device=parents.device)[:, None].expand(-1, num_nodes)
    while bool((current >= 0).any()):
        has_parent = current >= 0
        ancestors[batch[has_parent], rows[has_parent], current[has_parent]] = True
        current = torch.where(has_parent, parents.gather(1, current.clamp(min=0)), current)
    return ancestors


def path_tokens(tokens: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """[B, N, D] the tokens on the root-to-node path of every node (the node last), padded with 0 past its depth.

    Ancestors of a node sit at increasing depths, so ordering a node's ancestors by depth gives its path.
    """
    num_nodes = tokens.shape[1]
    max_depth = int(depths.max()) if num_nodes else 0
    big = torch.iinfo(torch.long).max
    sort_key = torch.where(ancestors, depths[:, None, :].expand(-1, num_nodes, -1), big)
    order = sort_key.argsort(dim=-1)[..., :max_depth]
    gathered = tokens[:, None, :].expand(-1, num_nodes, -1).gather(2, order)
    keep = torch.arange(max_depth, device=tokens.device) < depths[..., None]
    return torch.where(keep, gathered, 0)
