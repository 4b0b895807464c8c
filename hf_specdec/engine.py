"""The speculative decoding loop: prefill, then rounds of propose → one target forward → verify → advance.

`speculative_generate` is a transformers `custom_generate` callable: `generate()` has already merged the
generation config, prepared special tokens, the attention mask, logits processors (warpers included) and stopping
criteria, and expanded the batch for `num_return_sequences`. We own everything after that.

A steady-state round reads from the device once: how many rows are still running (and the longest row's
length, in the same read). Everything else — acceptance, EOS and length cuts, statistics — stays on the device
with fixed shapes. Finished rows are masked in place and leave the caches in batches (when half of them are done;
never under captured forwards, whose shapes must not change). Streamers, user stopping criteria, input-reading
logits processors, the sorted drafter's exit gates and schedule="auto" (one read every 4 rounds) add their own
reads, only when they are used.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import SlotCache, shared_arange, slot_capacity
from .compat import cache_argument, hidden_states_request
from .draft import Draft, ancestor_matrix, path_tokens
from .drafters.base import DecodingState, Drafter
from .options import check_generate_options
from .processors import BatchText, TreePrefixes, apply_processors
from .routing.features import PooledPrompt
from .schedule import CHECK_EVERY
from .stats import PHASES, PhaseClock, SpecStats, profiled_phases, timed_forwards  # noqa: F401  (PHASES, profiled_phases: re-exported)
from .verify import verify

UNSUPPORTED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus what the speculative loop did (`spec_stats`)."""

    spec_stats: SpecStats | None = None


def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    drafter: Drafter | None = None,
    num_draft_tokens: int | None = None,
    stream_to=None,
    time_phases: bool = False,
    **model_kwargs,
):
    """Speculative decoding with an hf_specdec drafter, as a `custom_generate` callable.

    Use it as `model.generate(**inputs, assistant_model=drafter)` (after `import hf_specdec`) or as
    `model.generate(**inputs, custom_generate=hf_specdec.speculative_generate, drafter=drafter)`.
    `time_phases=True` measures every phase (device synchronised around each; `out.spec_stats` gets the times).
    A `compile_config` in the generation config captures the fixed-shape forwards with `torch.compile`.
    """
    _validate(model, input_ids, generation_config, drafter, model_kwargs, logits_processor or [])
    run = _Run(model, input_ids, logits_processor, stopping_criteria, generation_config, drafter, stream_to,
               model_kwargs.get("attention_mask"), time_phases, num_draft_tokens)
    if run.auto is not None and run.auto.wants_plain_decoding():
        # schedule="auto" first measures plain decoding here, and keeps to it where drafting cannot pay
        return run.plain_decoding(input_ids, logits_processor, stopping_criteria, model_kwargs)
    return run.generate(num_draft_tokens)


class _Run:
    """State of one generate() call. Rows are indexed in the original batch; `active` lists the rows the caches
    still hold (some of them may be finished: `finished` masks them until the next compaction)."""

    def __init__(self, model, input_ids, logits_processor, stopping_criteria, config, drafter, streamer, mask,
                 time_phases, num_draft_tokens):
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("Streaming speculative decoding supports batch size 1 (rows advance by different "
                             "numbers of tokens each round); drop the streamer or generate one prompt at a time.")
        drafter.bind(model)
        self.model, self.config, self.drafter, self.streamer = model, config, drafter, streamer
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.processors = list(logits_processor or [])
        self.extra_criteria = [c for c in (stopping_criteria or [])
                               if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        self.device = input_ids.device  # bookkeeping and processors run where the inputs are, as in plain generate
        batch_size, self.prompt_length = input_ids.shape
        self.max_length = config.max_length
        self.width = max(self.max_length, self.prompt_length + 1)
        self.pad_token = _first_token(config._pad_token_tensor, default=0)
        eos = config._eos_token_tensor
        self.eos_tokens = eos.reshape(-1).to(self.device) if eos is not None else None
        # one extra column: tokens that are not appended are written there, so every write has a fixed shape
        self.buffer = torch.full((batch_size, self.width + 1), self.pad_token, dtype=torch.long, device=self.device)
        self.buffer[:, : self.prompt_length] = input_ids
        self.sequences = self.buffer[:, : self.width]
        self.token_mask = torch.ones(batch_size, self.width, dtype=torch.bool, device=self.device)
        if mask is not None:
            self.token_mask[:, : self.prompt_length] = mask.bool()
        self.lengths = torch.full((batch_size,), self.prompt_length, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        self.batch_text = BatchText(self.sequences, self.pad_token)
        self.active = torch.arange(batch_size, device=self.device)
        self.all_rows = True  # `active` is every row (until a compaction): indexing by it is skipped
        self.do_sample = bool(config.do_sample)
        self.vocab_size = model.config.get_text_config().vocab_size
        self.clock = PhaseClock(model.device, timing=time_phases)
        self.compile_config = None if config.disable_compile else config.compile_config
        self.stats = SpecStats.empty(batch_size, self.device)
        self.seen_accepted = (0, 0)  # (accepted, decided) draft tokens at the last acceptance read (auto)
        self.host_text_length = self.prompt_length + 1  # the longest row's length as last read from the device
        self.prefilled = self.prompt_length  # prompt columns the drafter starts from (see _prefill)
        self.prompt_in_next_round = False  # the target has not read the prompt yet: the first round does
        self.target_forwards = 0
        max_new = self.width - self.prompt_length
        self.score_stores = {name: torch.zeros(batch_size, max_new + 1, self.vocab_size, device=self.device)
                             for name, wanted in (("scores", config.output_scores), ("logits", config.output_logits))
                             if wanted and config.return_dict_in_generate}
        self.auto = drafter.auto
        if self.auto is not None:
            self.auto.start((batch_size, model.device.type, self.compile_config is not None),
                            drafter.max_round_nodes(num_draft_tokens))
        # guided drafters read the target's hidden states at these layers (HF `hidden_states` indices): at each
        # row's last accepted position ("last"), or at every position committed last round ("accepted", EAGLE-3)
        self.hidden_layers = list(getattr(drafter, "target_hidden_layers", ()) or ())
        self.hidden_scope = getattr(drafter, "target_hidden_scope", "last")
        self.target_hidden = None  # [B_active, L, H] ("last") or [B_active, W, L, H] ("accepted")
        # routers read the prompt: the prefill's states at this layer, pooled over each prompt's real tokens
        self.feature_layer = getattr(drafter, "prompt_feature_layer", None)
        self.prompt_features = None

    # ------------------------------------------------------------------ the loop
    def generate(self, num_draft_tokens: int | None):
        start = time.perf_counter()
        if self.streamer is not None:
            self.streamer.put(self.sequences[:, : self.prompt_length].cpu())
        self.round_nodes = self.drafter.max_round_nodes(num_draft_tokens)
        self.histogram = torch.zeros(self.round_nodes + 2, dtype=torch.long, device=self.device)
        compiled = None if self.compile_config is None else self.model.get_compiled_call(self.compile_config)
        capacity = slot_capacity(self.width + self.round_nodes + 2, compiled is not None)
        self.target = SlotCache(self.model, len(self.active), capacity, self.model.device, compiled_call=compiled,
                                max_round_nodes=self.round_nodes + 1)
        with self.clock.running():
            self._prefill()
            self.drafter.start(self.model, self._state(), num_draft_tokens=num_draft_tokens)
            try:
                rounds = 0
                while self._running():
                    if self.auto is None:
                        self._round()
                    else:
                        self._auto_round(rounds)
                    rounds += 1
            finally:
                self.drafter.finish()
        self.clock.synchronize()
        self.stats.wall_seconds = time.perf_counter() - start
        self._finish_stats()
        if self.streamer is not None:
            self.streamer.end()
        return self._output()

    def _prefill(self):
        """The target reads the prompt and chooses the first token. Where nothing needs the prefill's own outputs,
        the prompt is left for the first round instead (see `_verify_with_the_prompt`): its last token is that
        round's root, and drafters start from the rest."""
        if self._prompt_joins_the_first_round():
            self.prefilled, self.host_text_length = self.prompt_length - 1, self.prompt_length
            self.prompt_in_next_round = True
            return
        rows = self.active
        pooled = None if self.feature_layer is None else PooledPrompt(self.feature_layer)
        layers = self.hidden_layers + ([] if pooled is None else [self.feature_layer])
        prompt_states = [] if self.hidden_layers and self.hidden_scope == "accepted" else None

        def on_chunk(chunk, valid):
            if pooled is not None:
                pooled.add(chunk.hidden_states, valid)
            if prompt_states is not None:  # every prompt position, chunk by chunk
                prompt_states.append(self._stacked_states(chunk))

        with self.clock("prefill"):
            outputs = self.target.prefill(self.sequences[rows, : self.prompt_length],
                                          self.token_mask[rows, : self.prompt_length], logits_to_keep=1,
                                          chunk_size=self.config.prefill_chunk_size,
                                          on_chunk=None if pooled is None and prompt_states is None else on_chunk,
                                          **(hidden_states_request(layers) if layers else {}))
            if pooled is not None:
                self.prompt_features = pooled.features()
            logits = outputs.logits[:, -1:].float().to(self.device)
            if prompt_states is not None:
                self.target_hidden = torch.cat(prompt_states, dim=1)
            else:
                self._keep_hidden(outputs, torch.full((len(rows),), -1, device=self.device))
            processed = apply_processors(self.processors, logits, self._state().root_prefixes())
            if self.do_sample:
                token = torch.multinomial(processed[:, 0].softmax(-1), 1)
            else:
                token = processed[:, 0].argmax(-1, keepdim=True)
            self.target_forwards += 1
            root = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)
            self._append(token, torch.ones(len(rows), dtype=torch.long, device=self.device), (processed, logits, root))

    def _round(self):
        state = self._state()
        with self.clock("draft"):
            draft = self.drafter.propose(state).truncate_depth(state.budget)
            if draft.num_nodes > self.round_nodes:  # (a shape: no device read)
                raise ValueError(
                    f"{type(self.drafter).__name__} proposed {draft.num_nodes} draft nodes, more than its "
                    f"max_round_nodes() = {self.round_nodes}, which sizes the caches: make max_round_nodes() return "
                    "the most nodes propose() can return.")
            if self.compile_config is not None:  # captured forwards need one shape every round
                draft = draft.padded(self.round_nodes)
        with self.clock("verify_forward"):
            chunk = _VerifyChunk(state, draft)
            if self.prompt_in_next_round:
                outputs = self._verify_with_the_prompt(chunk)
            else:
                outputs = chunk.forward(self.target, **self._hidden_request())
            logits = outputs.logits.float().to(self.device)
        with self.clock("processors"):
            prefixes = chunk.prefixes() if state.reads_text else None
            processed = apply_processors(self.processors, logits, prefixes) if self.processors else logits
        with self.clock("acceptance"):
            verdict = verify(processed, draft, self.do_sample)
        with self.clock("cache"):
            alive = ~self._held(self.finished)
            # chunk indices of what the target keeps: the root (0), then the accepted path
            kept = F.pad(verdict.path + 1, (1, 0))
            self._keep_hidden(outputs, kept if self.hidden_scope == "accepted" else verdict.last_position)
            self.target.keep(kept, (verdict.num_accepted + 1) * alive, in_place=draft.is_chain)
            self.drafter.accept(state, draft, verdict.path, verdict.num_accepted)
        with self.clock("bookkeeping"):
            self.target_forwards += 1
            drafted = draft.valid.sum(-1)
            self.stats.record_round(None if self.all_rows else self.active, alive, drafted, verdict.num_accepted,
                                    verdict.rejected, self.histogram)
            # the accepted path's tokens, then the bonus token right after them
            new_tokens = F.pad(draft.tokens.gather(1, verdict.path.clamp(min=0)), (0, 1))
            new_tokens.scatter_(1, verdict.num_accepted[:, None], verdict.next_token[:, None])
            # the distribution behind each emitted token sits at its parent's chunk position
            sources = (processed, logits, kept)
            self._append(new_tokens, verdict.num_accepted + 1, sources, (verdict.num_accepted, drafted))

    def _auto_round(self, rounds: int) -> None:
        """A round whose draft length schedule="auto" picks; while it calibrates, the round is timed."""
        length = self.auto.next_length()
        if length == 0 and self._can_hand_off():
            return self._hand_off_to_plain_decoding()
        self.drafter.set_draft_length(length)
        # rounds are timed for the cost model only at the batch size it is kept for (not after a compaction), and
        # not when the round also reads the prompt
        if not self.auto.calibrating or len(self.active) != len(self.sequences) or self.prompt_in_next_round:
            self._round()
        else:
            self.clock.synchronize()
            start = time.perf_counter()
            self._round()
            self.clock.synchronize()
            self.auto.observe_round(length, time.perf_counter() - start)
        if rounds % CHECK_EVERY == CHECK_EVERY - 1:  # one host read of the acceptance counters
            accepted, rejected = torch.stack([self.stats.accepted.sum(), self.stats.rejected.sum()]).tolist()
            self.auto.observe_acceptance(accepted - self.seen_accepted[0], accepted + rejected - self.seen_accepted[1])
            self.seen_accepted = (accepted, accepted + rejected)

    def _can_hand_off(self) -> bool:
        """Plain decoding can take over a call of one row (of more, it would see a different batch than plain
        generate() does) that has no extra outputs to merge."""
        return self.sequences.shape[0] == 1 and not self.score_stores and not self.hidden_layers

    def _hand_off_to_plain_decoding(self) -> None:
        """Continue the one running row with transformers' own loop (auto found that drafting does not pay)."""
        row = int(self.active[0])
        length = int(self.lengths[row])
        mask = self.token_mask[row: row + 1, :length].long()
        model_kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                            **{cache_argument(self.model): DynamicCache()})
        with timed_forwards(self.model):
            out = self.model._sample(self.sequences[row: row + 1, :length], logits_processor=self.logits_processor,
                                     stopping_criteria=self.stopping_criteria, generation_config=self.config,
                                     synced_gpus=False, streamer=_StepTimer(self.streamer), **model_kwargs)
        generated = (out if isinstance(out, torch.Tensor) else out.sequences)[0, length:].to(self.device)
        self._append(generated[None], torch.tensor([len(generated)], device=self.device), None)
        self.finished[row] = True

    def plain_decoding(self, input_ids, logits_processor, stopping_criteria, model_kwargs):
        """transformers' own decoding loop (`GenerationMixin._sample`), for when drafting cannot pay; under
        schedule="auto" its steps are timed (median time between two streamed tokens, prefill excluded)."""
        if self.streamer is not None:
            self.streamer.put(input_ids.cpu())
        steps = _StepTimer(self.streamer)
        start = time.perf_counter()
        with self.clock.running(), timed_forwards(self.model):
            out = self.model._sample(input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                     generation_config=self.config, synced_gpus=False, streamer=steps, **model_kwargs)
        self.stats.wall_seconds = time.perf_counter() - start
        if self.streamer is not None:
            self.streamer.end()
        generated = (out if isinstance(out, torch.Tensor) else out.sequences)[:, self.prompt_length:]
        ends = torch.isin(generated, self.eos_tokens) if self.eos_tokens is not None else torch.zeros_like(generated,
                                                                                                         dtype=torch.bool)
        first_end = torch.where(ends.any(-1), ends.float().argmax(-1) + 1, generated.shape[1])
        self.lengths = self.prompt_length + first_end.to(self.device)
        self.histogram = torch.zeros(1, dtype=torch.long, device=self.device)
        self.target_forwards = generated.shape[1]
        if self.auto is not None and steps.step_seconds is not None:
            self.auto.observe_plain_step(steps.step_seconds)
        self._finish_stats()
        self.stats.draft_forwards, self.stats.exit_counts = 0, {}
        if isinstance(out, torch.Tensor):
            return out
        return SpeculativeGenerateOutput(**{key: value for key, value in out.items()}, spec_stats=self.stats)

    def _running(self) -> bool:
        """The round's one read from the device: how many rows still run. Rows that finished leave the caches
        once half of the held rows are done (each removal copies every cache, so it is batched)."""
        running = ~self._held(self.finished)
        remaining, longest = torch.stack([running.sum(), self.lengths.max()]).tolist()
        self.target.tighten(longest)
        self.host_text_length = longest
        # compaction changes the batch: captured graphs would be captured again, so compiled calls only mask
        if remaining and remaining <= len(self.active) // 2 and self.compile_config is None:
            keep = running.nonzero()[:, 0]
            self.active = self.active[keep]
            self.all_rows = False
            if self.target_hidden is not None:
                self.target_hidden = self.target_hidden[keep.to(self.target_hidden.device)]
            self.target.select_rows(keep)
            self.drafter.select_rows(keep)
        return remaining > 0

    def _verify_with_the_prompt(self, chunk: _VerifyChunk):
        """The first round's target forward, which also reads the prompt: one causal forward over the prompt's
        columns but the last, the root and a chain's draft — as transformers' assisted generation does, one
        target forward per call fewer than a prefill followed by a verify. (A tree's mask is not causal: then the
        prompt is prefilled on its own first.)"""
        self.prompt_in_next_round = False
        prompt = slice(0, self.prefilled)
        if not chunk.draft.is_chain:
            self.target.prefill(self.sequences[:, prompt], self.token_mask[:, prompt], logits_to_keep=1)
            self.target_forwards += 1
            return chunk.forward(self.target, **self._hidden_request())
        tokens = torch.cat([self.sequences[:, prompt], chunk.tokens], dim=1)
        valid = torch.cat([self.token_mask[:, prompt], chunk.has_node], dim=1)
        return self.target.prefill(tokens, valid, chain_nodes=chunk.tokens.shape[1],
                                   logits_to_keep=chunk.tokens.shape[1])

    def _prompt_joins_the_first_round(self) -> bool:
        """Whether the target can read the prompt in the first round's forward: no drafter reads the prefill's
        hidden states or pooled prompt features, the prompt is not prefilled in chunks, has a token before its
        last, and that last token is real in every row (a batch of one may come with a mask ending in padding)."""
        if self.hidden_layers or self.feature_layer is not None or self.prompt_length < 2:
            return False
        if self.config.prefill_chunk_size or not self.drafter.drafts_chains_only:
            return False  # (a tree's first round would pay a prefill of its own)
        return bool(self.token_mask[:, self.prompt_length - 1].all())

    # ------------------------------------------------------------------ target hidden states for guided drafters
    def _hidden_request(self) -> dict:
        return hidden_states_request(self.hidden_layers) if self.hidden_layers else {}

    def _keep_hidden(self, outputs, positions: torch.Tensor):
        """The target's states at chunk `positions`: [B] each row's last accepted position (whose logits gave the
        bonus token) → [B, L, H]; or [B, W] the root and the accepted path → [B, W, L, H], entry j at the text
        column `length before the round - 1 + j` (entries past the accepted path repeat the root)."""
        if not self.hidden_layers:
            return
        states = self._layer_states(outputs)
        positions = positions.to(states[0].device) % states[0].shape[1]
        rows = torch.arange(len(positions), device=positions.device)
        where = (rows[:, None], positions) if positions.dim() == 2 else (rows, positions)
        self.target_hidden = torch.stack([layer[where] for layer in states], dim=-2)

    def _stacked_states(self, outputs) -> torch.Tensor:
        """[B, Q, L, H]: the target's states at `hidden_layers` for every position of a forward."""
        return torch.stack(self._layer_states(outputs), dim=2)

    def _layer_states(self, outputs) -> list:
        """The target's states `[B, Q, H]` at each of `hidden_layers`, checked."""
        states = outputs.hidden_states
        if states is None or any(index >= len(states) or states[index] is None for index in self.hidden_layers):
            raise ValueError(
                f"The drafter needs the target's hidden states {self.hidden_layers}, but "
                f"{type(self.model).__name__} returned {0 if states is None else len(states)} of them; pick layers "
                "the target has (hidden_states[i] is the input of decoder layer i)."
            )
        return [states[index].to(self.device) for index in self.hidden_layers]  # (a target split over devices)

    # ------------------------------------------------------------------ bookkeeping
    def _held(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor[self.active]`: the rows the caches hold (every row until a compaction: then no copy is made)."""
        return tensor if self.all_rows else tensor[self.active]

    def _state(self) -> DecodingState:
        rows = self.active
        lengths = self._held(self.lengths)
        return DecodingState(
            sequences=self._held(self.sequences),
            token_mask=self._held(self.token_mask),
            lengths=lengths,
            # finished rows (masked until the next compaction) draft nothing
            budget=torch.where(self._held(self.finished), -1, (self.max_length - 1) - lengths),
            logits_processor=self.processors,
            do_sample=self.do_sample,
            vocab_size=self.vocab_size,
            row_ids=rows,
            batch=self.batch_text,
            target_config=self.model.config,
            target_hidden=self.target_hidden,
            prompt_length=self.prefilled,
            host_text_length=self.host_text_length,
            clock=self.clock,
            compile_config=self.compile_config,
            prompt_features=self.prompt_features,
        )

    def _append(self, tokens, counts, sources, drafted=None):
        """Append up to counts[b] tokens per active row, stopping at EOS, max_length or a stopping criterion; the
        rows' `finished` flags follow. `sources` = (processed scores, raw logits, chunk position of each token's
        distribution) for output_scores/logits; `drafted` = (accepted draft tokens, tokens drafted) per row this
        round, for streamers; None: the tokens are the target's own."""
        rows = self.active
        lengths = self._held(self.lengths)
        counts = torch.where(self._held(self.finished), 0, torch.minimum(counts, self.max_length - lengths))
        steps = shared_arange(tokens.shape[1], self.device)
        within = steps < counts[:, None]
        ended = None
        if self.eos_tokens is not None:
            is_eos = torch.isin(tokens, self.eos_tokens) & within
            ended = is_eos.any(-1)
            counts = torch.where(ended, is_eos.float().argmax(-1) + 1, counts)
            within = steps < counts[:, None]
        columns = torch.where(within, lengths[:, None] + steps, self.width)  # the spare column takes the rest
        if self.all_rows:
            self.buffer.scatter_(1, columns, tokens)
            self.lengths = lengths + counts  # a new tensor: `lengths` (the old ones) is read below
        else:
            self.buffer[rows[:, None], columns] = tokens
            self.lengths[rows] = lengths + counts
        if sources is not None:
            self._record_scores(rows, lengths, within, *sources)
        if self.extra_criteria and sources is not None:  # (plain decoding's tokens were checked by plain decoding)
            stopped, counts = self._apply_stopping_criteria(rows, lengths, counts)
            ended = stopped if ended is None else ended | stopped
        done = self._held(self.lengths) >= self.max_length
        if ended is not None:
            done |= ended
        if self.all_rows:
            self.finished |= done
        else:
            self.finished[rows] |= done
        if self.streamer is not None and sources is not None:  # (plain decoding streamed its own tokens)
            self._stream(tokens[0, : int(counts[0])].cpu(), drafted)

    def _stream(self, tokens: torch.Tensor, drafted) -> None:
        """Streamers with `put_speculative(tokens, num_from_draft, num_drafted)` learn, once per verification
        round, which tokens were accepted drafts (the leading `num_from_draft`; the rest came from the target) and
        how many tokens the drafter proposed; the prefill's token (drafted None) and every token of a streamer
        without it go to transformers' `put`."""
        if drafted is not None and hasattr(self.streamer, "put_speculative"):
            accepted, proposed = int(drafted[0][0]), int(drafted[1][0])
            self.streamer.put_speculative(tokens, min(accepted, len(tokens)), proposed)
        else:
            self.streamer.put(tokens)

    def _apply_stopping_criteria(self, rows, old_lengths, counts):
        """Check user stopping criteria after every appended token and cut there, as plain generate() does: each
        call sees the whole batch at one length (rows shorter than that padded, as plain shows finished rows) and
        the scores so far when `output_scores` keeps them. Returns (stopped rows, their new token counts)."""
        new_lengths = old_lengths + counts
        stop_length = torch.zeros_like(counts)  # 0 = not stopped this round
        store = self.score_stores.get("scores")
        for length in range(int(old_lengths.min()) + 1, int(new_lengths.max()) + 1):
            reached = (old_lengths < length) & (length <= new_lengths) & (stop_length == 0)
            if not bool(reached.any()):
                continue
            input_ids = self.batch_text.at_length(length)
            scores = None if store is None else tuple(store[:, : length - self.prompt_length].unbind(1))
            fired = torch.zeros(len(self.sequences), dtype=torch.bool, device=self.device)
            for criterion in self.extra_criteria:
                fired |= criterion(input_ids, scores).to(self.device)
            stop_length = torch.where(reached & fired[rows], length, stop_length)
        stopped = stop_length > 0
        for index in stopped.nonzero()[:, 0].tolist():
            row, length = int(rows[index]), int(stop_length[index])
            self.sequences[row, length:] = self.pad_token
            self.lengths[row] = length
            for values in self.score_stores.values():
                values[row, length - self.prompt_length:] = 0
        return stopped, torch.where(stopped, stop_length - old_lengths, counts)

    def _record_scores(self, rows, lengths, within, processed, raw_logits, positions):
        """Keep, per generated position, the (processed) target scores that produced each token, like generate();
        positions past a row's end stay zero."""
        if not self.score_stores:
            return
        generated = lengths[:, None] - self.prompt_length + torch.arange(within.shape[1], device=self.device)
        spare = self.width - self.prompt_length
        slots = torch.where(within, generated, spare)
        for name, values in (("scores", processed), ("logits", raw_logits)):
            if name in self.score_stores:
                chosen = values.gather(1, positions[:, :, None].expand(-1, -1, values.shape[-1]))
                self.score_stores[name][rows[:, None], slots] = chosen

    def _finish_stats(self):
        stats = self.stats
        stats.finalize(self.histogram, self.clock)
        stats.target_forwards = self.target_forwards
        stats.draft_forwards = getattr(self.drafter, "forward_count", 0)
        stats.exit_counts = dict(getattr(self.drafter, "exit_counts", {}))
        stats.per_drafter = self.drafter.per_drafter_stats() if hasattr(self.drafter, "per_drafter_stats") else {}
        stats.new_tokens = (self.lengths - self.prompt_length).cpu()
        self.drafter.last_stats = stats

    def _output(self):
        end = int(self.lengths.max())
        sequences = self.sequences[:, :end].clone()
        beyond = torch.arange(end, device=self.device)[None, :] >= self.lengths[:, None]
        sequences[beyond] = self.pad_token
        if not self.config.return_dict_in_generate:
            return sequences
        generated = end - self.prompt_length
        stores = {name: tuple(values[:, :generated].unbind(1)) for name, values in self.score_stores.items()}
        return SpeculativeGenerateOutput(sequences=sequences, scores=stores.get("scores"),
                                         logits=stores.get("logits"), spec_stats=self.stats)


class _StepTimer:
    """A streamer that notes when each decoding step's tokens arrive (and passes them on to the user's)."""

    def __init__(self, streamer=None):
        self.streamer, self.times = streamer, []

    def put(self, value):
        self.times.append(time.perf_counter())
        if self.streamer is not None:
            self.streamer.put(value)

    def end(self):
        """The engine ends the user's streamer itself (plain decoding may take over mid-way)."""

    @property
    def step_seconds(self) -> float | None:
        gaps = [later - earlier for earlier, later in zip(self.times[1:], self.times[2:])]  # after the prefill
        return statistics.median(gaps) if gaps else None


class _VerifyChunk:
    """The target's verify forward for one round: `[root, node_0, ..., node_{N-1}]` per row (chunk indices
    0..N; see `draft.py`). The chunk index doubles as the node's round id in the target's `SlotCache`."""

    def __init__(self, state: DecodingState, draft: Draft):
        self.state, self.draft = state, draft
        root = state.sequences.gather(1, (state.lengths - 1)[:, None])
        self.tokens = torch.cat([root, draft.tokens], dim=1)
        self.has_node = F.pad(draft.valid, (1, 0), value=True)  # the root is always there

    def forward(self, cache: SlotCache, **model_kwargs):
        if self.draft.is_chain:  # root and nodes in order: causal, with holes after each row's last node
            return cache.forward_chain(self.tokens, valid=self.has_node, **model_kwargs)
        return cache.forward_tentative(self.tokens, self.node_ids(), self.depths(), self.ancestors(), **model_kwargs)

    def ancestors(self) -> torch.Tensor:
        """[B, 1 + N, 1 + N] ancestor-or-self relation over chunk indices."""
        draft = self.draft
        _, chain, root_row = _chunk_constants(draft.num_nodes, draft.tokens.device)
        if draft.is_chain:
            return chain & self.has_node[:, None, :]
        # the root sees itself; every node sees the root and its own ancestors
        node_ancestors = ancestor_matrix(draft.parents, draft.max_depth) & draft.valid[:, None, :]
        return F.pad(node_ancestors, (1, 0, 1, 0), value=True) & root_row

    def node_ids(self) -> torch.Tensor:
        chunk_index = _chunk_constants(self.draft.num_nodes, self.draft.tokens.device)[0]
        return torch.where(self.has_node, chunk_index, -1)

    def depths(self) -> torch.Tensor:
        return F.pad(self.draft.depths(), (1, 0))

    def prefixes(self) -> TreePrefixes:
        """Each chunk position's prefix (committed text + its path), for input-reading logits processors."""
        draft = self.draft
        paths = path_tokens(draft.tokens, self.ancestors()[:, 1:, 1:], draft.depths(), draft.max_depth)
        paths = torch.cat([paths.new_zeros(len(paths), 1, paths.shape[-1]), paths], dim=1)
        return self.state.prefixes(paths, self.depths())


@functools.lru_cache(maxsize=32)
def _chunk_constants(num_nodes: int, device: torch.device):
    """For a verify chunk of 1 + num_nodes positions (made once per size; shared, never written to): the chunk
    indices, a chain's ancestor-or-self relation (lower triangle) and the mask that hides every node from the root."""
    chunk_index = torch.arange(1 + num_nodes, device=device)
    chain = torch.ones(1 + num_nodes, 1 + num_nodes, dtype=torch.bool, device=device).tril()
    root_row = torch.ones_like(chain)
    root_row[0, 1:] = False
    return chunk_index, chain, root_row


def _validate(model, input_ids, config, drafter, model_kwargs, processors):
    if not isinstance(drafter, Drafter):
        raise TypeError(
            "speculative_generate needs an hf_specdec drafter: pass `assistant_model=ModelDrafter(draft_model)` "
            f"(or `drafter=` with custom_generate); got {type(drafter).__name__}."
        )
    if model.config.is_encoder_decoder:
        raise ValueError("hf_specdec supports decoder-only targets; for encoder-decoder models use plain "
                         "`generate(assistant_model=<a transformers model>)`.")
    attention = getattr(model.config, "_attn_implementation", None)
    if attention in UNSUPPORTED_ATTENTION:
        raise ValueError(
            f"Speculative decoding verifies draft trees with a custom 4D attention mask, which {attention} cannot "
            "take. Load the target (and drafter) with attn_implementation='sdpa' or 'eager'."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("hf_specdec needs `input_ids` prompts, not `inputs_embeds`.")
    check_generate_options(config, model_kwargs, processors, input_ids)
    mask = model_kwargs.get("attention_mask")
    if mask is not None and input_ids.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
        raise ValueError("Right padding detected: speculative decoding needs left-padded batches. Set "
                         "`tokenizer.padding_side = 'left'` before tokenizing the prompts.")


def _first_token(tensor, default: int) -> int:
    if tensor is None:
        return default
    return int(tensor.reshape(-1)[0])
