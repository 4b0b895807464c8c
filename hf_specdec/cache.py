"""The only module that edits KV tensors.

A `SlotCache` wraps one model's `DynamicCache` and records, for every cache slot of every row, whether a real token
lives there. Rows of a batch advance by different amounts each round, so instead of re-padding we leave holes:
a slot that holds left padding, a rejected draft token, or the right end of a row that accepted fewer tokens than
its neighbours is simply masked out. Every forward therefore gets an explicit additive 4D mask and explicit
position ids (a row's logical position counts only its real tokens), which is exact for any attention layout.

Tokens come in two kinds:
- committed: part of the row's text; visible to every later query.
- tentative: draft-tree nodes of the current round, identified by a caller-chosen node id; a query sees a
  tentative slot only if that slot's node is the query's own node or one of its ancestors. `keep()` then turns
  the accepted path into committed slots (gathered to the front of the round's region) and drops the rest.

Holes cost memory, so `compact()` squeezes them out when they dominate; memory stays proportional to accepted
tokens, not to rounds.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .compat import cache_argument


class SlotCache:
    """Slot bookkeeping for one model's KV cache, or for one segment of its layers.

    By default the whole `model` runs on token ids. For a model evaluated segment by segment (sorted drafters:
    several exits, deeper layers filled later), pass `run(inputs, attention_mask, position_ids, cache)` running
    that segment, `layers` (the indices of the cache layers the segment owns) and a `cache` shared between the
    segments; each segment then has its own slots, since its layers may hold fewer tokens than the first ones.
    """

    def __init__(self, model, batch_size: int, device: torch.device, run=None, layers=None, cache=None):
        self.model = model
        self.run = run if run is not None else self._run_model
        self.layers = None if layers is None else list(layers)
        self.cache = cache if cache is not None else DynamicCache()
        self.device = device
        self.dtype = model.dtype
        self.sliding_window = _sliding_window(model.config)
        self.committed = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [B, S]
        self.slot_positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [B, S]
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.tentative_start = 0  # first slot of the current round's tentative region
        self.slot_nodes = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [B, S - tentative_start]

    @property
    def length(self) -> int:
        return self.committed.shape[1]

    # ------------------------------------------------------------------ forwards
    def forward_committed(self, input_ids: torch.Tensor, valid: torch.Tensor, **model_kwargs):
        """Append tokens that are part of the text (prompt, pending accepted tokens). Causal among themselves;
        `valid=False` entries are holes (left padding) that nobody attends to."""
        assert self.slot_nodes.shape[1] == 0, "resolve the tentative region with keep() first"
        valid = valid.to(self.device)
        offsets = valid.long().cumsum(-1) - 1
        positions = self.next_position[:, None] + offsets.clamp(min=0)
        query_count = input_ids.shape[1]
        causal = torch.ones(query_count, query_count, dtype=torch.bool, device=self.device).tril()
        new_visible = causal[None] & valid[:, None, :]
        outputs = self._forward(input_ids, positions, self.committed, new_visible, **model_kwargs)
        self._append(valid, positions)
        self.next_position = self.next_position + valid.sum(-1)
        self.tentative_start = self.length
        return outputs

    def forward_tentative(self, input_ids, node_ids, depths, ancestors, **model_kwargs):
        """Append draft-tree nodes. `node_ids` [B, Q] name each query's node (-1 = hole), `depths` [B, Q] its
        distance from the next committed position (0 = the next token), `ancestors` [B, M, M] the round's
        ancestor-or-self relation over node ids."""
        node_ids, depths, ancestors = node_ids.to(self.device), depths.to(self.device), ancestors.to(self.device)
        positions = self.next_position[:, None] + depths.clamp(min=0)
        old_visible = self.committed.clone()
        old_tentative = self.slot_nodes
        query_nodes = node_ids.clamp(min=0)
        if old_tentative.shape[1]:
            seen = _lookup(ancestors, query_nodes, old_tentative.clamp(min=0)) & (old_tentative >= 0)[:, None, :]
            prefix_visible = torch.cat([old_visible[:, None, : self.tentative_start].expand(-1, len(seen[0]), -1),
                                        seen], dim=-1)
        else:
            prefix_visible = old_visible[:, None, :].expand(-1, input_ids.shape[1], -1)
        new_visible = _lookup(ancestors, query_nodes, query_nodes) & (node_ids >= 0)[:, None, :]
        outputs = self._forward(input_ids, positions, prefix_visible, new_visible, **model_kwargs)
        self._append(torch.zeros_like(node_ids, dtype=torch.bool), positions)
        self.slot_nodes = torch.cat([self.slot_nodes, node_ids], dim=1)
        return outputs

    def forward_tentative_rows(self, rows, input_ids, node_ids, depths, ancestors, **model_kwargs):
        """`forward_tentative` computed for `rows` only; every other row gets hole slots and zero outputs.

        For segments of a sorted drafter, where often only a few rows need the deeper layers: the model runs on a
        cache view holding just those rows, and the new key/value slots are written back into the full cache.
        """
        if len(rows) == len(self.next_position):
            return self.forward_tentative(input_ids, node_ids, depths, ancestors, **model_kwargs)
        start = self.length
        view = self._row_view(rows)
        output = view.forward_tentative(input_ids[rows], node_ids[rows], depths[rows], ancestors[rows],
                                        **model_kwargs)
        owned = self.layers if self.layers is not None else range(len(self.cache.layers))
        for index in owned:
            full, part = self.cache.layers[index], view.cache.layers[index]
            for name in ("keys", "values"):
                old, new = getattr(full, name), getattr(part, name)[:, :, start:]
                grown = torch.cat([old, old.new_zeros(old.shape[0], old.shape[1], new.shape[2], old.shape[3])], 2)
                grown[rows, :, start:] = new
                setattr(full, name, grown)
        holes = torch.full_like(node_ids, -1)
        holes[rows] = node_ids[rows]
        positions = torch.zeros_like(node_ids)
        positions[rows] = view.slot_positions[:, start:]
        self._append(torch.zeros_like(node_ids, dtype=torch.bool), positions)
        self.slot_nodes = torch.cat([self.slot_nodes, holes], dim=1)
        result = output.new_zeros(len(node_ids), *output.shape[1:])
        result[rows] = output
        return result

    def _row_view(self, rows) -> SlotCache:
        """A SlotCache over the given rows only (copies of their KV), for a forward that skips the other rows."""
        owned = set(self.layers if self.layers is not None else range(len(self.cache.layers)))
        data = [(layer.keys[rows], layer.values[rows]) if index in owned and layer.is_initialized else (None, None)
                for index, layer in enumerate(self.cache.layers)]
        view = SlotCache(self.model, len(rows), self.device, run=self.run, layers=self.layers,
                         cache=DynamicCache(ddp_cache_data=data))
        view.committed, view.slot_positions = self.committed[rows], self.slot_positions[rows]
        view.next_position, view.slot_nodes = self.next_position[rows], self.slot_nodes[rows]
        view.tentative_start = self.tentative_start
        return view

    def _forward(self, input_ids, positions, prefix_visible, new_visible, **model_kwargs):
        query_count = input_ids.shape[1]
        if prefix_visible.dim() == 2:
            prefix_visible = prefix_visible[:, None, :].expand(-1, query_count, -1)
        # A hole query must still see something, or softmax over an all-masked row gives NaN.
        eye = torch.eye(query_count, dtype=torch.bool, device=self.device)
        visible = torch.cat([prefix_visible, new_visible | eye], dim=-1)
        if self.sliding_window is not None:
            key_positions = torch.cat([self.slot_positions, positions], dim=1)
            visible &= (positions[:, :, None] - key_positions[:, None, :]) < self.sliding_window
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return self.run(input_ids, mask[:, None], positions, self.cache, **model_kwargs)

    def _run_model(self, input_ids, attention_mask, position_ids, cache, **model_kwargs):
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, **{cache_argument(self.model): cache},
                          **model_kwargs)

    def _owned_layers(self):
        layers = self.cache.layers
        chosen = layers if self.layers is None else [layers[i] for i in self.layers if i < len(layers)]
        return [layer for layer in chosen if layer.is_initialized]

    def _append(self, committed: torch.Tensor, positions: torch.Tensor):
        self.committed = torch.cat([self.committed, committed], dim=1)
        self.slot_positions = torch.cat([self.slot_positions, positions], dim=1)

    # ------------------------------------------------------------------ round resolution
    def keep(self, node_ids: torch.Tensor, counts: torch.Tensor):
        """Commit, per row, the first `counts[b]` nodes of `node_ids[b]` (an accepted root-to-leaf path, in order)
        and drop every other tentative slot of the round."""
        node_ids, counts = node_ids.to(self.device), counts.to(self.device)
        start = self.tentative_start
        slot_nodes = self.slot_nodes
        keep_width = int(counts.max()) if counts.numel() else 0
        if keep_width:
            wanted = node_ids[:, :keep_width]
            matches = slot_nodes[:, None, :] == wanted[:, :, None]  # [B, K, T]
            source = start + matches.float().argmax(-1)  # slot holding each wanted node
            self._gather_into(start, source)
        kept = torch.arange(keep_width, device=self.device) < counts[:, None]
        self.committed = torch.cat([self.committed[:, :start], kept], dim=1)
        positions = self.next_position[:, None] + torch.arange(keep_width, device=self.device)
        self.slot_positions = torch.cat([self.slot_positions[:, :start], positions], dim=1)
        self._crop(start + keep_width)
        self.next_position = self.next_position + counts
        self.slot_nodes = slot_nodes[:, :0]
        self.tentative_start = self.length

    def keep_path(self, path_nodes: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
        """Commit the leading accepted path nodes this cache holds (a node is only fed after its parent, so they
        form a prefix of the path) and drop the rest of the round. Returns how many were kept per row."""
        in_path = torch.arange(path_nodes.shape[1], device=self.device) < num_accepted[:, None]
        if self.slot_nodes.shape[1]:
            held = (path_nodes[:, :, None] == self.slot_nodes[:, None, :]).any(-1)
        else:
            held = torch.zeros_like(in_path)
        counts = (held & in_path).long().cumprod(-1).sum(-1)
        self.keep(path_nodes, counts)
        return counts

    def select_rows(self, rows: torch.Tensor):
        """Keep only the given batch rows (finished rows stop costing anything)."""
        rows = rows.to(self.device)
        for layer in self._owned_layers():
            layer.keys = layer.keys[rows]
            layer.values = layer.values[rows]
        self.committed = self.committed[rows]
        self.slot_positions = self.slot_positions[rows]
        self.next_position = self.next_position[rows]
        self.slot_nodes = self.slot_nodes[rows]

    def compact(self, min_length: int = 64, max_hole_fraction: float = 0.5):
        """Squeeze out holes once they make up more than `max_hole_fraction` of the cache."""
        assert self.slot_nodes.shape[1] == 0, "compact between rounds only"
        length = self.length
        if length < min_length:
            return
        real = self.committed.sum(-1)
        width = int(real.max())
        if 1 - width / length <= max_hole_fraction:
            return
        # Right-align each row's real slots (stable order); the left remainder becomes padding holes.
        order = right_aligned_order(self.committed)[:, length - width:]
        self._gather_into(0, order, total_width=width)
        self.committed = self.committed.gather(1, order)
        self.slot_positions = self.slot_positions.gather(1, order)
        self.tentative_start = self.length

    # ------------------------------------------------------------------ KV tensor edits
    def _gather_into(self, start: int, source: torch.Tensor, total_width: int | None = None):
        """Write slots `source[b, k]` to slot `start + k` of every layer (in place when possible)."""
        width = source.shape[1]
        for layer in self._owned_layers():
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                index = source[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
                gathered = tensor.gather(2, index)
                if total_width is None:
                    tensor[:, :, start:start + width] = gathered
                else:
                    setattr(layer, name, gathered)

    def _crop(self, length: int):
        for layer in self._owned_layers():
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


def right_aligned_order(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column order that moves the True entries to the right end, each side keeping its order."""
    return torch.argsort(mask.int(), dim=1, stable=True)


def _lookup(ancestors: torch.Tensor, query_nodes: torch.Tensor, key_nodes: torch.Tensor) -> torch.Tensor:
    """ancestors[b, query_nodes[b, q], key_nodes[b, k]] as a [B, Q, K] bool tensor."""
    rows = ancestors.gather(1, query_nodes[:, :, None].expand(-1, -1, ancestors.shape[2]))
    return rows.gather(2, key_nodes[:, None, :].expand(-1, query_nodes.shape[1], -1))


def _sliding_window(config) -> int | None:
    """The attention window when every layer of the model uses one; mixed layouts are rejected upstream."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and any(kind != "sliding_attention" for kind in layer_types):
        if all(kind == "full_attention" for kind in layer_types):
            return None
        raise ValueError(
            f"{type(config).__name__} mixes sliding-window and full-attention layers, which hf_specdec does not "
            "support yet. Disable the sliding window (e.g. `use_sliding_window=False`) or use plain `generate()`."
        )
    return int(window)
