"""Every dependency of hf_specdec on transformers beyond its stable public API, in one place.

Capabilities are detected, not read off version strings, wherever that is possible:

- the cache argument's name: `past_key_values` until 5.23, `cache` from 5.24 (the old name is a deprecated alias
  until 5.40), read off the signature of the module that is called;
- `GenerationConfig._get_default_generation_params()` (private, 5.20-5.25): the values generate() fills in for
  unset options, so an option counts as set when it differs from them;
- `GenerationConfig.get_generation_mode()`: the decoding method plain generate() would use;
- a callable `custom_generate` receives only its own extra parameters: transformers drops `tokenizer`,
  `assistant_tokenizer`, `streamer` and `synced_gpus` for it (see `integration.py`, which hands them over);
- `DynamicCache` layers expose `keys` / `values` tensors `[B, H, S, D]` and `is_initialized` (`cache.py` edits
  them in place); a custom 4D float attention mask passes through `masking_utils` untouched;
- `output_hidden_states` accepts a list of `hidden_states` indices (5.23+; 5.20's selection is shifted by one
  layer, so there all states are requested), which guided drafters use to capture a few target states only;
- `is_activation_checkpointing` (5.23+) was `is_gradient_checkpointing` before;
- logits processors are applied by the rules in `processors.PROCESSOR_RULES`, one per transformers class.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import transformers
from packaging.version import Version
from transformers import GenerationConfig

# The transformers releases the test suite proves (CI runs the oldest and the newest).
OLDEST_TESTED = Version("5.20.0")
NEWEST_TESTED = Version("5.25.0")

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_argument_of(function) -> str:
    parameters = inspect.signature(function).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(module) -> str:
    """The keyword under which `module.forward` takes its KV cache."""
    return _cache_argument_of(type(module).forward)


def passed_cache(model_kwargs: dict):
    """The cache generate() prepared (or the user passed), under whichever name this transformers uses."""
    for name in CACHE_ARGUMENT_NAMES:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


@functools.lru_cache(maxsize=1)
def default_generation_params() -> dict:
    return dict(GenerationConfig._get_default_generation_params())


def option_is_set(config: GenerationConfig, name: str) -> bool:
    """Whether a generation option holds something other than what generate() fills in when it is unset."""
    value = getattr(config, name, None)
    return value is not None and value != default_generation_params().get(name)


def plain_generation_mode(config: GenerationConfig) -> str:
    """The decoding method plain generate() would run for this config (e.g. "greedy_search", "sample")."""
    return config.get_generation_mode().value


def hidden_states_request(layers) -> dict:
    """Model kwargs that make `outputs.hidden_states[i]` hold the states at `hidden_states` index i for each i in
    `layers` (other entries may be None)."""
    from transformers.utils import output_capturing

    selective = hasattr(output_capturing, "resolve_hidden_states_indices")  # marks the fixed index semantics
    return {"output_hidden_states": list(layers) if selective else True}


def activation_checkpointing(model) -> bool:
    enabled = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if enabled is None else enabled)


def check_transformers_version() -> None:
    """Refuse releases older than the oldest tested; run on newer ones, with one warning."""
    version = Version(transformers.__version__)
    if version < OLDEST_TESTED:
        raise ImportError(f"hf_specdec needs transformers >= {OLDEST_TESTED}; found {transformers.__version__}. "
                          f'Upgrade with `pip install "transformers>={OLDEST_TESTED}"`.')
    if Version(version.base_version) > NEWEST_TESTED and (version.major, version.minor) != (
            NEWEST_TESTED.major, NEWEST_TESTED.minor):
        warnings.warn(f"hf_specdec is tested with transformers {OLDEST_TESTED}-{NEWEST_TESTED}; found "
                      f"{transformers.__version__}. It runs, but check the output against plain generate() once.",
                      stacklevel=3)
