"""The only module that edits KV tensors: static slots, written by index.

`SlotKVCache` is a `transformers.Cache` whose layers are preallocated `[B, H, capacity, D]` tensors. Before every
forward the owner says, per query, which slot its key/value goes to (`write_slots`); the model's attention layers
call `update()` as with any cache and get the whole buffer back (or a prefix `[:read_span]` of it, in eager mode).
Shapes never change during a generate() call, so the forward can be captured (torch.compile / CUDA graphs), as in
gpt-fast.

`SlotCache` keeps one model's slots (or one segment of its layers: sorted drafters run several segments on one
shared `SlotKVCache`) and the per-row bookkeeping:

- committed slots: row b's text (or what this model has seen of it) fills slots `[0, kv_length[b])` in order;
  left padding stays there as masked slots. `committed_bias` `[B, capacity]` (0 = visible, dtype min = not) is
  the persistent mask, updated in place as slots are committed.
- tentative slots: the draft-tree nodes of the current round. A node with round id n is written to slot
  `kv_length[b] + n`; a query sees it only if it is the query's own node or an ancestor. `keep()` moves the
  accepted path to `kv_length[b] + 0, 1, ...` (for a chain whose ids are depths this is already the case) and
  commits it; rejected slots are simply overwritten later, so nothing ever needs compacting. Chain nodes
  (`forward_chain`) need no tree mask: a chain node's ancestors are the nodes before it, so their slots turn
  visible in `committed_bias` itself as they are fed and `keep()` hides the ones not kept.
- holes (padding queries, rows without a node at that place) write to the last slot, which nobody reads.

Prefill of a whole model runs the model's own causal path (no dense `[B, P, P]` mask) on a throw-away
`DynamicCache` and copies the keys and values into slots `[0, P)`.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from .compat import cache_argument
from .stats import PhaseClock

ROW_STATE = ("committed_bias", "slot_positions", "kv_length", "next_position", "written")  # one entry per row
CAPACITY_BUCKET = 256  # captured forwards: capacities round up to this, so prompts of other lengths reuse graphs


def slot_capacity(needed: int, compiled: bool) -> int:
    """Slots to preallocate: exactly what is needed, or (compiled) the next multiple of CAPACITY_BUCKET."""
    return -(-needed // CAPACITY_BUCKET) * CAPACITY_BUCKET if compiled else needed


class SlotLayer(CacheLayerMixin):
    """One layer's preallocated keys and values; `SlotKVCache.update` writes them by slot."""

    is_compileable = True
    is_sliding = False

    def __init__(self, batch_size: int, capacity: int):
        super().__init__()
        self.batch_size, self.capacity = batch_size, capacity

    def lazy_initialization(self, key_states, value_states) -> None:
        heads, head_dim, value_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros(self.batch_size, heads, self.capacity, head_dim)
        self.values = value_states.new_zeros(self.batch_size, heads, self.capacity, value_dim)
        if not torch.compiler.is_compiling():  # fixed addresses: captured graphs mutate them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("SlotLayer is written through SlotKVCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        return self.capacity

    def get_max_length(self) -> int:  # required by CacheLayerMixin
        return self.capacity


class SlotKVCache(Cache):
    """A transformers `Cache` of preallocated slots, written where `write_slots` says (one slot per query)."""

    def __init__(self, batch_size: int, capacity: int):
        super().__init__(layers=[])
        self.rows, self.capacity = batch_size, capacity
        self.write_slots: torch.Tensor | None = None  # [B, Q]
        self.read_span = capacity

    def layer(self, index: int) -> SlotLayer:
        while len(self.layers) <= index:
            self.layers.append(SlotLayer(self.rows, self.capacity))
        return self.layers[index]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layer(layer_idx)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        index = self.write_slots[:, None, :, None]
        layer.keys.scatter_(2, index.expand(-1, key_states.shape[1], -1, key_states.shape[-1]), key_states)
        layer.values.scatter_(2, index.expand(-1, value_states.shape[1], -1, value_states.shape[-1]), value_states)
        return layer.keys[:, :, : self.read_span], layer.values[:, :, : self.read_span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read_span

    def select_rows(self, rows: torch.Tensor, layers) -> None:
        for index in layers:
            layer = self.layers[index] if index < len(self.layers) else None
            if layer is not None and layer.is_initialized:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
                layer.batch_size = len(rows)
        self.rows = len(rows)


class SlotCache:
    """Slot bookkeeping for one model (or one segment of its layers) during one generate() call.

    `run(inputs, attention_mask, position_ids, cache, **kwargs)` runs the model (default: the HF model on token ids,
    compiled when `compiled_call` is given); `layers` are the cache layers it owns; `cache` a `SlotKVCache` shared
    between segments. `capacity` must cover the longest text plus the most tentative nodes of a round plus one.
    """

    def __init__(self, model, batch_size: int, capacity: int, device: torch.device, run=None, layers=None,
                 cache: SlotKVCache | None = None, compiled_call=None, max_round_nodes: int = 0):
        self.model, self.device, self.capacity = model, device, capacity
        self.compiled = compiled_call is not None
        self.call = compiled_call or model.__call__
        self.run = run if run is not None else self._run_model
        self.cache = cache if cache is not None else SlotKVCache(batch_size, capacity)
        self.layers = list(layers) if layers is not None else None
        self.dtype = model.dtype
        self.sliding_window = _sliding_window(model.config)
        self.scratch = capacity - 1  # holes write here; never visible
        masked = torch.finfo(self.dtype).min
        self.masked = masked
        # 0-dim biases in the model's dtype: a where() over them is one op, with no dtype conversion after it
        self.visible_bias = torch.zeros((), dtype=self.dtype, device=device)
        self.hidden_bias = torch.full((), masked, dtype=self.dtype, device=device)
        self.committed_bias = torch.full((batch_size, capacity), masked, dtype=self.dtype, device=device)
        self.slot_positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.kv_length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_round_nodes = max_round_nodes
        # which round ids were fed this round; the last column takes the holes' writes
        self.written = torch.zeros(batch_size, max_round_nodes + 1, dtype=torch.bool, device=device)
        self.live_steps = 0  # chain nodes of this round made visible in committed_bias (see forward_chain)
        self.device = self.kv_length.device  # "cuda" → "cuda:0": compared with tensors' devices below
        self.host_length = 0  # an upper bound of kv_length.max(), known without reading the device
        # views and offsets that stay the same for a whole round, keyed by what they are made of; dropped when the
        # round is resolved (kv_length is then a new tensor)
        self.round_views: dict = {}
        self.round_of = None  # the kv_length the round views were made for

    @property
    def batch_size(self) -> int:
        return self.kv_length.shape[0]

    def tighten(self, text_length: int) -> None:
        """Bound the slots eager forwards read by the longest row's text (read from the device by the engine). A
        row that ended inside a round (EOS) may have committed up to one round's nodes past its text."""
        self.host_length = min(self.host_length, text_length + self.max_round_nodes + 1)

    # ------------------------------------------------------------------ forwards
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, chunk_size: int | None = None, on_chunk=None,
                chain_nodes: int = 0, **model_kwargs):
        """The prompt (left-padded, `valid` marks real tokens), in chunks of `chunk_size` if given. A whole model
        runs its own causal path, as plain generate() does; a segment of layers (a custom `run`) takes the
        committed path. `on_chunk(outputs, valid)` sees every chunk's outputs (the last one is returned).

        `chain_nodes` > 0: the last columns are a round's chain (root first, `valid` False for holes), fed with the
        prompt in the same causal forward and left as `forward_chain` leaves its nodes, for `keep()` to resolve."""
        if self.run != self._run_model:
            if chain_nodes:
                raise ValueError("A prefill with a round's chain needs the whole model (no custom `run`).")
            return self.forward_committed(input_ids, valid, **model_kwargs)
        input_ids, valid = input_ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        mask = None if bool(valid.all()) else valid.long()  # no padding: the kernels' own causal path
        scratch = DynamicCache()
        width = input_ids.shape[1]
        chunk = chunk_size or width
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            with PhaseClock.model_call():
                outputs = self.model(input_ids=input_ids[:, start:end], position_ids=positions[:, start:end],
                                     attention_mask=None if mask is None else mask[:, :end], use_cache=True,
                                     **{cache_argument(self.model): scratch}, **model_kwargs)
            if on_chunk is not None:
                on_chunk(outputs, valid[:, start:end])
        for index, layer in enumerate(scratch.layers):
            slots = self.cache.layer(index)
            if not slots.is_initialized:
                slots.lazy_initialization(layer.keys, layer.values)
            slots.keys[:, :, :width] = layer.keys
            slots.values[:, :, :width] = layer.values
        self.committed_bias[:, :width] = torch.where(valid, 0.0, self.masked).to(self.dtype)
        self.slot_positions[:, :width] = positions
        committed = width - chain_nodes  # the chain's node n sits at slot kv_length + n, as forward_chain puts it
        self.kv_length = torch.full_like(self.kv_length, committed)
        self.next_position = valid[:, :committed].long().sum(-1)
        self.live_steps = chain_nodes
        self.host_length = width
        return outputs

    def forward_committed(self, inputs: torch.Tensor, valid: torch.Tensor, **model_kwargs):
        """Append text (prompt or pending accepted tokens), causal among itself; `valid=False` entries are holes.
        Valid entries take the next slots in order."""
        valid = on_device(valid, self.device)
        rank = valid.long().cumsum(-1) - 1
        slots = torch.where(valid, self.kv_length[:, None] + rank, self.scratch)
        positions = self.next_position[:, None] + rank.clamp(min=0)
        count = valid.sum(-1)
        self._commit_slots(slots, valid, positions)
        span = self._span(inputs.shape[1])
        causal = self._arange(span) <= slots[:, :, None]  # earlier committed slots and the query's own
        mask = torch.where(causal, self.committed_bias[:, None, :span], self.hidden_bias)
        outputs = self._forward(inputs, slots, positions, mask, span, valid, **model_kwargs)
        self.kv_length = self.kv_length + count
        self.next_position = self.next_position + count
        self.host_length += inputs.shape[1]
        return outputs

    def forward_tentative(self, inputs, node_ids, depths, ancestors, **model_kwargs):
        """Feed draft-tree nodes of this round. `node_ids` [B, Q]: each query's round id (its slot offset; -1 =
        hole), `depths` [B, Q] its distance from the next committed position (0 = the next token), `ancestors`
        [B, M, M] the round's ancestor-or-self relation over node ids."""
        node_ids, depths, ancestors = on_device(node_ids, self.device), on_device(depths, self.device), on_device(ancestors, self.device)
        round_ = self._round_views()
        valid = node_ids >= 0
        query_nodes = node_ids.clamp(min=0)
        slots = torch.where(valid, round_["kv_length"] + query_nodes, self.scratch)
        positions = round_["next_position"] + depths.clamp(min=0)
        nodes = self.max_round_nodes
        self.written.scatter_(1, torch.where(valid, query_nodes, nodes), True)
        if self.sliding_window is not None:
            self.slot_positions.scatter_(1, slots, positions)
        span = self._span(nodes)
        # tentative columns: slot kv_length + n holds node n; visible to a query if written and an ancestor-or-self
        queries, width = inputs.shape[1], min(nodes, ancestors.shape[2])
        sees = ancestors.gather(1, query_nodes[:, :, None].expand(-1, -1, ancestors.shape[2]))
        sees = (sees if width == sees.shape[2] else sees[:, :, :width]) & self._round_view("written", width)
        mask = self._round_view("committed", span).expand(-1, queries, -1).clone()
        columns = self._round_view("columns", width).expand(-1, queries, -1)
        mask.scatter_(2, columns, torch.where(sees, self.visible_bias, self.hidden_bias))
        return self._forward(inputs, slots, positions, mask, span, valid, **model_kwargs)

    def forward_chain(self, inputs, first: int = 0, valid=None, **model_kwargs):
        """Feed chain nodes `first .. first + Q - 1` of this round ([B, Q] inputs; nodes before `first` were fed
        earlier, in order), node n at slot `kv_length + n`, depth n; `valid` [B, Q] marks real nodes (None: all).
        Their slots turn visible in `committed_bias`, which with a causal cut among the new nodes is the whole
        mask (a hole query sees everything visible, so it never meets an all-masked row)."""
        queries = inputs.shape[1]
        round_ = self._round_views()
        offsets = shared_arange(queries, self.device, first)
        slots, positions = round_["kv_length"] + offsets, round_["next_position"] + offsets
        if valid is None:
            self.committed_bias.scatter_(1, slots, 0.0)
            if self.sliding_window is not None:
                self.slot_positions.scatter_(1, slots, positions)
        else:
            valid = on_device(valid, self.device)
            slots = torch.where(valid, slots, self.scratch)
            self._commit_slots(slots, valid, positions)
        self.live_steps = max(self.live_steps, first + queries)
        span = self._span(self.max_round_nodes)
        mask = self._round_view("committed", span)
        if queries > 1:  # (one query: nothing after it is visible yet)
            mask = torch.where(self._arange(span) <= slots[:, :, None], mask, self.hidden_bias)
        return self._forward(inputs, slots, positions, mask, span, None, **model_kwargs)

    def forward_tentative_rows(self, rows, inputs, node_ids, depths, ancestors, **model_kwargs):
        """`forward_tentative` computed for `rows` only; every other row gets holes and zero outputs (for segments
        of a sorted drafter, where often only a few rows need the deeper layers)."""
        if len(rows) == self.batch_size:
            return self.forward_tentative(inputs, node_ids, depths, ancestors, **model_kwargs)
        view = self._row_view(rows)
        output = view.forward_tentative(inputs[rows], node_ids[rows], depths[rows], ancestors[rows], **model_kwargs)
        for index in self._owned():
            full, part = self.cache.layers[index], view.cache.layers[index]
            full.keys[rows], full.values[rows] = part.keys, part.values
        self.written[rows], self.slot_positions[rows] = view.written, view.slot_positions
        result = output.new_zeros(self.batch_size, *output.shape[1:])
        result[rows] = output
        return result

    def _row_view(self, rows) -> SlotCache:
        """A SlotCache over the given rows only (copies of their slots)."""
        view = SlotCache(self.model, len(rows), self.capacity, self.device, run=self.run, layers=self.layers,
                         cache=SlotKVCache(len(rows), self.capacity), max_round_nodes=self.max_round_nodes)
        for index in self._owned():
            layer, part = self.cache.layers[index], view.cache.layer(index)
            part.keys, part.values, part.is_initialized = layer.keys[rows], layer.values[rows], True
        for name in ROW_STATE:
            setattr(view, name, getattr(self, name)[rows])
        view.host_length = self.host_length
        return view

    def _forward(self, inputs, slots, positions, mask, span, valid, **model_kwargs):
        """Run the model on `inputs` written to `slots`; `valid` marks real queries (None: no holes, and `mask` may
        be a view of the cache's own state, never written here)."""
        if self.sliding_window is not None:
            key_positions = self.slot_positions[:, None, :span]
            mask = mask.masked_fill(positions[:, :, None] - key_positions >= self.sliding_window, self.masked)
        if valid is not None:
            # a hole query must still see some key, or softmax over an all-masked row gives NaN: let it see slot 0
            mask.select(2, 0).masked_fill_(~valid, 0.0)
        self.cache.write_slots, self.cache.read_span = slots, span
        with PhaseClock.model_call():
            return self.run(inputs, mask[:, None], positions, self.cache, **model_kwargs)

    def _run_model(self, input_ids, attention_mask, position_ids, cache, **model_kwargs):
        return self.call(input_ids=on_device(input_ids, self.device), attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{cache_argument(self.model): cache},
                         **model_kwargs)

    def _span(self, new_slots: int) -> int:
        """How many slots this forward reads: all of them when compiled (fixed shapes), else the used prefix."""
        if self.compiled:
            return self.capacity
        return min(self.capacity, self.host_length + new_slots)

    def _commit_slots(self, slots, valid, positions):
        self.committed_bias.scatter_(1, slots, torch.where(valid, self.visible_bias, self.hidden_bias))
        if self.sliding_window is not None:  # (only the window reads the slots' positions)
            self.slot_positions.scatter_(1, slots, positions)

    def _arange(self, length: int) -> torch.Tensor:
        return shared_arange(length, self.device)

    def _round_views(self) -> dict:
        """This round's fixed views and offsets (a round's tentative forwards share them): made again once
        `kv_length` is replaced, i.e. after every commit."""
        if self.round_of is not self.kv_length:
            self.round_of = self.kv_length
            self.round_views = {"kv_length": self.kv_length[:, None], "next_position": self.next_position[:, None]}
        return self.round_views

    def _round_view(self, name: str, width: int) -> torch.Tensor:
        """[B, 1, width] views for the round's masks: `committed` (the committed bias of the slots read),
        `written` (which round ids were fed: a view, so it follows later writes), `columns` (the slots of round ids,
        `kv_length + id`)."""
        views = self._round_views()
        key = (name, width)
        if key not in views:
            if name == "committed":
                views[key] = self.committed_bias[:, None, :width]
            elif name == "written":
                views[key] = self.written[:, None, :width]
            else:
                views[key] = views["kv_length"][:, None] + self._arange(width)
        return views[key]

    def _owned(self):
        return self.layers if self.layers is not None else range(len(self.cache.layers))

    # ------------------------------------------------------------------ round resolution
    def keep(self, node_ids: torch.Tensor, counts: torch.Tensor, in_place: bool = False):
        """Commit, per row, the first `counts[b]` nodes of `node_ids[b]` (an accepted root-to-leaf path, in order)
        to the next committed slots and drop the rest of the round. `in_place`: node i already sits at offset i
        (a chain whose round ids are depths), so no keys or values move. After `forward_chain`, `node_ids` spans
        at least the nodes fed."""
        node_ids, counts = on_device(node_ids, self.device), on_device(counts, self.device)
        width = node_ids.shape[1]
        if width < self.live_steps:  # the columns below must cover every slot forward_chain made visible
            raise RuntimeError(f"keep() got {width} nodes but {self.live_steps} chain nodes were fed this round.")
        kept = self._arange(width) < counts[:, None]
        columns = self._round_view("columns", width)[:, 0]
        destination = torch.where(kept, columns, self.scratch)
        if not in_place and width:
            source = self.kv_length[:, None] + node_ids.clamp(min=0)
            for index in self._owned():
                layer = self.cache.layers[index] if index < len(self.cache.layers) else None
                if layer is None or not layer.is_initialized:
                    continue
                for tensor in (layer.keys, layer.values):
                    gather = source[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
                    moved = tensor.gather(2, gather)
                    tensor.scatter_(2, destination[:, None, :, None].expand_as(gather), moved)
        positions = self.next_position[:, None] + self._arange(width) if self.sliding_window is not None else None
        # chain nodes made their slots visible: committing every column of the round hides the ones not kept
        self._commit_slots(columns if self.live_steps else destination, kept, positions)
        self.live_steps = 0
        self.kv_length = self.kv_length + counts
        self.next_position = self.next_position + counts
        self.host_length += width
        self.written.zero_()

    def keep_path(self, path_nodes: torch.Tensor, num_accepted: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Commit the leading accepted path nodes this cache holds (a node is only fed after its parent, so they
        form a prefix of the path) and drop the rest of the round. Returns how many were kept per row."""
        path_nodes, num_accepted = on_device(path_nodes, self.device), on_device(num_accepted, self.device)
        in_path = self._arange(path_nodes.shape[1]) < num_accepted[:, None]  # (so every node in it is >= 0)
        if self.live_steps:  # a chain: its first `live_steps` nodes were fed
            held = path_nodes < self.live_steps
        else:
            held = self.written.gather(1, path_nodes.clamp(min=0, max=self.max_round_nodes))
        counts = (held & in_path).long().cumprod(-1).sum(-1)
        self.keep(path_nodes, counts, in_place=in_place)
        return counts

    def select_rows(self, rows: torch.Tensor):
        """Keep only the given batch rows (finished rows stop costing anything)."""
        rows = rows.to(self.device)
        self.cache.select_rows(rows, self._owned())
        for name in ROW_STATE:
            setattr(self, name, getattr(self, name)[rows])


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor.to(device)` without the (per-call, per-round) dispatch when it is already there."""
    return tensor if tensor.device == device else tensor.to(device)


@functools.lru_cache(maxsize=64)
def shared_arange(length: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """`arange(start, start + length)`, made once per shape (shared by every call: never written to)."""
    return torch.arange(start, start + length, device=device)


def right_aligned_order(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the column order that moves the True entries to the right end, each side keeping its order."""
    return torch.argsort(mask.int(), dim=1, stable=True)


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
