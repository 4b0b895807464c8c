"""What a drafter proposes: a token tree per row (a chain is a tree with one child per node).

Index spaces, where they meet:
- node index i (0..N-1): position in `Draft.tokens`, topologically ordered (a parent before its children);
- chunk index (0..N): position in the target's verify forward `[root, node_0, ..., node_{N-1}]`, i.e. node i is
  chunk index i + 1 and chunk index 0 is the row's last committed token (the root);
- depth (1..max_depth): distance of a node from the root; for a chain node i has depth i + 1.
Everything here keeps shapes fixed and loops a known number of times (`max_depth`, on the host), so building a
round never waits for the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """A batch of draft trees hanging off each row's last committed token (the root).

    tokens:    [B, N] proposed token ids, in topological order.
    parents:   [B, N] node index of each node's parent, -1 when the parent is the root.
    valid:     [B, N] False for padding nodes (an invalid node has no valid child).
    probs:     [B, N, V] the exact distribution each token was drawn from, or None when every token was chosen
               deterministically (argmax, top-k children, n-gram lookup): the verifier then treats q as one-hot.
    max_depth: an upper bound on every node's depth, known on the host (N for a chain).
    is_chain:  node i's parent is node i - 1 in every row (lets cache and verifier skip the general tree path).
    max_children: an upper bound on any node's number of children, known on the host (0: unknown, N).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    valid: torch.Tensor
    probs: torch.Tensor | None = None
    max_depth: int = 0
    is_chain: bool = False
    max_children: int = 0
    _depths: torch.Tensor | None = None  # computed once, on first use

    @classmethod
    def chain(cls, tokens: torch.Tensor, lengths: torch.Tensor | None = None, probs: torch.Tensor | None = None):
        batch_size, num_nodes = tokens.shape
        positions, parents, depths = _chain_shape(batch_size, num_nodes, tokens.device)
        if lengths is None:
            valid = torch.ones(batch_size, num_nodes, dtype=torch.bool, device=tokens.device)
        else:
            valid = positions < lengths[:, None]
        return cls(tokens=tokens, parents=parents, valid=valid, probs=probs, max_depth=num_nodes, is_chain=True,
                   max_children=1, _depths=depths)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device) -> Draft:
        return cls.chain(torch.zeros(batch_size, 0, dtype=torch.long, device=device))

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def depths(self) -> torch.Tensor:
        """[B, N] depth of each node (children of the root have depth 1)."""
        if self._depths is None:
            self._depths = node_depths(self.parents, self.max_depth)
        return self._depths

    def truncate_depth(self, max_depth: torch.Tensor) -> Draft:
        """Drop nodes deeper than `max_depth[b]` (a row's remaining token budget)."""
        valid = self.valid & (self.depths() <= max_depth[:, None])
        return Draft(self.tokens, self.parents, valid, self.probs, self.max_depth, self.is_chain, self.max_children,
                     self._depths)

    def padded(self, num_nodes: int) -> Draft:
        """The same trees with invalid padding nodes up to `num_nodes` (fixed shapes for captured forwards)."""
        extra = num_nodes - self.num_nodes
        if extra <= 0:
            return self
        pad = self.tokens.new_zeros(self.tokens.shape[0], extra)
        parents = torch.cat([self.parents, pad - 1], 1) if not self.is_chain else \
            torch.arange(-1, num_nodes - 1, device=pad.device).expand(len(pad), -1).contiguous()
        probs = None if self.probs is None else torch.cat(
            [self.probs, self.probs.new_zeros(len(pad), extra, self.probs.shape[-1])], 1)
        depths = torch.cat([self.depths(), pad + 1], 1) if not self.is_chain else None
        return Draft(torch.cat([self.tokens, pad], 1), parents, torch.cat([self.valid, pad.bool()], 1), probs,
                     num_nodes if self.is_chain else self.max_depth, self.is_chain, self.max_children, depths)


@functools.lru_cache(maxsize=32)
def _chain_shape(batch_size: int, num_nodes: int, device: torch.device):
    """(node positions, parents, depths) of a [batch_size, num_nodes] chain: the same every round, so made once
    (shared, never written to)."""
    positions = torch.arange(num_nodes, device=device)
    return positions, (positions - 1).expand(batch_size, -1), (positions + 1).expand(batch_size, -1)


def node_depths(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Depth of every node (children of the root have depth 1), following parents up `max_depth` times."""
    depth = torch.ones_like(parents)
    current = parents
    for _ in range(max_depth):
        has_parent = current >= 0
        depth = depth + has_parent.long()
        current = torch.where(has_parent, parents.gather(1, current.clamp(min=0)), current)
    return depth


def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, N, N] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    batch_size, num_nodes = parents.shape
    ancestors = torch.eye(num_nodes, dtype=torch.bool, device=parents.device).expand(batch_size, -1, -1).clone()
    current = parents
    for _ in range(max_depth if num_nodes else 0):
        has_parent = current >= 0
        ancestors |= torch.nn.functional.one_hot(current.clamp(min=0), num_nodes).bool() & has_parent[..., None]
        current = torch.where(has_parent, parents.gather(1, current.clamp(min=0)), current)
    return ancestors


def path_tokens(tokens: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, N, max_depth] the tokens on the root-to-node path of every node (the node last), 0 past its depth.

    Ancestors of a node sit at increasing depths, so ordering a node's ancestors by depth gives its path.
    """
    num_nodes = tokens.shape[1]
    width = min(max_depth, num_nodes)
    big = torch.iinfo(torch.long).max
    sort_key = torch.where(ancestors, depths[:, None, :].expand(-1, num_nodes, -1), big)
    order = sort_key.argsort(dim=-1)[..., :width]
    gathered = tokens[:, None, :].expand(-1, num_nodes, -1).gather(2, order)
    keep = torch.arange(width, device=tokens.device) < depths[..., None]
    return torch.where(keep, gathered, 0)
