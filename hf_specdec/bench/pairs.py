"""What the suite runs on: a target, its tokenizer and named drafters.

Offline the default is the synthetic pair of `hf_specdec.testing` (one per agreement rate, byte tokens); `lab`
points at a `recipes/lab.py` output (`target/`, `drafters/<name>/`); otherwise `target` and each drafter are Hub
names or local folders loaded with `from_pretrained` (a drafter's kind — model, sorted, guided, eagle3 — is read from
its config by `load_drafter`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import testing
from ..drafters import ModelDrafter, TreeConfig, drafter_kind, load_drafter, load_drafter_model
from .measure import DTYPES


@dataclass
class DrafterSpec:
    """A named drafter: its model is loaded once, a fresh `Drafter` is made for every generate() call."""

    name: str
    kind: str  # "model", "sorted", "guided" or "eagle3"
    model: torch.nn.Module
    path: str | None = None

    def make(self, num_draft_tokens: int, tree: TreeConfig | None = None, schedule: str = "constant"):
        if self.path is None:  # an in-memory draft model (the synthetic pair's)
            return ModelDrafter(self.model, num_draft_tokens=num_draft_tokens, tree=tree, schedule=schedule)
        return load_drafter(self.path, num_draft_tokens=num_draft_tokens, tree=tree, model=self.model,
                            schedule=schedule)


@dataclass
class Pair:
    description: dict
    target: torch.nn.Module
    tokenizer: object
    drafters: list[DrafterSpec] = field(default_factory=list)

    @property
    def pad_token_id(self) -> int:
        for source in (self.tokenizer, self.target.generation_config):
            if getattr(source, "pad_token_id", None) is not None:
                return source.pad_token_id
        eos = self.target.generation_config.eos_token_id
        return (eos[0] if isinstance(eos, list) else eos) if eos is not None else testing.PAD_TOKEN_ID


def iterate_pairs(config) -> Iterator[Pair]:
    """Yield the pairs a `SuiteConfig` asks for, loading one at a time (big models leave memory in between)."""
    if config.target is None:
        for agreement in config.agreements:
            target, draft = testing.build_synthetic_pair(agreement, seed=config.seed, dtype=DTYPES[config.dtype],
                                                         device=config.device, **config.pair_shape)
            description = dict(pair="synthetic", agreement=agreement,
                               residual_scale=target.synthetic_pair_info["residual_scale"])
            yield Pair(description, target, testing.SyntheticTokenizer(target.config.vocab_size),
                       [DrafterSpec("draft", "model", draft)])
            del target, draft
        return
    target = _load_model(config.target, config)
    drafters = [_load_drafter_spec(name, path, config) for name, path in config.drafters.items()]
    description = dict(pair=f"{config.target} + {', '.join(config.drafters)}")
    yield Pair(description, target, _load_tokenizer(config.target, target), drafters)


def _load_model(name_or_path: str, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[config.dtype])
    return model.to(config.device).eval()


def _load_drafter_spec(name: str, name_or_path: str, config) -> DrafterSpec:
    kind = drafter_kind(name_or_path)
    model = load_drafter_model(name_or_path, kind, dtype=DTYPES[config.dtype]).to(config.device)
    return DrafterSpec(name, kind, model, name_or_path)


def _load_tokenizer(name_or_path: str, target):
    """The target's tokenizer; a target saved without one (a bare checkpoint) gets byte tokens."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        if target.config.vocab_size < testing.FIRST_ORDINARY_TOKEN_ID + 256:
            raise ValueError(f"{name_or_path} has no tokenizer and its vocabulary is too small for byte tokens; "
                             "save a tokenizer next to the model.") from None
        return testing.SyntheticTokenizer(target.config.vocab_size)
