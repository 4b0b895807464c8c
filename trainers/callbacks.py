"""Measure what inference sees while a drafter trains: real speculative decoding and acceptance on the target's text.

`SpeculativeDecodingCallback` is a `transformers.TrainerCallback`. At every evaluation (or every `eval_steps`
optimizer steps) it takes the drafter as it is now and, against the frozen target:

1. decodes held-out prompts with hf_specdec's engine (`target.generate(..., assistant_model=<drafter>)`, the call
   users make at inference) and logs what the engine reports in `SpecStats`: the acceptance rate α (accepted /
   drafted draft tokens), τ (tokens per verification round, bonus included), the per-token acceptance
   accepted / (accepted + refused), and draft tokens per round;
2. on the target's own continuations of the same prompts (generated once, seeded, cached for the run), the
   drafter's mean expected acceptance Σ_x min(p, q) and top-1 agreement with the target — the teacher-forced view
   of the first draft token of a round, on the text the target actually writes (the trainers' own
   `expected_acceptance` is measured on the dataset's completions instead).

    callback = SpeculativeDecodingCallback(prompts, max_new_tokens=64, num_draft_tokens=5)
    trainer = DistillTrainer(..., callbacks=[callback])
    callback.bind(trainer)            # the callback reads the drafter, the target and the tokenizer from it
    trainer.train()                   # spec/alpha, spec/tau, ... in trainer.state.log_history

The drafter handed to the engine follows the trained model: a plain causal LM (DistillTrainer, AdaSPECTrainer)
drafts as a `ModelDrafter`, a `GuidedDrafter` and an `Eagle3DraftModel` through their own `as_drafter()`, and
SoFTTrainer's model as a `SortedDrafter` over the trained exits (thresholds: `args.exit_thresholds`, else the
drafter's default). Anything else: pass `drafter_factory=`. The target is `trainer.teacher_model`, or `target=`
(needed where the trainer runs none: SoFT without a teacher, offline teacher datasets).

Distributed training: every process decodes and scores its own shard of the prompts (prompts[rank::world]) and the
counts are summed over processes before α, τ and the means are formed, so the logged numbers are those of the whole
prompt set (decode seconds: the mean over processes). Sharded models (FSDP, DeepSpeed ZeRO-3) are refused: the
engine does not generate across processes (`synced_gpus`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainerCallback

from hf_specdec import Drafter, ModelDrafter, SortedDrafter, TreeConfig
from hf_specdec.bench.prompts import left_padded_batches
from hf_specdec.eagle3 import Eagle3DraftModel
from hf_specdec.guided import GuidedDrafter

from .data import detect_row_format, tokenize_row, until_eos
from .losses import IGNORE_INDEX, expected_acceptance, shared_vocab, top1_agreement

PREFIX = "spec/"

__all__ = [
    "SpeculativeDecodingCallback",
    "build_drafter",
    "decode_prompts",
    "drafter_scorer",
    "prompt_token_ids",
    "score_continuations",
    "target_continuations",
]


# ----- prompts ------------------------------------------------------------------------------------------------------


def prompt_token_ids(prompts: Iterable, tokenizer=None, max_prompts: int | None = None) -> list[list[int]]:
    """Token ids of every prompt. A prompt is a string (tokenized with the tokenizer's special tokens, as the
    trainers tokenize a `prompt` column), token ids (a list or a 1-D tensor), or a dataset row: `{"prompt": text,
    ids or chat messages}` (chat messages are rendered with the chat template and its generation prompt), or a
    trainer row (`prompt` + `completion`, `messages`, `input_ids` + `labels`) whose prompt is everything before its
    first trained token, as on-policy distillation reads it. Rows without a prompt (`text` rows) are refused."""
    ids = []
    for index, prompt in enumerate(prompts):
        if max_prompts is not None and len(ids) >= max_prompts:
            break
        row = _one_prompt(prompt, tokenizer)
        if not row:
            raise ValueError(f"Prompt {index} is empty: speculative decoding needs at least one token to continue.")
        ids.append(row)
    if not ids:
        raise ValueError("SpeculativeDecodingCallback needs at least one held-out prompt.")
    return ids


def _one_prompt(prompt, tokenizer) -> list[int]:
    if torch.is_tensor(prompt):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, str):
        return list(_tokenizer_or_fail(tokenizer, "text prompts")(prompt)["input_ids"])
    if isinstance(prompt, (list, tuple)) and all(isinstance(token, int) for token in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(message, Mapping) for message in prompt):
        return _chat_prompt(list(prompt), tokenizer)
    if isinstance(prompt, Mapping):
        if "prompt" in prompt and "completion" not in prompt:
            return _one_prompt(prompt["prompt"], tokenizer)
        row_format = detect_row_format(list(prompt))
        if row_format == "text":
            raise ValueError("A `text` row has no prompt (every token is trained): give `prompt` (+ `completion`), "
                             "`messages` or `input_ids` + `labels` rows, or the prompts themselves.")
        row = tokenize_row(dict(prompt), row_format, tokenizer, max_length=1 << 30)
        trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
        if trained and trained[0] == 0:
            raise ValueError("A row whose every token is trained has no prompt: give `labels` with -100 on the "
                             "prompt, or the prompts themselves.")
        return list(row["input_ids"][: trained[0] if trained else len(row["input_ids"])])
    raise TypeError(f"Cannot read a prompt from {type(prompt).__name__}: give text, token ids, chat messages or a "
                    "dataset row with `prompt` / `messages` / `input_ids` + `labels`.")


def _chat_prompt(messages: list, tokenizer) -> list[int]:
    tokenizer = _tokenizer_or_fail(tokenizer, "chat prompts")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("Chat prompts need a tokenizer with a chat template (`tokenizer.chat_template`).")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own BOS


def _tokenizer_or_fail(tokenizer, what: str):
    if tokenizer is None:
        raise ValueError(f"Tokenizing {what} needs a tokenizer: give the trainer a `processing_class`, pass "
                         "`tokenizer=` to the callback, or give token ids.")
    return tokenizer


def right_padded(rows: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` with every row starting at column 0 (positions need no correction)."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


# ----- the drafter --------------------------------------------------------------------------------------------------


def without_peft_wrapper(model: nn.Module) -> nn.Module:
    """A PEFT model's transformers model: LoRA-style adapters live inside its modules, so it computes the same
    logits and takes the engine's cache the way transformers models do. Prompt-learning adapters (virtual tokens)
    exist only in the wrapper's forward, which is kept."""
    config = getattr(model, "active_peft_config", None)
    if hasattr(model, "get_base_model") and config is not None and not getattr(config, "is_prompt_learning", False):
        return model.get_base_model()
    return model


def build_drafter(model: nn.Module, *, num_draft_tokens: int | None = None, schedule: str = "constant",
                  tree: TreeConfig | None = None, sorted_exits: list[int] | None = None,
                  sorted_thresholds: list[float] | None = None) -> Drafter:
    """The hf_specdec drafter that decodes with `model` as it is now (its weights are used, not copied): its own
    `as_drafter()` for a `GuidedDrafter` / `Eagle3DraftModel`, a `SortedDrafter` over `sorted_exits` when given, a
    `ModelDrafter` for any other causal LM. `num_draft_tokens=None`: the drafter's default (an EAGLE-3 head's
    `config.draft_length`, else 5)."""
    model = without_peft_wrapper(model)
    settings = dict(schedule=schedule, tree=tree)
    if num_draft_tokens is not None:
        settings["num_draft_tokens"] = num_draft_tokens
    if isinstance(model, (GuidedDrafter, Eagle3DraftModel)):
        return model.as_drafter(**settings)
    if sorted_exits:
        try:
            return SortedDrafter(model, sorted_exits, sorted_thresholds, **settings)
        except (ValueError, AttributeError) as error:
            raise ValueError(f"Cannot draft with the exits {list(sorted_exits)} of {type(model).__name__} ({error}). "
                             "Pass `drafter_factory=` to the callback to build the drafter yourself.") from error
    if not hasattr(model, "config") or not hasattr(model.config, "get_text_config"):
        raise TypeError(f"Cannot draft with a {type(model).__name__}: the callback drafts with causal LMs, "
                        "GuidedDrafter and Eagle3DraftModel; pass `drafter_factory=` for anything else.")
    return ModelDrafter(model, **settings)


# ----- speculative decoding -----------------------------------------------------------------------------------------


@dataclass
class DecodingTotals:
    """What the engine reported over several generate() calls (sums over batches and rows)."""

    accepted: int = 0
    drafted: int = 0
    rounds: int = 0
    rejected: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    exit_counts: dict[int, int] = field(default_factory=dict)

    def add(self, stats) -> None:
        self.accepted += int(stats.accepted.sum())
        self.drafted += int(stats.drafted.sum())
        self.rounds += int(stats.rounds.sum())
        self.rejected += int(stats.rejected.sum()) if stats.rejected is not None else 0
        self.new_tokens += int(stats.new_tokens.sum()) if stats.new_tokens is not None else 0
        self.seconds += stats.wall_seconds
        for exit_layer, count in (stats.exit_counts or {}).items():
            self.exit_counts[int(exit_layer)] = self.exit_counts.get(int(exit_layer), 0) + int(count)


def decoding_config(target: nn.Module, *, max_new_tokens: int, do_sample: bool, temperature: float,
                    num_draft_tokens: int | None, pad_token_id: int | None,
                    generation_kwargs: dict | None = None) -> GenerationConfig:
    """The target's own generation config with the callback's decoding settings on top (its EOS ids, and any
    sampling defaults a checkpoint ships, stay: that is what inference with this target does)."""
    config = copy.deepcopy(target.generation_config) if target.generation_config is not None else GenerationConfig()
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        settings["temperature"] = temperature
    if num_draft_tokens is not None:
        settings["num_assistant_tokens"] = num_draft_tokens
    if config.pad_token_id is None and pad_token_id is not None:
        settings["pad_token_id"] = pad_token_id
    settings.update(generation_kwargs or {})
    config.update(**settings)
    return config


@torch.no_grad()
def decode_prompts(target: nn.Module, drafter: Drafter, prompts: list[list[int]], generation_config: GenerationConfig,
                   pad_token_id: int, batch_size: int = 8) -> DecodingTotals:
    """Speculative decoding of `prompts` (left-padded batches of `batch_size`) through hf_specdec's generate()
    hook, as `target.generate(..., assistant_model=drafter)`; the sums of what the engine reported."""
    totals = DecodingTotals()
    device = _device_of(target)
    generation_config = copy.deepcopy(generation_config)
    generation_config.return_dict_in_generate = True  # the output then carries `spec_stats`
    for batch in left_padded_batches(prompts, batch_size, pad_token_id, device):
        out = target.generate(**batch, generation_config=generation_config, assistant_model=drafter)
        stats = getattr(out, "spec_stats", None) or drafter.last_stats
        if stats is None:
            raise RuntimeError("generate() returned no speculative statistics: the drafter did not run through "
                               "hf_specdec's engine (is hf_specdec imported?).")
        totals.add(stats)
    return totals


# ----- expected acceptance on the target's own continuations --------------------------------------------------------


@dataclass
class Continuation:
    """One held-out row: the prompt followed by the target's continuation (up to and including its first EOS)."""

    ids: list[int]
    prompt_length: int


@torch.no_grad()
def target_continuations(target: nn.Module, prompts: list[list[int]], generation_config: GenerationConfig,
                         pad_token_id: int, batch_size: int = 8) -> list[Continuation]:
    """Plain (no drafter) generation by the target of every prompt; rows that generated nothing are dropped."""
    device = _device_of(target)
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    rows = []
    for start, batch in zip(range(0, len(prompts), batch_size),
                            left_padded_batches(prompts, batch_size, pad_token_id, device)):
        out = target.generate(**batch, generation_config=generation_config)
        sequences = out if torch.is_tensor(out) else out.sequences
        width = batch["input_ids"].shape[1]
        for prompt, generated in zip(prompts[start : start + batch_size], sequences[:, width:].tolist()):
            generated = until_eos(generated, eos_ids)
            if generated:
                rows.append(Continuation(ids=prompt + generated, prompt_length=len(prompt)))
    return rows


# A scorer maps (input_ids, attention_mask, target hidden_states) of right-padded rows to
# {key: (logits [B, T-1, V], valid [B, T-1])}: logits at position t give the drafter's distribution of token t + 1
# as the first draft token of a round whose root is token t; `valid` marks positions it can score.
Scorer = Callable[[torch.Tensor, torch.Tensor, tuple | None], dict]


def drafter_scorer(model: nn.Module, sorted_exits: list[int] | None = None,
                   pad_token_id: int = 0) -> tuple[Scorer, bool]:
    """`(scorer, needs_target_hidden_states)` for the teacher-forced first draft token of `model`:

    - a causal LM reads the prefix (key None); with `sorted_exits`, every exit (key = the exit);
    - a `GuidedDrafter` is steered by the target's state one position back (the state whose logits produced the
      round's root), so it scores from the second position on;
    - an `Eagle3DraftModel` reads the pair (target state at t - 1, token t), as drafting does after a round
      (the trainer's training-time-test unroll, one step).
    """
    if isinstance(model, Eagle3DraftModel):
        from .eagle3 import ttt_unroll

        def eagle3(input_ids, attention_mask, hidden_states):
            features = torch.stack([hidden_states[k] for k in model.config.aux_hidden_state_layer_ids], dim=-2)
            step0 = ttt_unroll(model, input_ids, attention_mask, features, ttt_steps=1, pad_token_id=pad_token_id)[0]
            logits = model.logits_in_target_vocabulary(step0[:, :-1].float())  # row t drafts token t + 2
            logits = torch.cat([logits.new_zeros(len(logits), 1, logits.shape[-1]), logits], dim=1)
            valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            valid[:, 0] = False
            return {None: (logits, valid)}

        return eagle3, True
    if isinstance(model, GuidedDrafter):
        def guided(input_ids, attention_mask, hidden_states):
            previous = (torch.arange(input_ids.shape[1], device=input_ids.device) - 1).clamp(min=0)
            guides = model.guide_states_from_hidden_states(hidden_states)[:, previous]
            logits = model(input_ids=input_ids, attention_mask=attention_mask, guide_states=guides,
                           use_cache=False).logits[:, :-1]
            valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            valid[:, 0] = False
            return {None: (logits, valid)}

        return guided, True
    if sorted_exits:
        from .soft import exit_logits

        def sorted_(input_ids, attention_mask, hidden_states):
            per_exit = exit_logits(model, input_ids, attention_mask, list(sorted_exits))
            return {e: (logits[:, :-1], None) for e, logits in per_exit.items()}

        return sorted_, False

    model = without_peft_wrapper(model)

    def causal(input_ids, attention_mask, hidden_states):
        return {None: (model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1],
                       None)}

    return causal, False


@torch.no_grad()
def score_continuations(target: nn.Module, scorer: Scorer, needs_hidden_states: bool, rows: list[Continuation],
                        pad_token_id: int, temperature: float = 1.0, batch_size: int = 8) -> dict:
    """`{key: tensor [Σ min(p, q), Σ top-1 agreement, tokens]}` over the continuation tokens of `rows` (float64
    sums: means are taken once every process has added its own)."""
    device = _device_of(target)
    totals: dict = {}
    for batch in _batches(rows, batch_size):
        input_ids, attention_mask = right_padded([row.ids for row in batch], pad_token_id, device)
        outputs = target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         output_hidden_states=needs_hidden_states)
        p = outputs.logits[:, :-1]
        positions = torch.arange(p.shape[1], device=device)[None, :]
        starts = torch.tensor([row.prompt_length - 1 for row in batch], device=device)[:, None]
        ends = torch.tensor([len(row.ids) - 1 for row in batch], device=device)[:, None]
        predicted = (positions >= starts) & (positions < ends)  # logits of every continuation token
        drafts = scorer(input_ids, attention_mask, outputs.hidden_states if needs_hidden_states else None)
        for key, (q, valid) in drafts.items():
            chosen = predicted if valid is None else predicted & valid
            q_rows, p_rows = shared_vocab(q[chosen].float(), p[chosen].float())  # only the scored rows in float32
            sums = torch.stack([expected_acceptance(q_rows, p_rows, temperature).sum().double(),
                                top1_agreement(q_rows, p_rows).sum().double(),
                                chosen.sum().double()])
            totals[key] = totals[key] + sums if key in totals else sums
    return totals


# ----- the callback -------------------------------------------------------------------------------------------------


class SpeculativeDecodingCallback(TrainerCallback):
    """Log real speculative decoding (α, τ) and expected acceptance on the target's text during training.

    Args:
        prompts: held-out prompts: text, token ids, chat messages, or dataset rows (see `prompt_token_ids`); a
            `datasets.Dataset` of `prompt` / `messages` / `input_ids` + `labels` rows works as is.
        max_new_tokens: tokens generated per prompt (speculative decoding and the target's continuations).
        do_sample, temperature: decoding as in `generate()` (greedy by default). `temperature` is also the
            temperature of the expected acceptance Σ min(p, q).
        num_draft_tokens, schedule, tree: the drafter's settings (chains of `num_draft_tokens`, default: the
            drafter's own — an EAGLE-3 head's trained depth, else 5; `tree=TreeConfig(...)` for EAGLE-2-style trees;
            `schedule` "constant" / "heuristic" / "auto").
        batch_size: prompts per generate() call (left-padded) and rows per scoring forward.
        seed: seeds sampled decoding and sampled continuations (the training RNG is left untouched).
        eval_steps: None (default): measure at every evaluation (`on_evaluate`; set `eval_strategy`); an int: every
            `eval_steps` optimizer steps instead, whether or not the trainer evaluates.
        at_train_begin: also measure once when training starts (the drafter before any update).
        decode / expected_acceptance: switch either measurement off.
        continuation_tokens, continuation_do_sample: the target's continuations (default: `max_new_tokens`,
            `do_sample`), generated once per run and cached.
        target: the target, when the trainer has no `teacher_model` (SoFT without a teacher, offline teachers).
        tokenizer: for text / chat prompts (default: the trainer's `processing_class`).
        drafter_factory: `fn(model) -> hf_specdec Drafter`, replacing the built-in choice (see `build_drafter`).
        generation_kwargs: further `generate()` options (e.g. `{"top_p": 0.9}`), for decoding and continuations.
        max_prompts: use at most this many prompts.

    Logged (one `trainer.state.log_history` entry per measurement, at the current step; at an evaluation also added
    to its metrics as `eval_spec/...`, so `metric_for_best_model="spec/alpha"` works):
        `spec/alpha` accepted / drafted draft tokens (`SpecStats.acceptance_rate`), `spec/tau` tokens per
        verification round, bonus included (`SpecStats.mean_accepted_length`), `spec/per_token_acceptance`
        accepted / (accepted + refused), `spec/draft_tokens_per_round`, `spec/new_tokens_per_prompt`,
        `spec/decode_seconds`; for sorted drafters `spec/exit_<e>/draft_share` (drafted tokens per exit);
        `spec/expected_acceptance_on_target` and `spec/top1_agreement_on_target` (for sorted drafters per exit as
        `spec/exit_<e>/...`, the unprefixed keys being the shallowest exit's), `spec/target_tokens` (tokens scored).
    """

    def __init__(self, prompts, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 num_draft_tokens: int | None = None, schedule: str = "constant", tree: TreeConfig | None = None,
                 batch_size: int = 8, seed: int = 0, eval_steps: int | None = None, at_train_begin: bool = False,
                 decode: bool = True, expected_acceptance: bool = True, continuation_tokens: int | None = None,
                 continuation_do_sample: bool | None = None, target: nn.Module | None = None, tokenizer=None,
                 drafter_factory: Callable[[nn.Module], Drafter] | None = None,
                 generation_kwargs: dict | None = None, max_prompts: int | None = None):
        if max_new_tokens < 1 or batch_size < 1 or (num_draft_tokens is not None and num_draft_tokens < 1):
            raise ValueError("max_new_tokens, batch_size and num_draft_tokens must be >= 1.")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be a positive number of steps (or None: at evaluations), got {eval_steps}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not (decode or expected_acceptance):
            raise ValueError("Both measurements are off (decode=False, expected_acceptance=False): nothing to log.")
        self.prompts = prompts
        self.max_new_tokens, self.do_sample, self.temperature = max_new_tokens, do_sample, temperature
        self.num_draft_tokens, self.schedule, self.tree = num_draft_tokens, schedule, tree
        self.batch_size, self.seed, self.eval_steps, self.at_train_begin = batch_size, seed, eval_steps, at_train_begin
        self.decode, self.expected_acceptance = decode, expected_acceptance
        self.continuation_tokens = continuation_tokens or max_new_tokens
        self.continuation_do_sample = do_sample if continuation_do_sample is None else continuation_do_sample
        self.target, self.tokenizer, self.drafter_factory = target, tokenizer, drafter_factory
        self.generation_kwargs, self.max_prompts = dict(generation_kwargs or {}), max_prompts
        self.trainer: Trainer | None = None
        self._prompt_ids: list[list[int]] | None = None  # this process's shard
        self._continuations: list[Continuation] | None = None
        self._measured: dict[str, float] | None = None  # this step's metrics (one measurement per step)

    # ----- wiring -----------------------------------------------------------------------------------------------

    def bind(self, trainer: Trainer) -> SpeculativeDecodingCallback:
        """Give the callback its trainer (events do not pass it); adds the callback to the trainer if it is not
        there yet. Returns the callback."""
        self.trainer = trainer
        self._prompt_ids = self._continuations = self._measured = None
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _bound(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("SpeculativeDecodingCallback has no trainer: call `callback.bind(trainer)` after "
                               "building the trainer (TrainerCallback events do not pass it).")
        return self.trainer

    def drafter_model(self) -> nn.Module:
        trainer = self._bound()
        return trainer.accelerator.unwrap_model(trainer.model)

    def target_model(self) -> nn.Module:
        if self.target is not None:
            return self.target
        trainer = self._bound()
        teacher = getattr(trainer, "teacher_model", None)
        if teacher is None:
            raise ValueError(f"{type(trainer).__name__} runs no target here (no `teacher_model`: SoFT without a "
                             "teacher, or an offline teacher dataset); pass the target as "
                             "`SpeculativeDecodingCallback(..., target=target)`.")
        return trainer.accelerator.unwrap_model(teacher)

    def _sorted_exits(self) -> tuple[list[int] | None, list[float] | None]:
        from .soft import SoFTTrainer

        trainer = self._bound()
        if isinstance(trainer, SoFTTrainer):
            return list(trainer.args.exits), trainer.args.exit_thresholds
        return None, None

    def _check_backend(self) -> None:
        trainer = self._bound()
        zero3 = False
        if getattr(trainer, "is_deepspeed_enabled", False):
            plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
            zero3 = plugin is not None and getattr(plugin, "zero_stage", None) == 3
        if getattr(trainer, "is_fsdp_enabled", False) or zero3:
            raise ValueError("SpeculativeDecodingCallback decodes with whole models on every process; under FSDP / "
                             "DeepSpeed ZeRO-3 the models are sharded (and hf_specdec does not generate across "
                             "processes). Measure after training on a gathered checkpoint instead.")

    def _tokenizer(self):
        return self.tokenizer if self.tokenizer is not None else getattr(self._bound(), "processing_class", None)

    def _pad_token_id(self, target: nn.Module) -> int:
        tokenizer = self._tokenizer()
        candidates = [getattr(tokenizer, "pad_token_id", None), getattr(target.generation_config, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None), getattr(target.generation_config, "eos_token_id", None)]
        for candidate in candidates:
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0

    def shard_prompt_ids(self) -> list[list[int]]:
        """This process's prompts (token ids): prompts[rank::world]."""
        if self._prompt_ids is None:
            args = self._bound().args
            ids = prompt_token_ids(self.prompts, self._tokenizer(), self.max_prompts)
            self._prompt_ids = ids[args.process_index :: args.world_size]
        return self._prompt_ids

    # ----- events -----------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._bound()
        self._check_backend()
        self._measured = None
        if self.eval_steps is None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            warnings.warn("SpeculativeDecodingCallback measures at evaluations, but eval_strategy='no': set "
                          "eval_strategy (and eval_steps) on the trainer, or `eval_steps=` on the callback.",
                          stacklevel=2)
        if self.at_train_begin:
            self._log(self.measure())

    def on_step_begin(self, args, state, control, **kwargs):
        self._measured = None  # the drafter changes from here on

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps is not None and state.global_step % self.eval_steps == 0:
            self._log(self.measure())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.eval_steps is not None:
            return
        fresh = self._measured is None  # several eval datasets: one measurement, logged once, added to each
        results = self.measure() if fresh else self._measured
        self._measured = results
        if fresh:
            self._log(results)
        if metrics is not None:
            loss_key = next((key for key in metrics if key.endswith("_loss")), "eval_loss")
            prefix = loss_key[: -len("loss")]
            metrics.update({prefix + key: value for key, value in results.items()})

    def on_train_end(self, args, state, control, **kwargs):
        self._measured = None  # e.g. load_best_model_at_end changed the weights

    # ----- measuring --------------------------------------------------------------------------------------------

    def measure(self) -> dict[str, float]:
        """Run the measurements now, with the drafter as it is; the metrics (summed over processes) — nothing is
        logged. Every process must call it (the counts are reduced across processes)."""
        self._check_backend()
        trainer = self._bound()
        drafter_model, target = self.drafter_model(), self.target_model()
        pad = self._pad_token_id(target)
        prompts = self.shard_prompt_ids()
        exits, thresholds = self._sorted_exits()
        device = trainer.args.device
        rng_devices = [device] if device.type == "cuda" else []
        states = {model: model.training for model in (drafter_model, target)}
        embedding = drafter_model.get_input_embeddings() if isinstance(drafter_model, Eagle3DraftModel) else None
        sums, names = [], []
        try:
            drafter_model.eval()
            target.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                if self.decode:
                    torch.manual_seed(self.seed + trainer.args.process_index)
                    totals = self._decode(target, drafter_model, prompts, pad, exits, thresholds)
                    names += ["accepted", "drafted", "rounds", "rejected", "new_tokens", "prompts", "seconds"]
                    sums += [totals.accepted, totals.drafted, totals.rounds, totals.rejected, totals.new_tokens,
                             len(prompts), totals.seconds]
                    for exit_layer in exits or []:
                        names.append(f"exit_{exit_layer}/drafted")
                        sums.append(totals.exit_counts.get(exit_layer, 0))
                if self.expected_acceptance:
                    rows = self._target_rows(target, prompts, pad)
                    scorer, needs_hidden = drafter_scorer(drafter_model, exits, pad)
                    scored = score_continuations(target, scorer, needs_hidden, rows, pad, self.temperature,
                                                 self.batch_size)
                    for key in [None] if not exits else exits:
                        values = scored.get(key, torch.zeros(3, dtype=torch.float64)).tolist()
                        label = "" if key is None else f"exit_{key}/"
                        names += [f"{label}accept_sum", f"{label}top1_sum", f"{label}tokens"]
                        sums += values
        finally:
            for model, training in states.items():
                model.train(training)
            if embedding is not None and drafter_model.get_input_embeddings() is not embedding:
                drafter_model.set_input_embeddings(embedding)  # Eagle3Drafter.bind attaches the target's
        totals = dict(zip(names, self._reduce(sums)))
        return self._metrics(totals, exits)

    def _decode(self, target, drafter_model, prompts, pad, exits, thresholds) -> DecodingTotals:
        if self.drafter_factory is not None:
            drafter = self.drafter_factory(drafter_model)
        else:
            drafter = build_drafter(drafter_model, num_draft_tokens=self.num_draft_tokens, schedule=self.schedule,
                                    tree=self.tree, sorted_exits=exits, sorted_thresholds=thresholds)
        config = decoding_config(target, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                 temperature=self.temperature, num_draft_tokens=self.num_draft_tokens,
                                 pad_token_id=pad, generation_kwargs=self.generation_kwargs)
        if not prompts:
            return DecodingTotals()
        return decode_prompts(target, drafter, prompts, config, pad, self.batch_size)

    def _target_rows(self, target, prompts, pad) -> list[Continuation]:
        """The target's continuations of this process's prompts: generated on first use (seeded), then cached."""
        if self._continuations is None:
            config = decoding_config(target, max_new_tokens=self.continuation_tokens,
                                     do_sample=self.continuation_do_sample, temperature=self.temperature,
                                     num_draft_tokens=None, pad_token_id=pad, generation_kwargs=self.generation_kwargs)
            torch.manual_seed(self.seed + 1_000_003 + self._bound().args.process_index)
            self._continuations = target_continuations(target, prompts, config, pad, self.batch_size) if prompts else []
        return self._continuations

    def _reduce(self, sums: list[float]) -> list[float]:
        trainer = self._bound()
        if trainer.accelerator.num_processes <= 1 or not sums:
            return [float(value) for value in sums]
        device = trainer.args.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        reduced = trainer.accelerator.reduce(torch.tensor(sums, dtype=dtype, device=device), reduction="sum")
        return reduced.tolist()

    def _metrics(self, totals: dict[str, float], exits: list[int] | None) -> dict[str, float]:
        metrics = {}
        processes = self._bound().accelerator.num_processes
        if self.decode:
            accepted, drafted, rounds = totals["accepted"], totals["drafted"], totals["rounds"]
            decided = accepted + totals["rejected"]
            metrics.update({
                "alpha": accepted / drafted if drafted else 0.0,  # SpecStats.acceptance_rate
                "tau": (accepted + rounds) / rounds if rounds else 0.0,  # SpecStats.mean_accepted_length
                "per_token_acceptance": accepted / decided if decided else 0.0,  # SpecStats.per_token_acceptance
                "draft_tokens_per_round": drafted / rounds if rounds else 0.0,
                "new_tokens_per_prompt": totals["new_tokens"] / totals["prompts"] if totals["prompts"] else 0.0,
                "decode_seconds": totals["seconds"] / processes,
            })
            for exit_layer in exits or []:
                metrics[f"exit_{exit_layer}/draft_share"] = (
                    totals[f"exit_{exit_layer}/drafted"] / drafted if drafted else 0.0)
        if self.expected_acceptance:
            for label in [""] if not exits else [f"exit_{e}/" for e in exits]:
                count = totals[f"{label}tokens"]
                metrics[f"{label}expected_acceptance_on_target"] = totals[f"{label}accept_sum"] / count if count else 0.0
                metrics[f"{label}top1_agreement_on_target"] = totals[f"{label}top1_sum"] / count if count else 0.0
            first = "" if not exits else f"exit_{exits[0]}/"
            if exits:  # the unprefixed keys: the shallowest exit, the one a sorted drafter tries first
                metrics["expected_acceptance_on_target"] = metrics[f"{first}expected_acceptance_on_target"]
                metrics["top1_agreement_on_target"] = metrics[f"{first}top1_agreement_on_target"]
            metrics["target_tokens"] = totals[f"{first}tokens"]
        return {PREFIX + key: value for key, value in metrics.items()}

    def _log(self, metrics: dict[str, float]) -> None:
        """One `log_history` entry. `Trainer.log` itself, not the drafter trainers' override: that one would hand
        this entry the training metrics recorded since the last training log."""
        trainer = self._bound()
        Trainer.log(trainer, dict(metrics))
