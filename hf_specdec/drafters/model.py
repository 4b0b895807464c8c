"""ModelDrafter: any causal LM that shares the target's tokenizer drafts chains or dynamic trees."""

from __future__ import annotations

import functools

import torch

from ..cache import SlotCache, on_device, shared_arange, slot_capacity
from ..draft import Draft
from ..processors import TreePrefixes, apply_processors
from ..stats import PhaseClock
from .base import DecodingState, Drafter, TreeConfig
from .trees import SampledCandidates, SiblingAcceptance, TopKCandidates

PENDING_WIDTH = 2  # committed tokens a drafter can be behind at the start of a round (see _pending_committed)


class ModelDrafter(Drafter):
    """Draft with a smaller causal LM.

    Args:
        model: a `PreTrainedModel` with a causal LM head and the target's tokenizer (a padded vocabulary of a
            different size is fine: drafting uses the shared part).
        num_draft_tokens: tokens drafted per round for chains (overridden by `generate(num_assistant_tokens=...)`).
        schedule: "constant"; "heuristic" (per row: +2 after a fully accepted draft, -1 otherwise); or "auto" (the
            draft length, 0 included, that maximises measured tokens per second: see `hf_specdec.schedule`).
        tree: a `TreeConfig` to draft EAGLE-2-style dynamic trees instead of chains.

    The draft applies the generation's own logits processors with each position's true prefix and samples (or
    takes the argmax) exactly as the target would, so the q handed to the verifier is the distribution the token
    was drawn from. Greedy tree children are the top-k of that distribution; sampled ones are drawn from it without
    replacement and verified by recursive rejection (`hf_specdec.drafters.trees`).
    """

    #: True when a tree node's draft distribution depends on other frontier nodes than its ancestors
    distributions_read_the_frontier = False

    def __init__(self, model, num_draft_tokens: int = 5, schedule: str = "constant", tree: TreeConfig | None = None):
        super().__init__(num_draft_tokens=num_draft_tokens, schedule=schedule, tree=tree)
        if not hasattr(model, "config") or not callable(model):
            raise TypeError(f"ModelDrafter needs a transformers causal LM, got {type(model).__name__}.")
        self.model = model
        self.vocab_size = model.config.get_text_config().vocab_size
        self.cache: SlotCache | None = None
        self.forward_count = 0
        self.sibling_acceptance: SiblingAcceptance | None = None  # sampled trees' budget follows it
        self._draft_ranks = None
        self._chain_step = None  # while a chain is drafted: the step being fed (see _forward_tentative)

    # ------------------------------------------------------------------ lifecycle
    def start(self, target, state: DecodingState, num_draft_tokens: int | None = None) -> None:
        super().start(target, state, num_draft_tokens)
        check_shared_vocabulary(target, self.model)
        if self.tree is not None and self.tree.top_k > state.vocab_size:
            raise ValueError(f"TreeConfig(top_k={self.tree.top_k}) asks for more children per node than the "
                             f"vocabulary has tokens ({state.vocab_size}); lower top_k.")
        self.model.eval()
        self._chain_step = None
        self.device = self.model.device
        # target ids index the draft's embeddings directly unless its (padded) vocabulary is the smaller one
        self._clamp_ids = self.vocab_size < state.vocab_size
        self.clock = state.clock or PhaseClock(self.device)
        batch_size = state.sequences.shape[0]
        self.round_capacity = self._round_capacity()
        compiled = None if state.compile_config is None else self.model.get_compiled_call(state.compile_config)
        capacity = slot_capacity(state.sequences.shape[1] + PENDING_WIDTH + self.round_capacity + 2,
                                 compiled is not None)
        self.cache = self._new_cache(batch_size, capacity, compiled)
        # The drafter reads the prompt columns `state.prompt_length`; the rest of the text (the root, then what the
        # rounds commit) comes in front of each round's draft.
        prompt = state.prompt_length
        self._prefill(state.sequences[:, :prompt], state.token_mask[:, :prompt])
        self.fed = torch.full((batch_size,), prompt, dtype=torch.long, device=state.lengths.device)
        self.tokens_behind = 0  # extra pending tokens possible beyond a drafted round's two (see fall_behind)
        self.forward_count = 0

    def _round_capacity(self) -> int:
        """Round ids one round can use in the drafter's cache: chain steps, or every tree candidate."""
        if self.tree is None:
            return self.max_round_nodes(self.draft_length)
        return self.tree.top_k + (self.tree.depth - 1) * self.tree.top_k * self.tree.top_k

    def _new_cache(self, batch_size: int, capacity: int, compiled_call) -> SlotCache:
        return SlotCache(self.model, batch_size, capacity, self.device, compiled_call=compiled_call,
                         max_round_nodes=self.round_capacity)

    def _prefill(self, tokens, valid):
        with self.clock("draft_forward"):
            self.cache.prefill(self._embeddable(tokens), valid, logits_to_keep=1, **self._model_inputs())
        self.forward_count += 1

    def fall_behind(self, tokens: int) -> None:
        self.tokens_behind += tokens

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        self.cache.select_rows(rows.to(self.device))
        self.fed = self.fed[rows.to(self.fed.device)]

    def finish(self) -> None:
        self.cache = None

    # ------------------------------------------------------------------ drafting
    def propose(self, state: DecodingState) -> Draft:
        self._fed_tentative = False
        self._draft_ranks = None
        if self.tree is not None:
            return self._propose_tree(state)
        return self._propose_chain(state)

    def _pending_committed(self, state: DecodingState):
        """The committed tokens the drafter has not seen yet, right-aligned: [B, W] + mask, W a multiple of
        PENDING_WIDTH. After a drafted round at most two are pending (the bonus token, and the last accepted draft
        token when it was a leaf, never fed); `fall_behind` adds what the drafter was not shown."""
        # nothing can be pending beyond what was generated (a drafter back after many skipped rounds)
        behind = min(self.tokens_behind, state.host_text_length - state.prompt_length)
        width = PENDING_WIDTH * (1 + -(-behind // PENDING_WIDTH))
        self.tokens_behind = 0
        lengths = state.lengths
        steps = shared_arange(width, lengths.device)
        columns = (lengths[:, None] - width + steps).clamp(min=0)
        tokens = state.sequences.gather(1, columns)
        valid = steps >= (width - lengths + self.fed)[:, None]  # the last `lengths - fed` columns
        self.fed = lengths.clone()
        return tokens, valid

    def _root_scores(self, state: DecodingState) -> torch.Tensor:
        """Feed the unseen committed tokens; processed draft scores [B, V] for the root's children."""
        tokens, valid = self._pending_committed(state)
        self.cache.tighten(state.host_text_length)
        chunk = PENDING_WIDTH if self.cache.compiled else tokens.shape[1]  # one shape when captured
        for start in range(0, tokens.shape[1], chunk):
            logits = self._forward_committed(tokens[:, start:start + chunk], valid[:, start:start + chunk]).logits[:, -1]
        return self._process(logits[:, None], state, state.root_prefixes())[:, 0]

    def _node_scores(self, tokens, node_ids, depths, ancestors, state, prefixes) -> torch.Tensor:
        """Feed draft nodes [B, F] as tentative tree nodes; processed draft scores [B, F, V] for their children."""
        self._fed_tentative = True
        logits = self._forward_tentative(tokens, node_ids, depths, ancestors).logits
        return self._process(logits, state, prefixes)

    def _propose_chain(self, state: DecodingState) -> Draft:
        lengths = self.chain_lengths(state)
        steps = self.chain_steps()
        batch_size = state.sequences.shape[0]
        if steps == 0:  # schedule="auto" found that drafting does not pay now
            self.fall_behind(1)  # the target alone adds one token this round
            return Draft.empty(batch_size, state.sequences.device)
        scores = self._root_scores(state)
        tokens, probs = [], []  # [B, 1] tokens and [B, V] distributions, joined once at the end
        shape = _chain_round(batch_size, steps, self.device, state.lengths.device)
        try:
            for step in range(steps):
                token, q = _draw(scores, state.do_sample)
                tokens.append(token)
                probs.append(q)
                if step + 1 < steps:  # the last draft token is never fed: the target's bonus follows it
                    prefixes = None
                    if state.reads_text:
                        prefixes = state.prefixes(torch.cat(tokens, dim=1)[:, None, :], shape.prefix_depths[step])
                    step_ids = shape.step_ids[step]
                    self._chain_step = step
                    scores = self._node_scores(token, step_ids, step_ids, shape.ancestors, state, prefixes)[:, 0]
        finally:  # (a processor may raise: a drafter reused afterwards, or copied into a tree drafter, must not
            self._chain_step = None  # route its next forwards through the chain path)
        self._draft_node_ids = shape.node_ids
        draft_probs = torch.stack(probs, dim=1) if state.do_sample else None
        return Draft.chain(torch.cat(tokens, dim=1), lengths=lengths, probs=draft_probs)

    def _propose_tree(self, state: DecodingState) -> Draft:
        tree = self.tree
        batch_size = state.sequences.shape[0]
        device = state.sequences.device
        depth_limit = tree.depth
        sampled = state.do_sample and tree.sampling == "recursive"
        if sampled:
            if self.sibling_acceptance is None or len(self.sibling_acceptance.tried) != tree.top_k:
                self.sibling_acceptance = SiblingAcceptance(tree.top_k, device)
            self.sibling_acceptance.to(device)
            buffers = SampledCandidates(batch_size, self.round_capacity, depth_limit, device, tree.coverage,
                                        self.sibling_acceptance.log_reach_by_rank(),
                                        level_major=self.distributions_read_the_frontier,
                                        sibling_temperature=tree.sibling_temperature)
        else:
            buffers = TopKCandidates(batch_size, self.round_capacity, depth_limit, device)

        log_q = _log_probs(self._root_scores(state))
        frontier = buffers.add_children(log_q[:, None], parents=None, top_k=tree.top_k)
        for level in range(1, depth_limit):
            node_ids = frontier.to(self.device)
            depths = torch.full_like(node_ids, level - 1)
            prefixes = None
            if state.reads_text:
                paths = buffers.paths.gather(1, frontier[:, :, None].expand(-1, -1, buffers.paths.shape[-1]))
                prefixes = state.prefixes(paths, buffers.depth.gather(1, frontier))
            scores = self._node_scores(buffers.tokens.gather(1, frontier).to(self.device), node_ids, depths,
                                       buffers.ancestors.to(self.device), state, prefixes)
            children = buffers.add_children(_log_probs(scores), parents=frontier, top_k=tree.top_k)
            frontier = buffers.best(children, tree.top_k)
        draft, selected = buffers.select(tree.max_nodes, tree.top_k)
        self._draft_node_ids = selected.to(self.device)  # the cache knows nodes by candidate id
        self._draft_ranks = buffers.ranks_of(selected) if sampled else None
        return draft

    def accept(self, state: DecodingState, draft: Draft, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        super().accept(state, draft, path, num_accepted)
        if self._draft_ranks is not None:  # a sampled tree: learn how often each sibling rank is accepted
            self.sibling_acceptance.record(draft, self._draft_ranks, path, num_accepted)
        if self._fed_tentative:  # (nothing was fed this round otherwise)
            self._resolve_round(path, num_accepted)

    def _resolve_round(self, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Keep the accepted draft nodes' cache entries (the drafter computed them from the same tokens the
        target accepted) and drop the rest of the round."""
        counts = self.cache.keep_path(self._accepted_node_ids(path), num_accepted, in_place=self.tree is None)
        self.fed = self.fed + counts.to(self.fed.device)

    def _accepted_node_ids(self, path: torch.Tensor) -> torch.Tensor:
        """The drafter's own node ids (as fed to its caches) of the accepted path's draft nodes."""
        path = path.to(self.device)
        if path.shape[1] == 0:
            return path
        return self._draft_node_ids.gather(1, path.clamp(min=0))

    # ------------------------------------------------------------------ model calls
    def _forward_committed(self, tokens, valid):
        return self._timed(self.cache.forward_committed, self._embeddable(tokens), valid.to(self.device),
                           logits_to_keep=1, **self._model_inputs())

    def _forward_tentative(self, tokens, node_ids, depths, ancestors):
        if self._chain_step is not None:  # a chain fed in order: the cache needs no per-step mask
            return self._timed(self.cache.forward_chain, self._embeddable(tokens), self._chain_step,
                               **self._model_inputs())
        return self._timed(self.cache.forward_tentative, self._embeddable(tokens), node_ids, depths, ancestors,
                           **self._model_inputs())

    def _model_inputs(self) -> dict:
        """Extra keyword arguments for every forward of the draft model (guided drafters add their guide)."""
        return {}

    def _embeddable(self, tokens):
        """A target token beyond a smaller padded draft vocabulary has no draft embedding; such ids only occur with
        untrained padding rows, and clamping them only affects draft quality, never the output."""
        tokens = on_device(tokens, self.device)
        return tokens.clamp(max=self.vocab_size - 1) if self._clamp_ids else tokens

    def _timed(self, function, *args, **kwargs):
        with self.clock("draft_forward"):
            outputs = function(*args, **kwargs)
        self.forward_count += 1
        return outputs

    def _process(self, logits: torch.Tensor, state: DecodingState, prefixes: TreePrefixes | None) -> torch.Tensor:
        """Draft logits [B, (Q,) V_draft] → processed scores in the target's vocabulary, on the target's device
        (`prefixes`: None when no processor reads them)."""
        squeeze = logits.dim() == 2
        logits = logits[:, None] if squeeze else logits
        logits = logits if logits.dtype == torch.float32 else logits.float()
        logits = on_device(match_vocabulary(logits, state.vocab_size), state.sequences.device)
        scores = apply_processors(state.logits_processor, logits, prefixes)
        return scores[:, 0] if squeeze else scores


def _draw(scores: torch.Tensor, do_sample: bool):
    """One draft token per row, [B, 1] (the shape it is fed in), and the distribution it was drawn from."""
    if do_sample:
        q = scores.softmax(-1)
        return torch.multinomial(q, 1), q
    return scores.argmax(-1, keepdim=True), None


class _ChainShape:
    """What every chain round of one shape shares (made once; shared, never written to): each step's round id as a
    [B, 1] input, the chain's ancestor relation, the node ids and the prefix depth of each fed step."""

    def __init__(self, batch_size: int, steps: int, device: torch.device, text_device: torch.device):
        ids = torch.arange(steps, device=device)
        self.step_ids = [ids[step:step + 1].expand(batch_size, 1) for step in range(steps)]
        self.node_ids = ids.expand(batch_size, -1)
        self.ancestors = torch.ones(steps, steps, dtype=torch.bool, device=device).tril().expand(batch_size, -1, -1)
        depths = torch.arange(1, steps + 1, device=text_device)
        self.prefix_depths = [depths[step:step + 1].expand(batch_size, 1) for step in range(steps)]


@functools.lru_cache(maxsize=32)
def _chain_round(batch_size: int, steps: int, device: torch.device, text_device: torch.device) -> _ChainShape:
    return _ChainShape(batch_size, steps, device, text_device)


def _log_probs(scores: torch.Tensor) -> torch.Tensor:
    return scores.log_softmax(-1)


def match_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft logits over the draft's vocabulary → the target's: extra draft entries are cut, missing ones are -inf
    (padded vocabularies of one tokenizer differ only in unused trailing rows)."""
    draft_vocab = logits.shape[-1]
    if draft_vocab == vocab_size:
        return logits
    if draft_vocab > vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - draft_vocab), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def check_shared_vocabulary(target, drafter_model) -> None:
    """Raise when the two models cannot share a tokenizer; allow padded vocabularies of the same tokenizer."""
    target_vocab = target.config.get_text_config().vocab_size
    draft_vocab = drafter_model.config.get_text_config().vocab_size
    if target_vocab == draft_vocab:
        return
    smaller, larger = sorted((target_vocab, draft_vocab))
    # one tokenizer's checkpoints differ only by embedding-table padding (Qwen2.5: 152064 vs 151936)
    if larger - smaller > max(256, larger // 100):
        raise ValueError(
            f"The target's vocabulary ({target_vocab} tokens) and the drafter's ({draft_vocab}) are too different to "
            "come from one tokenizer. hf_specdec drafters must share the target's tokenizer; use a drafter from the "
            "same model family, or transformers' universal assisted decoding (pass a plain model as "
            "`assistant_model` together with `tokenizer=` and `assistant_tokenizer=`)."
        )
