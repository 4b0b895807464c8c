"""The speculative decoding loop: prefill, then rounds of propose → one target forward → verify → advance.

`speculative_generate` is a transformers `custom_generate` callable: `generate()` has already merged the
generation config, prepared special tokens, the attention mask, logits processors (warpers included) and stopping
criteria, and expanded the batch for `num_return_sequences`. We own everything after that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import SlotCache
from .compat import hidden_states_request
from .draft import Draft, ancestor_matrix, path_tokens
from .drafters.base import DecodingState, Drafter
from .options import check_generate_options
from .processors import BatchText, TreePrefixes, apply_processors
from .stats import SpecStats
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
    **model_kwargs,
):
    """Speculative decoding with an hf_specdec drafter, as a `custom_generate` callable.

    Use it as `model.generate(**inputs, assistant_model=drafter)` (after `import hf_specdec`) or as
    `model.generate(**inputs, custom_generate=hf_specdec.speculative_generate, drafter=drafter)`.
    """
    _validate(model, input_ids, generation_config, drafter, model_kwargs, logits_processor or [])
    run = _Run(model, input_ids, logits_processor, stopping_criteria, generation_config, drafter, stream_to,
               model_kwargs.get("attention_mask"))
    return run.generate(num_draft_tokens)


class _Run:
    """State of one generate() call. Rows are indexed in the original batch; `active` lists the unfinished ones."""

    def __init__(self, model, input_ids, logits_processor, stopping_criteria, config, drafter, streamer, mask):
        if streamer is not None and input_ids.shape[0] > 1:
            raise ValueError("Streaming speculative decoding supports batch size 1 (rows advance by different "
                             "numbers of tokens each round); drop the streamer or generate one prompt at a time.")
        self.model, self.config, self.drafter, self.streamer = model, config, drafter, streamer
        self.processors = list(logits_processor or [])
        self.extra_criteria = [c for c in (stopping_criteria or [])
                               if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
        self.device = input_ids.device
        batch_size, prompt_length = input_ids.shape
        self.prompt_length = prompt_length
        self.max_length = config.max_length
        width = max(self.max_length, prompt_length + 1)
        self.pad_token = _first_token(config._pad_token_tensor, default=0)
        self.eos_tokens = config._eos_token_tensor.reshape(-1).to(self.device) if config._eos_token_tensor is not None else None
        self.sequences = torch.full((batch_size, width), self.pad_token, dtype=torch.long, device=self.device)
        self.sequences[:, :prompt_length] = input_ids
        self.token_mask = torch.ones(batch_size, width, dtype=torch.bool, device=self.device)
        if mask is not None:
            self.token_mask[:, :prompt_length] = mask.bool()
        self.lengths = torch.full((batch_size,), prompt_length, dtype=torch.long, device=self.device)
        self.batch_text = BatchText(self.sequences, self.lengths, self.pad_token)
        self.active = torch.arange(batch_size, device=self.device)
        self.do_sample = bool(config.do_sample)
        self.vocab_size = model.config.get_text_config().vocab_size
        self.stats = SpecStats.empty(batch_size)
        self.want_scores = bool(config.return_dict_in_generate and config.output_scores)
        self.want_logits = bool(config.return_dict_in_generate and config.output_logits)
        self.scores: list[torch.Tensor] = []
        self.raw_logits: list[torch.Tensor] = []
        # guided drafters read the target's hidden states at these layers (HF `hidden_states` indices)
        self.hidden_layers = list(getattr(drafter, "target_hidden_layers", ()) or ())
        self.target_hidden = None  # [B_active, L, H] states at each row's last accepted position

    # ------------------------------------------------------------------ the loop
    def generate(self, num_draft_tokens: int | None):
        start = time.perf_counter()
        if self.streamer is not None:
            self.streamer.put(self.sequences[:, : self.prompt_length].cpu())
        self.target = SlotCache(self.model, len(self.active), self.model.device)
        ended = self._prefill()
        self.drafter.start(self.model, self._state(), num_draft_tokens=num_draft_tokens)
        try:
            self._retire_finished(ended)
            while len(self.active):
                self._round()
        finally:
            self.stats.draft_forwards = getattr(self.drafter, "forward_count", 0)
            self.stats.draft_forward_seconds = getattr(self.drafter, "forward_seconds", 0.0)
            self.stats.exit_counts = dict(getattr(self.drafter, "exit_counts", {}))
            self.drafter.finish()
        self.stats.wall_seconds = time.perf_counter() - start
        self.stats.new_tokens = (self.lengths - self.prompt_length).cpu()
        self.drafter.last_stats = self.stats
        if self.streamer is not None:
            self.streamer.end()
        return self._output()

    def _prefill(self):
        rows = self.active
        tick = _clock(self.device)
        chunk = self.config.prefill_chunk_size or self.prompt_length  # generate(prefill_chunk_size=...) bounds memory
        for start in range(0, self.prompt_length, chunk):
            end = min(start + chunk, self.prompt_length)
            outputs = self.target.forward_committed(self.sequences[rows, start:end], self.token_mask[rows, start:end],
                                                    logits_to_keep=1,
                                                    **(self._hidden_request() if end == self.prompt_length else {}))
        self.stats.target_forward_seconds += _clock(self.device) - tick
        logits = outputs.logits[:, -1:].float().to(self.device)
        self._keep_hidden(outputs, torch.full((len(rows),), end - start - 1, device=self.device))
        prefixes = self._state().prefixes(self.sequences[rows, None, :0],
                                          torch.zeros(len(rows), 1, dtype=torch.long, device=self.device))
        processed = apply_processors(self.processors, logits, prefixes)
        if self.do_sample:
            token = torch.multinomial(processed[:, 0].softmax(-1), 1)
        else:
            token = processed[:, 0].argmax(-1, keepdim=True)
        self.stats.prefill_seconds = _clock(self.device) - tick
        self.stats.target_forwards += 1
        sources = (processed, logits, torch.zeros(len(rows), 1, dtype=torch.long, device=self.device))
        return self._append(token, torch.ones(len(rows), dtype=torch.long, device=self.device), sources)

    def _round(self):
        state = self._state()
        tick = _clock(self.device)
        draft = self.drafter.propose(state).truncate_depth(state.budget)
        tock = _clock(self.device)
        self.stats.draft_seconds += tock - tick

        chunk = _verify_chunk(state, draft)
        forward_start = _clock(self.device)
        outputs = self.target.forward_tentative(chunk.tokens, chunk.node_ids, chunk.depths, chunk.ancestors,
                                                **self._hidden_request())
        self.stats.target_forward_seconds += _clock(self.device) - forward_start
        logits = outputs.logits.float().to(self.device)
        processed = apply_processors(self.processors, logits, chunk.prefixes(state))
        verdict = verify(processed, draft, self.do_sample)
        self._keep_hidden(outputs, verdict.last_position)
        root = torch.zeros(len(verdict.path), 1, dtype=torch.long, device=verdict.path.device)
        accepted_chunk = torch.cat([root, verdict.path + 1], dim=1)  # root, then the accepted path (chunk indices)
        self.target.keep(accepted_chunk, verdict.num_accepted + 1)
        self.drafter.accept(state, draft, verdict.path, verdict.num_accepted)
        self.stats.verify_seconds += _clock(self.device) - tock
        self.stats.target_forwards += 1

        rows = self.active.cpu()
        drafted, accepted = draft.valid.sum(-1).cpu(), verdict.num_accepted.cpu()
        self.stats.drafted[rows] += drafted
        self.stats.accepted[rows] += accepted
        self.stats.rejected[rows] += verdict.rejected.long().cpu()
        self.stats.rounds[rows] += 1
        self.stats.record_accepted_lengths(accepted)

        new_tokens = torch.cat([draft.tokens.gather(1, verdict.path.clamp(min=0)), verdict.next_token[:, None]], 1)
        new_tokens = _place_bonus(new_tokens, verdict.num_accepted, verdict.next_token)
        # the distribution behind each emitted token sits at its parent's chunk position
        sources = (processed, logits, accepted_chunk[:, : new_tokens.shape[1]])
        self._retire_finished(self._append(new_tokens, verdict.num_accepted + 1, sources, (accepted, drafted)))
        self.target.compact()

    # ------------------------------------------------------------------ target hidden states for guided drafters
    def _hidden_request(self) -> dict:
        return hidden_states_request(self.hidden_layers) if self.hidden_layers else {}

    def _keep_hidden(self, outputs, positions: torch.Tensor):
        """The target's states at each row's last accepted position (whose logits gave the bonus token)."""
        if not self.hidden_layers:
            return
        states = outputs.hidden_states
        if states is None or any(index >= len(states) or states[index] is None for index in self.hidden_layers):
            raise ValueError(
                f"The drafter needs the target's hidden states {self.hidden_layers}, but "
                f"{type(self.model).__name__} returned {0 if states is None else len(states)} of them; pick layers "
                "the target has (hidden_states[i] is the input of decoder layer i)."
            )
        positions = positions.to(states[self.hidden_layers[0]].device)
        rows = torch.arange(len(positions), device=positions.device)
        self.target_hidden = torch.stack([states[index][rows, positions] for index in self.hidden_layers], dim=1)

    # ------------------------------------------------------------------ bookkeeping
    def _state(self) -> DecodingState:
        rows = self.active
        lengths = self.lengths[rows]
        return DecodingState(
            sequences=self.sequences[rows],
            token_mask=self.token_mask[rows],
            lengths=lengths,
            budget=(self.max_length - lengths - 1).clamp(min=0),
            logits_processor=self.processors,
            do_sample=self.do_sample,
            vocab_size=self.vocab_size,
            row_ids=rows,
            batch=self.batch_text,
            target_config=self.model.config,
            target_hidden=self.target_hidden,
        )

    def _append(self, tokens, counts, sources, drafted=None):
        """Append up to counts[b] tokens per active row, stopping at EOS, max_length or a stopping criterion.
        `sources` = (processed scores, raw logits, position of each token's distribution) for output_scores/logits;
        `drafted` = (accepted draft tokens, tokens drafted) per row this round, on the CPU; None: tokens are the
        target's own."""
        rows = self.active
        lengths = self.lengths[rows]
        counts = torch.minimum(counts, self.max_length - lengths)
        steps = torch.arange(tokens.shape[1], device=self.device)
        within = steps[None, :] < counts[:, None]
        if self.eos_tokens is not None:
            is_eos = torch.isin(tokens, self.eos_tokens) & within
            first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, counts)
            counts = torch.minimum(counts, first_eos)
            ended = is_eos.any(-1) & (first_eos <= counts)
        else:
            ended = torch.zeros_like(counts, dtype=torch.bool)
        source_rows, offsets = (steps[None, :] < counts[:, None]).nonzero(as_tuple=True)
        self.sequences[rows[source_rows], lengths[source_rows] + offsets] = tokens[source_rows, offsets]
        self._record_scores(rows, lengths, counts, *sources)
        self.lengths[rows] = lengths + counts
        if self.extra_criteria:
            stopped, counts = self._apply_stopping_criteria(rows, lengths, counts)
            ended |= stopped
        if self.streamer is not None:
            accepted, proposed = (0, 0) if drafted is None else (int(drafted[0][0]), int(drafted[1][0]))
            self._stream(tokens[0, : int(counts[0])].cpu(), accepted, proposed)
        return ended

    def _stream(self, tokens: torch.Tensor, accepted: int, proposed: int) -> None:
        """Streamers with `put_speculative(tokens, num_from_draft, num_drafted)` also learn which tokens were
        accepted drafts (the leading `num_from_draft`; the rest came from the target) and how many tokens the
        drafter proposed that round; others get transformers' `put`."""
        if hasattr(self.streamer, "put_speculative"):
            self.streamer.put_speculative(tokens, min(accepted, len(tokens)), proposed)
        else:
            self.streamer.put(tokens)

    def _apply_stopping_criteria(self, rows, old_lengths, counts):
        """Check user stopping criteria after every appended token and cut there, as plain generate() does: each
        call sees the whole batch at one length (rows shorter than that padded, as plain shows finished rows) and
        the scores so far when `output_scores` keeps them. Returns (stopped rows, their new token counts)."""
        new_lengths = old_lengths + counts
        stop_length = torch.zeros_like(counts)  # 0 = not stopped this round
        for length in range(int(old_lengths.min()) + 1, int(new_lengths.max()) + 1):
            reached = (old_lengths < length) & (length <= new_lengths) & (stop_length == 0)
            if not bool(reached.any()):
                continue
            input_ids = self.batch_text.at_length(length)
            scores = tuple(self.scores[: length - self.prompt_length]) if self.want_scores else None
            fired = torch.zeros(len(self.sequences), dtype=torch.bool, device=self.device)
            for criterion in self.extra_criteria:
                fired |= criterion(input_ids, scores).to(self.device)
            stop_length = torch.where(reached & fired[rows], length, stop_length)
        stopped = stop_length > 0
        for index in stopped.nonzero()[:, 0].tolist():
            row, length = int(rows[index]), int(stop_length[index])
            self.sequences[row, length:] = self.pad_token
            self.lengths[row] = length
            for position in range(length - self.prompt_length, int(new_lengths[index]) - self.prompt_length):
                for store in (self.scores, self.raw_logits):
                    if position < len(store):
                        store[position][row] = 0
        return stopped, torch.where(stopped, stop_length - old_lengths, counts)

    def _record_scores(self, rows, lengths, counts, processed, raw_logits, positions):
        """Keep, per generated position, the (processed) target scores that produced each token, like generate()."""
        stores = ([(self.scores, processed)] if self.want_scores else []) + \
                 ([(self.raw_logits, raw_logits)] if self.want_logits else [])
        if not stores or not counts.numel():
            return
        stores = [(store, values.gather(1, positions[:, :, None].expand(-1, -1, values.shape[-1])))
                  for store, values in stores]
        generated = lengths - self.prompt_length
        needed = int((generated + counts).max())
        for store, values in stores:
            while len(store) < needed:
                store.append(torch.zeros(len(self.sequences), values.shape[-1], device=self.device))
            for offset in range(int(counts.max())):
                sources = (offset < counts).nonzero()[:, 0]
                positions = (generated[sources] + offset).tolist()
                for source, row, position in zip(sources.tolist(), rows[sources].tolist(), positions):
                    store[position][row] = values[source, offset]

    def _retire_finished(self, ended: torch.Tensor):
        """Drop rows that hit EOS, a stopping criterion or max_length from the target, the drafter and the loop."""
        rows = self.active
        finished = ended | (self.lengths[rows] >= self.max_length)
        if not bool(finished.any()):
            return
        keep = (~finished).nonzero()[:, 0]
        self.active = rows[keep]
        if self.target_hidden is not None:
            self.target_hidden = self.target_hidden[keep]
        if len(self.active):
            self.target.select_rows(keep)
            self.drafter.select_rows(keep)

    def _output(self):
        end = int(self.lengths.max())
        sequences = self.sequences[:, :end].clone()
        beyond = torch.arange(end, device=self.device)[None, :] >= self.lengths[:, None]
        sequences[beyond] = self.pad_token
        if not self.config.return_dict_in_generate:
            return sequences
        generated = end - self.prompt_length
        return SpeculativeGenerateOutput(
            sequences=sequences,
            scores=tuple(self.scores[:generated]) if self.want_scores else None,
            logits=tuple(self.raw_logits[:generated]) if self.want_logits else None,
            spec_stats=self.stats,
        )


@dataclass
class _VerifyChunk:
    tokens: torch.Tensor  # [B, 1 + N] root then draft nodes
    node_ids: torch.Tensor  # [B, 1 + N] chunk index, -1 for invalid nodes
    depths: torch.Tensor  # [B, 1 + N] 0 for the root
    ancestors: torch.Tensor  # [B, 1 + N, 1 + N]
    paths: torch.Tensor  # [B, 1 + N, D] tokens after the root on each position's path

    def prefixes(self, state: DecodingState) -> TreePrefixes:
        return state.prefixes(self.paths, self.depths)


def _verify_chunk(state: DecodingState, draft: Draft) -> _VerifyChunk:
    batch_size, num_nodes = draft.tokens.shape
    device = draft.tokens.device
    root = state.sequences.gather(1, (state.lengths - 1)[:, None])
    node_ancestors = ancestor_matrix(draft.parents) & draft.valid[:, None, :]
    depths = draft.depths()
    ancestors = torch.ones(batch_size, 1 + num_nodes, 1 + num_nodes, dtype=torch.bool, device=device)
    ancestors[:, 0, 1:] = False
    ancestors[:, 1:, 1:] = node_ancestors
    node_ids = torch.arange(1 + num_nodes, device=device).expand(batch_size, -1)
    root_column = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    node_ids = torch.where(torch.cat([root_column == 0, draft.valid], 1), node_ids, -1)
    paths = path_tokens(draft.tokens, node_ancestors, depths)
    paths = torch.cat([root_column[:, :, None].expand(-1, -1, paths.shape[-1]), paths], dim=1)
    return _VerifyChunk(
        tokens=torch.cat([root, draft.tokens], dim=1),
        node_ids=node_ids,
        depths=torch.cat([root_column, depths], dim=1),
        ancestors=ancestors,
        paths=paths,
    )


def _place_bonus(tokens: torch.Tensor, num_accepted: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """Accepted path tokens followed by the bonus token right after them (not at the end of the padded row)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return torch.where(positions == num_accepted[:, None], bonus[:, None], tokens)


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


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
