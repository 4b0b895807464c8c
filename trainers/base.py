"""What every drafter trainer shares: the config fields, model and teacher loading, frozen-model placement,
dataset tokenization, the token normaliser, token-weighted metrics and the model card.

Subclasses implement `compute_loss` (returning `sum over tokens / num_items_in_batch`, see `losses.py`) and, when
their batches change between loading and training (on-policy generation, token filtering), `prepare_window`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from .data import MODEL_INPUT_KEYS, DraftDataCollator, has_trained_token, is_iterable_dataset, prepare_dataset
from .losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    chunked_token_values,
    get_divergence,
    in_backward,
    supervised_positions,
)
from .offline import OfflineTeacherCollator, TeacherMetadata, is_offline_teacher
from .teachers import (
    LiveTeacher,
    StoredTeacher,
    base_model,
    final_hidden_states,
    lm_head_logits,
    verify_lm_head_path,
)

logger = logging.get_logger(__name__)


@dataclass
class BaseDrafterConfig(TrainingArguments):
    """Fields shared by every drafter trainer's config (on top of `transformers.TrainingArguments`)."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "teacher_model_init_kwargs"]

    max_length: int = field(
        default=512,
        metadata={"help": "Maximum tokens per training row (prompt + completion); longer rows keep their start."},
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "Per-token divergence between drafter and teacher: forward_kl = KL(teacher‖draft), reverse_kl "
            "= KL(draft‖teacher), jsd = generalised JSD with `beta`, tvd = total variation (1 − expected "
            "acceptance, the quantity speculative sampling pays for).",
            "choices": sorted(DIVERGENCES),
        },
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "Mixture weight of the teacher in the `jsd` divergence, strictly between 0 and 1."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Loss temperature: both models' logits are divided by it before the divergence."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn off dropout in the student (drafter), so its training and sampling distributions match."
        },
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` is given as a path (JSON on the CLI)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when `teacher_model` is a path, e.g. "
            '\'{"dtype": "bfloat16"}\' (JSON on the CLI).'
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the datasets (None: the main process only)."}
    )
    loss_chunk_size: int = field(
        default=128,
        metadata={
            "help": "Tokens per chunk of the loss: the LM heads project hidden states to logits a chunk at a time "
            "and backward recomputes each chunk, so the loss holds one chunk's [chunk, vocabulary] logits, not the "
            "whole batch's. Smaller saves memory, larger saves kernel launches; 0 = the whole batch at once (full "
            "logits, as a plain forward returns them)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack tokenized rows into rows of up to `max_length` tokens (no row is split); position ids "
            "restart at every original row and attention never crosses rows, so the loss equals the unpacked one. "
            "Implies `padding_free`. Off-policy data only (on-policy generation needs one prompt per row)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Collate each micro-batch as one row without padding (position ids restart at every original "
            "row; attention never crosses rows): no compute is spent on padding tokens."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in self._VALID_DICT_FIELDS:
            value = getattr(self, name, None)
            if isinstance(value, str) and value.strip().startswith("{"):
                setattr(self, name, json.loads(value))
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is unknown; choose one of {sorted(DIVERGENCES)}.")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(
                f"divergence='jsd' needs 0 < beta < 1, got beta={self.beta}. For beta=0 use divergence='forward_kl',"
                " for beta=1 use divergence='reverse_kl'."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0: unchunked), got {self.loss_chunk_size}.")
        if self.max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (one token to read, one to predict), got {self.max_length}."
            )


def offline_teacher_datasets(train_dataset, eval_dataset) -> bool:
    """Whether the datasets are offline teacher datasets (`trainers.offline`); all of them or none."""
    given = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        given.update({f"eval_dataset[{name!r}]": dataset for name, dataset in eval_dataset.items()})
    else:
        given["eval_dataset"] = eval_dataset
    stored = {name: is_offline_teacher(getattr(dataset, "column_names", None))
              for name, dataset in given.items() if dataset is not None}
    if len(set(stored.values())) > 1:
        raise ValueError(f"Offline teacher datasets {[n for n, s in stored.items() if s]} and plain ones "
                         f"{[n for n, s in stored.items() if not s]}: a trainer either runs its teacher or reads its "
                         "stored outputs. recipes/offline_teacher.py writes train/ and eval/ splits.")
    return any(stored.values())


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: `nn.Dropout` modules and the float `attention_dropout` that HF attention layers pass to
    the attention kernel directly."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the model's LM head, read from the config so that sharded (ZeRO-3) weights do not matter."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.vocab_size


def _init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    return kwargs


def load_causal_lm(model_or_path: str | nn.Module, init_kwargs: dict[str, Any] | None, role: str) -> nn.Module:
    """A model given as a path is loaded with `init_kwargs`; an instance is returned as is (then kwargs are an error,
    since they would be silently ignored)."""
    if isinstance(model_or_path, str):
        return AutoModelForCausalLM.from_pretrained(model_or_path, **_init_kwargs(init_kwargs))
    if init_kwargs:
        raise ValueError(
            f"`{role}_init_kwargs` only apply when `{role}` is a path to load; you passed an instantiated model. "
            f"Drop the kwargs or pass the path instead."
        )
    return model_or_path


def check_shared_vocabulary(student: nn.Module, other: nn.Module, tokenizer, role: str) -> None:
    """The losses compare the two models on their common vocabulary prefix; every id the tokenizer can produce must
    lie inside it, or the models cannot share a tokenizer."""
    shared = min(vocab_size_of(student), vocab_size_of(other))
    if tokenizer is not None and len(tokenizer) > shared:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the {role} scores only {vocab_size_of(other)} and the "
            f"draft {vocab_size_of(student)}: they do not share a tokenizer. Distillation here needs the draft and "
            "the teacher to use the same tokenizer (LM heads may be padded to different sizes)."
        )


def check_same_tokenizer(tokenizer, other_path: str, role: str) -> None:
    """When a frozen model comes from a path with its own tokenizer, it must be the drafter's tokenizer."""
    if tokenizer is None:
        return
    try:
        other = AutoTokenizer.from_pretrained(other_path)
    except (OSError, ValueError):
        return  # no tokenizer saved next to the weights: nothing to compare
    if other.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The {role} at {other_path!r} uses a different tokenizer from the drafter's `processing_class` "
            f"({len(other)} vs {len(tokenizer)} tokens, or different ids). Token-level distillation needs one "
            "shared tokenizer: pick a drafter from the teacher's family."
        )


def call_inside_forward(wrapped: nn.Module, inner: nn.Module, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` as if it were `inner.forward`, called through `wrapped` (a DDP / FSDP / DeepSpeed
    wrapper, or `inner` itself under FSDP2).

    Code that calls several submodules of a sharded model (e.g. the decoder, then the final norm and LM head on
    intermediate hidden states) must run inside the wrapper's forward: that is where FSDP gathers the shards and DDP
    prepares its gradient reduction.
    """
    own_forward = inner.__dict__.get("forward")  # accelerate may have wrapped forward on the instance

    def redirected(*a, **k):
        _restore_forward(inner, own_forward)
        return fn(*a, **k)

    inner.forward = redirected
    try:
        return wrapped(*args, **kwargs)
    finally:
        _restore_forward(inner, own_forward)


def _restore_forward(module: nn.Module, own_forward: Callable | None) -> None:
    if own_forward is not None:
        module.forward = own_forward
    else:
        module.__dict__.pop("forward", None)


class BaseDrafterTrainer(Trainer):
    """`transformers.Trainer` for drafters: see the module docstring. Not used directly."""

    # Every loss here is `sum / num_items_in_batch` over the whole accumulation window (× processes when tokens
    # are averaged across devices), so Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True
    config_class = BaseDrafterConfig
    requires_teacher = False
    offline_teacher_replaces_model = True  # False where `teacher_model` still gives parts of the target (EAGLE-3)
    supports_packing = True  # False where a trainer needs one sequence per row (see `BaseDrafterConfig.packing`)
    logits_for_metrics = True  # False where the model's logits need more than a batch's tokens (`compute_metrics`)
    _tag_names: tuple[str, ...] = ("hf-specdec", "speculative-decoding", "draft-model")
    _name = "Drafter"
    _paper: ClassVar[dict[str, str] | None] = None  # {"title", "arxiv"} for the model card

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: BaseDrafterConfig | None = None,
        *,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config=None,
        teacher_metadata: TeacherMetadata | str | None = None,
        model_init=None,
        compute_loss_func=None,
    ):
        """Every drafter trainer takes `(model, teacher_model, args)` (TRL's distillation order), then
        `transformers.Trainer`'s keywords. `compute_metrics` receives the drafter's logits on the eval set (reduce
        them with `preprocess_logits_for_metrics`); `teacher_metadata` (a `TeacherMetadata` or the folder of
        recipes/offline_teacher.py) checks an offline teacher's temperature."""
        if isinstance(teacher_model, TrainingArguments):
            raise TypeError(f"teacher_model got a {type(teacher_model).__name__}: drafter trainers take "
                            "(model, teacher_model, args); pass the config as `args=`.")
        if compute_metrics is not None and not self.logits_for_metrics:
            raise ValueError(f"{type(self).__name__} does not support `compute_metrics`: its model's logits depend on "
                             "inputs a batch does not hold (the target's states). Log what you need from a callback "
                             "(e.g. trainers.SpeculativeDecodingCallback).")
        for name, value in (("model_init", model_init), ("compute_loss_func", compute_loss_func)):
            if value is not None:
                raise ValueError(f"`{name}` is not supported: a drafter trainer builds its model from `model` and "
                                 "computes its own loss (override `compute_loss` to change it).")
        model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        if args is None:
            args = self.config_class(output_dir=f"{(model_id or 'draft').rstrip('/').split('/')[-1]}-{self._name}")
        elif not isinstance(args, BaseDrafterConfig):
            raise TypeError(
                f"{type(self).__name__} needs its own config class ({self.config_class.__name__}), "
                f"got {type(args).__name__}."
            )
        if args.n_gpu > 1:
            raise ValueError(
                "Several GPUs in one process (torch DataParallel) are not supported: start one process per GPU with "
                "`accelerate launch` or `torchrun`."
            )
        if isinstance(model, str) and processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model)
        model = load_causal_lm(model, args.model_init_kwargs, "model")
        # An offline teacher dataset (recipes/offline_teacher.py) replaces the teacher: it is never loaded or run.
        self.offline = offline_teacher_datasets(train_dataset, eval_dataset)
        if self.offline and teacher_model is not None and type(self).offline_teacher_replaces_model:
            raise ValueError(
                "The datasets hold the teacher's stored outputs (an offline teacher dataset), so `teacher_model` would "
                "never run: drop it (or train on plain rows to run the teacher live)."
            )
        if isinstance(teacher_metadata, (str, os.PathLike)):
            teacher_metadata = TeacherMetadata.load(teacher_metadata)
        self.teacher_metadata = teacher_metadata if self.offline else None
        # the stored teacher's vocabulary (its LM head may be padded to another size than the student's)
        self.stored_vocab_size = teacher_metadata.vocab_size if self.teacher_metadata is not None else None
        if teacher_metadata is not None and self.offline and teacher_metadata.temperature != args.temperature:
            raise ValueError(f"The teacher's distributions are stored at temperature {teacher_metadata.temperature}; "
                             f"set args.temperature to it (it is {args.temperature}).")
        teacher = None if self.offline else self._load_frozen(
            teacher_model, args.teacher_model_init_kwargs, "teacher_model", model, processing_class
        )
        if teacher is None and self.requires_teacher and not self.offline:
            raise ValueError(
                f"{type(self).__name__} distils from a teacher: pass `teacher_model=` (a model or a path to one; "
                "its load options go in `args.teacher_model_init_kwargs`), or an offline teacher dataset "
                "(recipes/offline_teacher.py) as `train_dataset`."
            )
        if peft_config is not None:
            model = self._wrap_peft(model, peft_config, args)
        if args.disable_dropout:
            disable_dropout(model)

        self.pad_token_id = self._resolve_pad_token_id(processing_class, model)
        if (args.packing or args.padding_free) and not self.supports_packing:
            raise ValueError(
                f"{type(self).__name__} does not train on packed or padding-free batches (its per-row features "
                "need one row per sequence): set packing=False and padding_free=False."
            )
        if is_iterable_dataset(train_dataset) and getattr(args.accelerator_config, "dispatch_batches", None) is not False:
            # accelerate would otherwise fetch every process's batches on process 0 and concatenate them, which fails
            # when they differ in length: each process reads its own shard of the stream instead
            args = copy.copy(args)
            args.accelerator_config = dataclasses.replace(args.accelerator_config, dispatch_batches=False)
        if (self.offline or args.packing) and args.remove_unused_columns:
            # the teacher columns are read by the loss, and packed rows' position ids keep their rows apart even for a
            # model whose forward does not name them: Trainer must not drop either (tokenized rows hold nothing else)
            args = copy.copy(args)  # the caller's config stays as given
            args.remove_unused_columns = False
        if self.offline and (args.packing or args.padding_free):
            raise ValueError("Offline teacher datasets are collated row by row: set packing=False and "
                             "padding_free=False.")
        if data_collator is None and self.offline:
            data_collator = OfflineTeacherCollator(self.pad_token_id, args.max_length)
        elif data_collator is None:
            data_collator = DraftDataCollator(self.pad_token_id, padding_free=args.packing or args.padding_free)
        with args.main_process_first(desc="tokenizing datasets"):
            train_dataset = self._tokenize(train_dataset, processing_class, args)
            if isinstance(eval_dataset, dict):
                eval_dataset = {name: self._tokenize(ds, processing_class, args) for name, ds in eval_dataset.items()}
            else:
                eval_dataset = self._tokenize(eval_dataset, processing_class, args)

        # Per mode and metric: a float64 tensor [sum, count], kept on the device so logging a metric never syncs.
        self._metric_totals: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        for callback in self.callback_handler.callbacks:  # callbacks that read the trainer (its drafter, target)
            if callable(getattr(callback, "bind", None)) and getattr(callback, "trainer", False) is None:
                callback.bind(self)
        self.divergence_fn = get_divergence(args.divergence, args.beta)
        self.teacher_model = self.prepare_frozen_model(teacher) if teacher is not None else None
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(self._tag_names))

    # ----- construction helpers -----------------------------------------------------------------------------------

    def _load_frozen(self, model_or_path, init_kwargs, role: str, student: nn.Module, tokenizer) -> nn.Module | None:
        if model_or_path is None:
            if init_kwargs:
                raise ValueError(f"`{role}_init_kwargs` were given but no `{role}` to load them for.")
            return None
        if isinstance(model_or_path, str):
            check_same_tokenizer(tokenizer, model_or_path, role)
        frozen = load_causal_lm(model_or_path, init_kwargs, role)
        check_shared_vocabulary(student, frozen, tokenizer, role)
        return frozen

    @staticmethod
    def _wrap_peft(model: nn.Module, peft_config, args: BaseDrafterConfig) -> nn.Module:
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            raise TypeError("The model is already a PeftModel; pass it without `peft_config` to keep training it.")
        if args.gradient_checkpointing:
            # Frozen embeddings give checkpointed blocks inputs without grad; LoRA weights inside would get none.
            model.enable_input_require_grads()
        return get_peft_model(model, peft_config)

    @staticmethod
    def _resolve_pad_token_id(tokenizer, model: nn.Module) -> int:
        candidates = []
        if tokenizer is not None:
            candidates += [tokenizer.pad_token_id, tokenizer.eos_token_id]
        config = getattr(model, "config", None)
        candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
        for candidate in candidates:
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0  # padding is masked out of attention and labels, so any id works

    @staticmethod
    def _tokenize(dataset, tokenizer, args: BaseDrafterConfig):
        if dataset is None:
            return None
        if is_offline_teacher(getattr(dataset, "column_names", None)):
            # stored rows are tokenized already, and rewriting them would copy every stored value: rows with nothing
            # to train are dropped through an index over `labels`, rows are cut by the collator, and read as arrays
            def trained(labels):
                return has_trained_token({"labels": labels})

            if is_iterable_dataset(dataset):  # a stream: filtered lazily, row by row
                return dataset.filter(trained, input_columns="labels").with_format("numpy")
            return dataset.filter(trained, input_columns="labels", num_proc=args.dataset_num_proc,
                                  desc="Dropping rows with no trained token").with_format("numpy")
        return prepare_dataset(dataset, tokenizer, args.max_length, num_proc=args.dataset_num_proc,
                               packing=args.packing)

    def prepare_frozen_model(self, model: nn.Module) -> nn.Module:
        """Place a frozen model (teacher, reference) for the current backend: sharded under ZeRO-3 and FSDP, a
        plain copy on this device otherwise — never wrapped in DDP, which would all-reduce gradients it has none of."""
        model.eval()
        model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled and getattr(self.accelerator, "is_fsdp2", False):
            return self._fully_shard_frozen(model)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _fully_shard_frozen(self, model: nn.Module) -> nn.Module:
        """FSDP2: shard a frozen model the way accelerate shards the drafter — one unit per decoder layer, the
        embeddings, final norm + LM head, then the root, with the plugin's reshard / offload / mixed-precision settings
        (and rank 0's weights broadcast under `cpu_ram_efficient_loading`). `trl.models.prepare_fsdp` shards only the
        root, so every forward would gather the whole teacher on every device at once.

        The plugin's layer classes were resolved on the drafter; a frozen model keeps those it has, else gets its own
        (`_no_split_modules`), so a teacher of another architecture is still wrapped per layer."""
        import copy
        import functools

        from accelerate.utils import fsdp2_prepare_model
        from accelerate.utils.dataclasses import get_module_class_from_name

        state = self.accelerator.state
        plugin = state.fsdp_plugin
        frozen_plugin = copy.copy(plugin)
        policy = plugin.auto_wrap_policy
        frozen_plugin.auto_wrap_policy = policy.func if isinstance(policy, functools.partial) else policy
        names = [n for n in plugin.transformer_cls_names_to_wrap or [] if get_module_class_from_name(model, n)]
        frozen_plugin.transformer_cls_names_to_wrap = names or None
        state.fsdp_plugin = frozen_plugin  # read by fsdp2_prepare_model; the drafter's plugin is left as it was
        try:
            model = fsdp2_prepare_model(self.accelerator, model)
        finally:
            state.fsdp_plugin = plugin
        model.requires_grad_(False)
        return model.eval()

    # ----- forward helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a model's forward reads of a batch: `input_ids`, and `attention_mask` / `position_ids` when the
        batch has them (a padding-free batch has position ids that restart per row and no attention mask)."""
        return {key: inputs[key] for key in MODEL_INPUT_KEYS if inputs.get(key) is not None}

    @torch.no_grad()
    def frozen_forward(self, frozen_model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor | None,
                       output_hidden_states: bool = False) -> tuple[LiveTeacher, tuple[torch.Tensor, ...] | None]:
        """One forward of a frozen model (teacher, reference): its next-token distribution at the trained
        `positions` [B, T-1] as a `LiveTeacher` (hidden states projected chunk by chunk where the model's head can
        run outside its forward; logits in the model's dtype where it is sharded or unchunkable; `positions=None`:
        every position, `[B, T, ...]`) and, when asked, all its `hidden_states` [B, T, H] (what guided drafters and
        EAGLE-3 heads read)."""
        frozen_model.eval()  # re-asserted: callbacks or user code may have flipped it
        with self.accelerator.autocast():  # the mixed precision accelerate's wrapped forward would have used
            return self._frozen_forward(frozen_model, inputs, positions, output_hidden_states)

    def _frozen_forward(self, frozen_model, inputs, positions, output_hidden_states):
        inner = self.accelerator.unwrap_model(frozen_model)
        model_inputs = self.model_inputs(inputs)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # the head is gathered inside forward only
        chunked = self.args.loss_chunk_size > 0 and not sharded and verify_lm_head_path(inner, model_inputs)
        if chunked:
            outputs = base_model(inner).get_decoder()(**model_inputs, use_cache=False,
                                                       output_hidden_states=output_hidden_states)
            hidden = outputs.last_hidden_state
            hidden = hidden if positions is None else hidden[:, :-1][positions]
            teacher = LiveTeacher(hidden=hidden, project=functools.partial(lm_head_logits, inner))
            return teacher, outputs.hidden_states if output_hidden_states else None

        def logits_at_positions(**kwargs):  # inside the wrapper's forward: the sharded head is gathered there
            outputs = type(inner).forward(inner, **kwargs, use_cache=False, output_hidden_states=output_hidden_states)
            logits = outputs.logits if positions is None else outputs.logits[:, :-1][positions]
            return logits, outputs.hidden_states

        logits, hidden_states = call_inside_forward(frozen_model, inner, logits_at_positions, **model_inputs)
        return LiveTeacher(logits=logits), hidden_states if output_hidden_states else None

    def student_token_values(self, model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
                             token_values, **forward_kwargs) -> dict[str, torch.Tensor]:
        """Per-token values `[N]` of the student at the trained `positions`: `token_values(logits, rows)` is called
        on its logits chunk by chunk (`chunked_token_values`: at most one chunk of logits lives at a time), inside
        the wrapper's forward (FSDP gathers there; DDP tracks it). `forward_kwargs` go to the model's forward."""
        inner = self.accelerator.unwrap_model(model)
        model_inputs = self.model_inputs(inputs)
        chunk_size = self.args.loss_chunk_size

        def run(**kwargs):
            with self.accelerator.autocast():  # what accelerate's wrapped forward would have entered
                if chunk_size and verify_lm_head_path(inner, kwargs):
                    hidden = final_hidden_states(inner, kwargs)[:, :-1][positions]
                    return chunked_token_values(lambda h, rows: token_values(lm_head_logits(inner, h), rows),
                                                hidden, chunk_size)
                outputs = type(inner).forward(inner, **kwargs, use_cache=False)
                return token_values(outputs.logits[:, :-1][positions], slice(None))

        return call_inside_forward(model, inner, run, **model_inputs, **forward_kwargs)

    def live_or_stored_teacher(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor,
                               output_hidden_states: bool = False):
        """The teacher at the trained positions: the stored one of an offline teacher batch, or one forward of
        `teacher_model` (and its hidden states, when asked; an offline batch gives None)."""
        if self.offline:
            return StoredTeacher.from_batch(inputs, positions, self.args.temperature, self.stored_vocab_size), None
        return self.frozen_forward(self.teacher_model, inputs, positions, output_hidden_states)

    def distillation_token_values(self, student_logits: torch.Tensor, teacher, divergence_fn=None
                                  ) -> dict[str, torch.Tensor]:
        """One chunk of distillation: the per-token `loss` (the divergence of the student's logits from the teacher
        at the same tokens) and its metrics — `divergence`, `expected_acceptance`, `top1_agreement` — which are
        skipped while backward recomputes the chunk."""
        teacher = teacher.materialized()  # a live teacher's chunk is projected once, read three times
        divergence = teacher.divergence(divergence_fn or self.divergence_fn, student_logits, self.args.temperature)
        values = {"loss": divergence}
        if not in_backward():
            with torch.no_grad():
                values["divergence"] = divergence.detach()
                values["expected_acceptance"] = teacher.acceptance(student_logits)
                values["top1_agreement"] = (student_logits.argmax(-1) == teacher.argmax()).float()
        return values

    def record_token_values(self, values: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Record every per-token metric of `values` (everything but the differentiated `loss`)."""
        for name, value in values.items():
            if name != "loss" and value.numel():
                self.record_metric(prefix + name, value)

    @staticmethod
    def trained_targets(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(positions, target_ids)`: the bool `(B, T-1)` mask of logits that are trained and the ids they predict."""
        positions = supervised_positions(inputs["labels"])
        return positions, inputs["labels"][:, 1:][positions]

    def loss_scale(self) -> int:
        """Processes to multiply by when `num_items_in_batch` is a global count (see `losses.normalize_token_loss`)."""
        return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

    # ----- the accumulation window and its token count -----------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """Collect the micro-batches of one optimizer step, let the trainer rewrite them (`prepare_window`), then
        count the tokens that count — after the rewrite, so the normaliser matches what the loss sums."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches:
            batches = self.prepare_window(batches)
        return batches, self._get_num_items_in_batch(batches, device)

    def prepare_window(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Hook: rewrite the micro-batches of one optimizer step before their tokens are counted."""
        return batches

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hook: how many tokens of this micro-batch the loss sums over."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples:
            return None
        count = sum(self.count_loss_tokens(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # ----- evaluation: the loss and the logged metrics, no logits gathered ---------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss; and, for `compute_metrics`, the drafter's logits `[B, T, V]` and the labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only or self.compute_metrics is None:
                return loss.detach(), None, None
            logits = model(**self.model_inputs(inputs), use_cache=False).logits
        return loss.detach(), logits, inputs["labels"]

    # ----- token-weighted metrics, reduced over processes when logged --------------------------------------------

    def record_metric(self, name: str, values: torch.Tensor, mode: str | None = None) -> None:
        """Accumulate per-token (or per-item) values; `log` reports their mean over everything since the last log,
        over all processes."""
        mode = mode or ("train" if self.model.training else "eval")
        values = values.detach().to(torch.float32 if values.device.type == "mps" else torch.float64)  # no fp64 on MPS
        total = torch.stack([values.sum(), values.new_tensor(values.numel())])
        totals = self._metric_totals[mode]
        totals[name] = totals[name] + total if name in totals else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_loss_key = next((k for k in logs if k.endswith("loss") and k.startswith(("eval", "test"))), None)
        mode, prefix = ("eval", eval_loss_key[: -len("loss")]) if eval_loss_key else ("train", "")
        recorded = self._metric_totals[mode]
        if recorded:
            names = sorted(recorded)  # the same order on every process: the reduction pairs them up
            totals = torch.stack([recorded[name].to(self.args.device) for name in names])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            for name, (total, count) in zip(names, totals.tolist()):
                logs[prefix + name] = total / max(count, 1.0)
            recorded.clear()
        super().log(logs, start_time)

    # ----- saving: model card + tags ------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.write_model_card(output_dir or self.args.output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Called by `push_to_hub`: the card goes to `args.output_dir`."""
        if self.is_world_process_zero():
            self.write_model_card(self.args.output_dir, model_name=model_name, dataset_name=dataset_name)

    def model_card_summary(self) -> dict[str, Any]:
        """Hook: the training settings worth stating in the model card."""
        return {"divergence": self.args.divergence, "temperature": self.args.temperature}

    def write_model_card(self, output_dir: str, model_name: str | None = None, dataset_name: str | None = None):
        from .model_card import render_model_card

        os.makedirs(output_dir, exist_ok=True)
        card = render_model_card(self, model_name=model_name, dataset_name=dataset_name)
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
