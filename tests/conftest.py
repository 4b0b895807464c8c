"""Tiny models built from configs (never downloaded) and left-padded prompt batches."""

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hf_specdec  # noqa: F401  (installs the generate() hook)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models are dominated by threading overhead: on a shared 2-core machine two intra-op threads made a
    forward + backward ~100x slower than one. Restored afterwards so other tests keep their setting. Use it with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(arch="llama", vocab_size=96, num_layers=2, seed=0, hidden_size=32, dtype=torch.float32, **overrides):
    config_class, model_class = ARCHITECTURES[arch]
    settings = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "qwen3":
        settings["head_dim"] = hidden_size // 4
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).eval().to(dtype)
    with torch.no_grad():  # peakier outputs than the default init, so greedy text is not one repeated token
        model.lm_head.weight.mul_(8.0)
    return model


def perturbed_copy(model, noise=0.02, seed=1):
    """A draft that agrees with `model` often but not always."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * parameter.std().clamp(min=1e-3))
    return draft


def left_padded_batch(vocab_size, lengths, seed=0, pad_token_id=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class RecordingStreamer:
    """A streamer that keeps every chunk it is given (the first one is the prompt)."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True

    def tokens(self):
        """Every streamed token after the prompt."""
        return [token for chunk in self.chunks[1:] for token in chunk]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run far faster on one thread than fighting over two cores (and timings are never asserted)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def llama_pair():
    target = tiny_model("llama", num_layers=2, seed=0)
    return target, perturbed_copy(target, noise=0.1)


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=200, help="number of differential fuzz cases (tests/test_fuzz.py)")
    parser.addoption("--fuzz-start", type=int, default=0, help="first fuzz case number")


class SplitRouter:
    """A stand-in for a trained DrafterRouter: rows whose pooled prompt feature 0 is above the batch median go to
    the second drafter, the others to the first (so a batch mixes drafters)."""

    def __init__(self, names=("a", "b"), feature_layer=1):
        from types import SimpleNamespace

        self.config = SimpleNamespace(drafter_names=list(names), feature_layer=feature_layer)

    def predict(self, features):
        high = (features[:, 0] > features[:, 0].median()).float()
        return torch.stack([3.0 - high, 2.0 + high], dim=1)


def rotating_routed_drafter(drafters, include_no_draft=True):
    """A RoutedDrafter whose rows move to the next drafter (and through "no drafting") every round: switching as
    often as possible, to test that every drafter's cache stays in step and the output stays exact."""
    from hf_specdec import OnlinePolicy, RoutedDrafter

    class Rotating(RoutedDrafter):
        def _reconsider(self):
            arms = len(self.drafters) + (1 if include_no_draft else 0)
            self._assign((self.assignment + 1) % arms, self.row_counts.device)

    return Rotating(drafters, policy=OnlinePolicy(check_every=1))


def siblings_verified_against_q(sibling_distributions):
    """Negative control for sampled trees: later siblings drawn from the sharpened q (`sibling_temperature`) but
    verified against q itself, not the distribution they were drawn from."""
    def biased(self, chosen, top_k):
        self.sibling_temperature, drawn_at = 1.0, self.sibling_temperature
        try:
            return sibling_distributions(self, chosen, top_k)
        finally:
            self.sibling_temperature = drawn_at
    return biased
