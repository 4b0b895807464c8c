"""Differential fuzz test: random generate() calls with a drafter against plain generate().

Each case is drawn from its number alone (architecture, drafter kind, chain or tree, batch and uneven left
padding, num_return_sequences, EOS sets, lengths, stop strings, processor combinations, greedy or sampling):

- greedy: the output must equal plain greedy token for token;
- sampling: the speculative output must be a sample plain sampling could produce, scored exactly as plain
  scores it — every returned score equals the target's processed scores for that same prefix (one teacher-forced
  forward, the processor list generate() builds), and every token lies in its position's support.

`pytest tests/test_fuzz.py` runs 200 cases; `--fuzz-cases 5000` (and `--fuzz-start N`) run more. A failure
prints the one-line command that reruns just that case.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import SplitRouter, perturbed_copy, rotating_routed_drafter, tiny_model
from transformers import LogitsProcessor, LogitsProcessorList

from hf_specdec import Eagle3DraftModel, GuidedDrafter, ModelDrafter, NGramDrafter, RoutedDrafter, SortedDrafter, TreeConfig
from hf_specdec.testing import character_tokenizer, tiny_causal_lm

VOCAB = 96
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
LLAMA_STYLE = ("llama", "qwen2", "qwen3", "mistral")  # sorted and guided drafters need their decoder layout


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        start, count = metafunc.config.getoption("fuzz_start"), metafunc.config.getoption("fuzz_cases")
        metafunc.parametrize("case", range(start, start + count))


_MODELS: dict[str, tuple] = {}


def models(arch):
    """Target (3 layers) and a perturbed draft, built once per architecture."""
    if arch not in _MODELS:
        if arch == "gpt2":
            target = tiny_causal_lm("gpt2", vocab_size=VOCAB, num_layers=3, hidden_size=32, seed=5)
            with torch.no_grad():
                target.lm_head.weight.mul_(1.0)  # tied to the embeddings: already peaked enough
        else:
            target = tiny_model(arch, vocab_size=VOCAB, num_layers=3, seed=5)
        _MODELS[arch] = (target, perturbed_copy(target, noise=0.15, seed=7))
    return _MODELS[arch]


class BanRowToken(LogitsProcessor):
    """A user's processor reading the row's batch position and its prefix."""

    def __call__(self, input_ids, scores):
        rows = torch.arange(input_ids.shape[0])
        scores = scores.clone()
        scores[rows, 20 + (rows * 7 + input_ids[:, -1]) % 50] -= 5.0
        return scores


def allowed_by_row(batch_id, prefix):
    return list(range(3, 60)) if batch_id % 2 == 0 else list(range(30, 96))


class Case:
    """Everything about one fuzz case, drawn from its number."""

    def __init__(self, number: int):
        draw = random.Random(number)
        self.number = number
        self.arch = draw.choice(ARCHS)
        self.kind = draw.choice(("model", "ngram", "sorted", "guided", "routed", "eagle3") if self.arch in LLAMA_STYLE
                                else ("model", "ngram", "routed", "eagle3"))
        self.routing = draw.choice(("router", "rotating"))
        depth = draw.randint(1, 4)
        self.tree = TreeConfig(depth, top_k=2, max_nodes=draw.randint(1, min(6, 2 + (depth - 1) * 4))) \
            if draw.random() < 0.4 else None
        self.num_draft_tokens = draw.randint(1, 6)
        self.lengths = [draw.randint(1, 9) for _ in range(draw.randint(1, 4))]
        self.do_sample = draw.random() < 0.35
        options = dict(max_new_tokens=draw.randint(1, 18), do_sample=self.do_sample, pad_token_id=0)
        if self.do_sample and draw.random() < 0.5:
            options["num_return_sequences"] = 2
        self.eos_picks = draw.choice([0, 0, 1, 2, 3])  # EOS ids taken from a free run's output
        self.eos_positions = [draw.randint(0, 12) for _ in range(self.eos_picks)]
        if draw.random() < 0.3:
            options["min_new_tokens"] = draw.randint(1, options["max_new_tokens"])
        self.stop_string_position = draw.randint(0, 10) if draw.random() < 0.15 else None
        options.update(self._processors(draw))
        self.options = options

    def _processors(self, draw) -> dict:
        choices = {
            "repetition_penalty": lambda: round(draw.uniform(1.1, 1.8), 2),
            "no_repeat_ngram_size": lambda: draw.randint(2, 3),
            "bad_words_ids": lambda: [[draw.randint(3, 95)], [draw.randint(3, 95), draw.randint(3, 95)]],
            "suppress_tokens": lambda: [draw.randint(3, 95)],
            "begin_suppress_tokens": lambda: [draw.randint(3, 95)],
            "sequence_bias": lambda: {(draw.randint(3, 95),): -3.0, (draw.randint(3, 95), draw.randint(3, 95)): 4.0},
            "exponential_decay_length_penalty": lambda: (draw.randint(1, 6), 1.4),
            "renormalize_logits": lambda: True,
            "prefix_allowed_tokens_fn": lambda: allowed_by_row,
            "logits_processor": lambda: LogitsProcessorList([BanRowToken()]),
        }
        if self.do_sample:
            choices.update({
                "temperature": lambda: round(draw.uniform(0.5, 1.5), 2),
                "top_k": lambda: draw.randint(2, 20),
                "top_p": lambda: round(draw.uniform(0.5, 0.95), 2),
                "min_p": lambda: round(draw.uniform(0.02, 0.2), 2),
                "typical_p": lambda: round(draw.uniform(0.5, 0.95), 2),
                "epsilon_cutoff": lambda: 3e-4,
            })
        names = draw.sample(sorted(choices), k=draw.randint(0, 3))
        return {name: choices[name]() for name in names}

    def drafter(self, target, draft):
        if self.kind == "routed":  # a model drafter and n-gram lookup, rows split by a router or rotating each round
            arms = {"a": ModelDrafter(draft, num_draft_tokens=self.num_draft_tokens, tree=self.tree),
                    "b": NGramDrafter(max_ngram=2, num_draft_tokens=self.num_draft_tokens)}
            return RoutedDrafter(arms, router=SplitRouter()) if self.routing == "router" else \
                rotating_routed_drafter(arms)
        if self.kind == "ngram":
            if self.tree is not None:
                return NGramDrafter(max_ngram=2, tree=TreeConfig(self.tree.depth, 2, self.tree.max_nodes))
            return NGramDrafter(max_ngram=2, num_draft_tokens=self.num_draft_tokens)
        if self.kind == "sorted":
            return SortedDrafter(draft, exits=[1, 3], thresholds=[0.4], num_draft_tokens=self.num_draft_tokens,
                                 tree=self.tree)
        if self.kind == "guided":
            guided = GuidedDrafter.from_drafter(draft, target_config=target.config, verifier_layers=[1, 3])
            with torch.no_grad():
                guided.guide.projection.weight.normal_(generator=torch.Generator().manual_seed(self.number))
            return guided.eval().as_drafter(num_draft_tokens=self.num_draft_tokens, tree=self.tree)
        if self.kind == "eagle3":  # a random head over most of the vocabulary, reading target states 1..3
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.number)
                head = Eagle3DraftModel.from_target(target.config, draft_vocab=torch.arange(0, VOCAB - 5),
                                                    aux_hidden_state_layer_ids=[1, 2, 3])
            return head.eval().as_drafter(num_draft_tokens=self.num_draft_tokens, tree=self.tree)
        return ModelDrafter(draft, num_draft_tokens=self.num_draft_tokens, tree=self.tree)

    def batch(self):
        generator = torch.Generator().manual_seed(self.number)
        width = max(self.lengths)
        input_ids = torch.zeros(len(self.lengths), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, length in enumerate(self.lengths):
            input_ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
            attention_mask[row, width - length:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def describe(self) -> str:
        options = {k: (v.__name__ if callable(v) and not isinstance(v, LogitsProcessorList) else v)
                   for k, v in self.options.items()}
        kind = f"{self.kind} ({self.routing})" if self.kind == "routed" else self.kind
        return (f"case {self.number}: {self.arch}, {kind} {'tree ' + str(self.tree) if self.tree else 'chain'} "
                f"γ={self.num_draft_tokens}, prompt lengths {self.lengths}, {options}")


def resolved_options(case: Case, target, batch) -> dict:
    """The case's options with EOS ids and stop strings picked from what plain greedy actually emits."""
    options = dict(case.options)
    if case.eos_picks or case.stop_string_position is not None:
        free = target.generate(**batch, do_sample=False, max_new_tokens=14, eos_token_id=None, pad_token_id=0)
        generated = free[:, batch["input_ids"].shape[1]:]
        row = case.number % len(generated)
        if case.eos_picks:
            options["eos_token_id"] = sorted({int(generated[row, p]) for p in case.eos_positions})
        if case.stop_string_position is not None:
            tokenizer = character_tokenizer(VOCAB)
            start = case.stop_string_position
            options.update(stop_strings=[tokenizer.decode(generated[row, start:start + 2])], tokenizer=tokenizer)
    elif "exponential_decay_length_penalty" not in options:  # that processor needs an EOS id: keep the model's
        options["eos_token_id"] = None
    return options


def test_against_plain_generate(case):
    spec = Case(case)
    target, draft = models(spec.arch)
    batch = spec.batch()
    options = resolved_options(spec, target, batch)
    rerun = f"pytest 'tests/test_fuzz.py::test_against_plain_generate[{case}]'   # {spec.describe()}"
    try:
        if spec.do_sample:
            check_sampled_case(spec, target, draft, batch, options)
        else:
            plain = target.generate(**batch, **options)
            ours = target.generate(**batch, assistant_model=spec.drafter(target, draft), **options)
            assert torch.equal(ours, plain), f"plain {plain.tolist()}\nours  {ours.tolist()}"
    except AssertionError as error:
        raise AssertionError(f"{error}\nreproduce: {rerun}") from None


def check_sampled_case(spec, target, draft, batch, options):
    torch.manual_seed(spec.number)
    out = target.generate(**batch, assistant_model=spec.drafter(target, draft), return_dict_in_generate=True,
                          output_scores=True, **options)
    width = batch["input_ids"].shape[1]
    copies = options.get("num_return_sequences", 1)
    prompt_mask = batch["attention_mask"].repeat_interleave(copies, dim=0)
    sequences = out.sequences
    mask = torch.cat([prompt_mask, torch.ones(len(sequences), sequences.shape[1] - width, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = target(sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    processors = captured_processors(target, batch, options)
    generated = out.spec_stats.new_tokens
    for step, scores in enumerate(out.scores):
        expected = processors(sequences[:, : width + step], logits[:, width + step - 1].float())
        rows = generated > step
        torch.testing.assert_close(scores[rows], expected[rows], atol=2e-4, rtol=1e-4,
                                   msg=lambda message: f"scores at step {step}: {message}")
        chosen = expected[rows].gather(1, sequences[rows, width + step, None])
        assert bool(torch.isfinite(chosen).all()), f"a token outside its support at step {step}"


def captured_processors(target, batch, options):
    """The processor list generate() builds for this call (stop strings only add stopping criteria)."""
    captured = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        captured["processors"] = logits_processor
        return input_ids

    without_stops = {k: v for k, v in options.items() if k not in ("stop_strings", "tokenizer")}
    target.generate(**batch, custom_generate=capture, **without_stops)
    return captured["processors"]


def test_the_fuzz_draws_every_dimension():
    """The case generator reaches every architecture, drafter, shape and decoding in CI's default size."""
    cases = [Case(number) for number in range(200)]
    assert {c.arch for c in cases} == set(ARCHS)
    assert {c.kind for c in cases} == {"model", "ngram", "sorted", "guided", "routed", "eagle3"}
    assert {c.routing for c in cases if c.kind == "routed"} == {"router", "rotating"}
    assert {c.tree is None for c in cases} == {True, False} and {c.do_sample for c in cases} == {True, False}
    assert any(len(c.lengths) > 1 and len(set(c.lengths)) > 1 for c in cases)
    assert any(c.options.get("num_return_sequences") == 2 for c in cases)
    assert any(c.stop_string_position is not None for c in cases) and any(c.eos_picks > 1 for c in cases)
    assert sum("min_new_tokens" in c.options for c in cases) > 20
