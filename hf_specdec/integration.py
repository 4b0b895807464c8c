"""The one module that touches transformers internals: a small, version-guarded hook on `generate()`.

After `import hf_specdec`, `model.generate(..., assistant_model=<hf_specdec Drafter>)` runs our engine through
transformers' official `custom_generate` door; any other `assistant_model` (a plain transformers model) keeps
transformers' own assisted generation. transformers does not forward `streamer` to `custom_generate` callables,
so the hook hands it over under a name of our own (and the engine streams the prompt itself).
"""

from __future__ import annotations

import functools
import inspect

import transformers
from packaging.version import Version
from transformers.generation.utils import GenerationMixin

from .drafters.base import Drafter
from .engine import speculative_generate

SUPPORTED_TRANSFORMERS = (Version("5.20.0"), Version("5.24.0"))  # [min, max)
_REQUIRED_GENERATE_PARAMETERS = ("assistant_model", "streamer", "custom_generate")


def check_transformers_version() -> None:
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    parameters = inspect.signature(_original_generate).parameters
    missing = [name for name in _REQUIRED_GENERATE_PARAMETERS if name not in parameters]
    if not low <= version < high or missing:
        raise ImportError(
            f"hf_specdec supports transformers >= {low}, < {high}; found {transformers.__version__}. "
            f'Install a supported version, e.g. `pip install "transformers>={low},<{high}"`.'
        )


_original_generate = getattr(GenerationMixin.generate, "__hf_specdec_original__", GenerationMixin.generate)


@functools.wraps(_original_generate)
def generate(self, *args, assistant_model=None, streamer=None, custom_generate=None, **kwargs):
    assistant_model = _as_drafter(assistant_model)
    if isinstance(assistant_model, Drafter):
        kwargs["drafter"] = assistant_model
        custom_generate = speculative_generate
    if custom_generate is speculative_generate:
        kwargs.setdefault("num_draft_tokens", _requested_draft_length(self, kwargs))
        return _original_generate(self, *args, custom_generate=speculative_generate, stream_to=streamer, **kwargs)
    return _original_generate(self, *args, assistant_model=assistant_model, streamer=streamer,
                              custom_generate=custom_generate, **kwargs)


generate.__hf_specdec_original__ = _original_generate


def _as_drafter(assistant_model):
    """Models that know how to draft for hf_specdec (e.g. `GuidedDrafter`) expose `as_drafter()`; the adapter is
    kept on the model so `last_stats` and the draft-length schedule persist across calls, like transformers'."""
    if assistant_model is None or isinstance(assistant_model, Drafter) or not hasattr(assistant_model, "as_drafter"):
        return assistant_model
    if getattr(assistant_model, "_hf_specdec_drafter", None) is None:
        assistant_model._hf_specdec_drafter = assistant_model.as_drafter()
    return assistant_model._hf_specdec_drafter


def _requested_draft_length(model, kwargs) -> int | None:
    """`num_assistant_tokens` as the user set it (generate kwarg, generation_config, or the model's config).

    transformers fills an unset value with its assisted-generation default before the loop runs, so the engine
    could not tell a user's choice from that default; we read it here, before generate() does.
    """
    if kwargs.get("num_assistant_tokens") is not None:
        return kwargs["num_assistant_tokens"]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "num_assistant_tokens", None) is not None:
            return config.num_assistant_tokens
    return None


def install() -> None:
    """Route hf_specdec drafters given to `generate()` to the speculative engine (idempotent)."""
    check_transformers_version()
    GenerationMixin.generate = generate


def uninstall() -> None:
    GenerationMixin.generate = _original_generate
