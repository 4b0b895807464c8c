"""The hook on `generate()`: hf_specdec drafters given as `assistant_model` run the speculative engine.

After `import hf_specdec`, `model.generate(..., assistant_model=<hf_specdec Drafter>)` runs our engine through
transformers' official `custom_generate` door; every other call (a plain transformers `assistant_model`
included) goes to transformers' own `generate()` untouched, positional arguments and all. transformers forwards
to a callable `custom_generate` only its own extra parameters, so the hook hands over what it would drop:
`streamer` (as `stream_to`), the `tokenizer` of `stop_strings` (as a ready `StopStringCriteria`), and refuses
`synced_gpus` / `assistant_tokenizer`, which the engine does not implement. The transformers internals this
relies on are listed in `compat.py`.
"""

from __future__ import annotations

import functools
import inspect

from transformers import StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerationMixin

from .compat import check_transformers_version
from .drafters.base import Drafter
from .engine import speculative_generate

_original_generate = getattr(GenerationMixin.generate, "__hf_specdec_original__", GenerationMixin.generate)
_GENERATE_SIGNATURE = inspect.signature(_original_generate)


@functools.wraps(_original_generate)
def generate(self, *args, **kwargs):
    bound = _GENERATE_SIGNATURE.bind(self, *args, **kwargs)
    named = {name: value for name, value in bound.arguments.items() if name not in ("self", "kwargs")}
    extra = dict(bound.arguments.get("kwargs", {}))
    drafter = _as_drafter(named.get("assistant_model"))
    if isinstance(drafter, Drafter):
        extra["drafter"] = drafter
    elif named.get("custom_generate") is not speculative_generate:
        return _original_generate(self, *args, **kwargs)
    named.pop("assistant_model", None)
    _refuse_dropped_arguments(named, extra)
    _stop_strings_as_criteria(self, named, extra)
    extra.setdefault("num_draft_tokens", _requested_draft_length(self, named, extra))
    extra["stream_to"] = named.pop("streamer", None)
    named["custom_generate"] = speculative_generate
    return _original_generate(self, **named, **extra)


generate.__hf_specdec_original__ = _original_generate


def _refuse_dropped_arguments(named: dict, extra: dict) -> None:
    if named.get("synced_gpus"):
        raise ValueError("synced_gpus (ZeRO-3 / FSDP generation across processes) is not supported with an "
                         "hf_specdec drafter: rows would advance by different amounts on each process. Gather the "
                         "target on each process, or generate without a drafter.")
    if extra.get("assistant_tokenizer") is not None:
        raise ValueError("hf_specdec drafters share the target's tokenizer; drop `assistant_tokenizer` (for a "
                         "drafter with another tokenizer use transformers' own `assistant_model=<model>` with "
                         "`tokenizer=` and `assistant_tokenizer=`).")


def _stop_strings_as_criteria(model, named: dict, extra: dict) -> None:
    """transformers drops `tokenizer` on its way to a callable custom_generate, then cannot build the stop-string
    criterion; build it here and take `stop_strings` out of the options."""
    tokenizer = extra.get("tokenizer")
    config = named.get("generation_config") or model.generation_config
    stop_strings = extra.get("stop_strings", getattr(config, "stop_strings", None))
    if not stop_strings or tokenizer is None:
        return  # without a tokenizer, transformers raises its own clear error
    criteria = StoppingCriteriaList(named.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    named["stopping_criteria"] = criteria
    extra["stop_strings"] = None


def _as_drafter(assistant_model):
    """Models that know how to draft for hf_specdec (e.g. `GuidedDrafter`) expose `as_drafter()`; the adapter is
    kept on the model so `last_stats` and the draft-length schedule persist across calls, like transformers'."""
    if assistant_model is None or isinstance(assistant_model, Drafter) or not hasattr(assistant_model, "as_drafter"):
        return assistant_model
    if getattr(assistant_model, "_hf_specdec_drafter", None) is None:
        assistant_model._hf_specdec_drafter = assistant_model.as_drafter()
    return assistant_model._hf_specdec_drafter


def _requested_draft_length(model, named: dict, extra: dict) -> int | None:
    """`num_assistant_tokens` as the user set it (generate kwarg, generation_config, or the model's config).

    transformers fills an unset value with its assisted-generation default before the loop runs, so the engine
    could not tell a user's choice from that default; we read it here, before generate() does.
    """
    if extra.get("num_assistant_tokens") is not None:
        return extra["num_assistant_tokens"]
    for config in (named.get("generation_config"), getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "num_assistant_tokens", None) is not None:
            return config.num_assistant_tokens
    return None


def install() -> None:
    """Route hf_specdec drafters given to `generate()` to the speculative engine (idempotent)."""
    check_transformers_version()
    GenerationMixin.generate = generate


def uninstall() -> None:
    GenerationMixin.generate = _original_generate
