"""Sampling with a drafter reproduces the target's exact (processed) distribution.

The exact joint distribution of the first NEW_TOKENS tokens is enumerated with the very processor list generate()
builds (captured through a custom_generate callable); speculative samples are compared cell by cell on every
position's marginal and every adjacent pair. The bound is 4.5 standard errors: a 2% bias on a cell fails it (the
negative control below checks that), ordinary sampling noise does not.
"""

import itertools

import pytest
import torch
from conftest import SplitRouter, perturbed_copy, rotating_routed_drafter, siblings_verified_against_q, tiny_model

from hf_specdec import Eagle3DraftModel, GuidedDrafter, ModelDrafter, NGramDrafter, RoutedDrafter, SortedDrafter, TreeConfig

VOCAB, NEW_TOKENS, SAMPLES = 8, 4, 20_000
PROMPTS = [[3, 5, 3, 6, 3, 5], [4, 7, 4]]  # repetitive, so n-gram lookup proposes drafts too


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab_size=VOCAB, num_layers=2, hidden_size=16, seed=5, eos_token_id=None,
                      bos_token_id=None)


def captured_processors(model, prompt, padded_width, **generation_kwargs):
    """The processor list generate() builds for `prompt` left-padded to `padded_width` (pad id 0)."""
    pads = padded_width - len(prompt)
    input_ids = torch.tensor([[0] * pads + prompt])
    attention_mask = torch.tensor([[0] * pads + [1] * len(prompt)])
    captured = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        captured["processors"] = logits_processor
        return input_ids

    model.generate(input_ids=input_ids, attention_mask=attention_mask, custom_generate=capture, pad_token_id=0,
                   **generation_kwargs)
    return captured["processors"]


@torch.no_grad()
def exact_joint(model, prompt, processors, padded_width=None):
    """[V] * NEW_TOKENS tensor of probabilities of every continuation, by enumeration. Processors see the prompt
    left-padded to `padded_width` with pad id 0, as they do inside a padded generate() batch."""
    pads = (padded_width or len(prompt)) - len(prompt)
    joint = torch.ones(())
    for depth in range(NEW_TOKENS):
        continuations = torch.tensor(list(itertools.product(range(VOCAB), repeat=depth)), dtype=torch.long)
        continuations = continuations.reshape(VOCAB ** depth, depth)
        input_ids = torch.cat([torch.tensor(prompt).expand(len(continuations), -1), continuations], dim=1)
        scores = model(input_ids).logits[:, -1].float()
        padded = torch.cat([torch.zeros(len(input_ids), pads, dtype=torch.long), input_ids], dim=1)
        # one sequence at a time: the captured processors hold per-row state for a batch of one
        processed = torch.cat([processors(padded[i:i + 1], scores[i:i + 1]) for i in range(len(padded))])
        probs = processed.softmax(-1).reshape(*([VOCAB] * depth), VOCAB)
        joint = joint[..., None] * probs
    return joint


def deviations(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """Largest |empirical - exact| / standard error over every marginal and adjacent-pair cell."""
    count = len(samples)
    worst = 0.0
    for start, width in [(t, 1) for t in range(NEW_TOKENS)] + [(t, 2) for t in range(NEW_TOKENS - 1)]:
        other = tuple(d for d in range(NEW_TOKENS) if not start <= d < start + width)
        exact = joint.sum(dim=other).flatten()
        index = torch.zeros(count, dtype=torch.long)
        for d in range(start, start + width):
            index = index * VOCAB + samples[:, d]
        empirical = torch.bincount(index, minlength=VOCAB ** width).double() / count
        stderr = (exact.double() * (1 - exact.double()) / count).sqrt() + 1.0 / count
        worst = max(worst, float(((empirical - exact.double()).abs() / stderr).max()))
    return worst


BOUND = 4.5

SETTINGS = {
    "temperature": dict(temperature=0.7),
    "top-k": dict(top_k=4),
    "top-p": dict(top_p=0.8, temperature=1.3),
    "min-p": dict(min_p=0.15),
    "repetition-penalty": dict(repetition_penalty=1.4, temperature=0.9),
    "no-repeat-ngram": dict(no_repeat_ngram_size=2),
}


def guided(target, draft):
    """A guided drafter steered by the target's layers 1 and 2, with a non-zero (random) guide projection."""
    model = GuidedDrafter.from_drafter(draft, target_config=target.config, verifier_layers=[1, 2])
    with torch.no_grad():
        model.guide.projection.weight.copy_(torch.randn(model.guide.projection.weight.shape,
                                                        generator=torch.Generator().manual_seed(3)))
    return model.eval()


def eagle3_head(target):
    """A random EAGLE-3 head over 6 of the 8 tokens (q = 0 for the other two) reading the target's states 1 and 2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        head = Eagle3DraftModel.from_target(target.config, draft_vocab=torch.tensor([0, 1, 3, 4, 5, 6]),
                                            aux_hidden_state_layer_ids=[1, 2])
    return head.eval()


def drafter_for(kind, target):
    draft = perturbed_copy(target, noise=0.4, seed=2)
    return {
        "model-chain": lambda: ModelDrafter(draft, num_draft_tokens=3),
        "model-tree": lambda: ModelDrafter(draft, tree=TreeConfig(depth=3, top_k=2, max_nodes=6)),
        "model-tree-top-k": lambda: ModelDrafter(draft, tree=TreeConfig(3, 2, 6, sampling="top_k")),
        "model-tree-wide": lambda: ModelDrafter(draft, tree=TreeConfig(depth=3, top_k=3, max_nodes=9, coverage=0.99)),
        # a draft far from the target: first children are refused often, so later siblings decide many tokens
        "model-tree-far": lambda: ModelDrafter(perturbed_copy(target, noise=1.5, seed=7),
                                               tree=TreeConfig(depth=3, top_k=3, max_nodes=9, coverage=0.99)),
        # later siblings drawn from a sharpened q (TreeConfig.sibling_temperature), each verified against its own
        "model-tree-sharp": lambda: ModelDrafter(perturbed_copy(target, noise=1.5, seed=7), tree=TreeConfig(
            depth=3, top_k=3, max_nodes=9, coverage=0.99, sibling_temperature=0.33)),
        "ngram-chain": lambda: NGramDrafter(max_ngram=2, num_draft_tokens=3),
        "ngram-tree": lambda: NGramDrafter(max_ngram=2, tree=TreeConfig(depth=3, top_k=2, max_nodes=6)),
        # exits 1 and 2 of the perturbed copy; a threshold near the median max-probability mixes the two
        "sorted-chain": lambda: SortedDrafter(draft, exits=[1, 2], thresholds=[0.3], num_draft_tokens=3),
        "sorted-tree": lambda: SortedDrafter(draft, exits=[1, 2], thresholds=[0.3], tree=TreeConfig(3, 2, 6)),
        "guided-chain": lambda: guided(target, draft).as_drafter(num_draft_tokens=3),
        "guided-tree": lambda: guided(target, draft).as_drafter(tree=TreeConfig(3, 2, 6)),
        "eagle3-chain": lambda: eagle3_head(target).as_drafter(num_draft_tokens=3),
        "eagle3-tree": lambda: eagle3_head(target).as_drafter(tree=TreeConfig(3, 2, 6)),
        # the two prompts' rows drafted by different drafters (a sampled chain, n-gram tries with one-hot q) ...
        "routed-split": lambda: RoutedDrafter({"a": ModelDrafter(draft, num_draft_tokens=3),
                                              "b": NGramDrafter(2, tree=TreeConfig(3, 2, 6))}, router=SplitRouter()),
        # ... and rows moving every round between a sampled tree, a sorted chain and no drafting
        "routed-rotating": lambda: rotating_routed_drafter({
            "a": ModelDrafter(draft, tree=TreeConfig(depth=3, top_k=2, max_nodes=6)),
            "b": SortedDrafter(draft, exits=[1, 2], thresholds=[0.3], num_draft_tokens=3)}),
    }[kind]()


def sample_batch(target, drafter, settings):
    """SAMPLES // 2 continuations of each prompt in one left-padded batch (exercises padding + expansion)."""
    width = max(map(len, PROMPTS))
    input_ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(PROMPTS):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    out = target.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                          num_return_sequences=SAMPLES // 2, assistant_model=drafter, return_dict_in_generate=True,
                          pad_token_id=0, **settings)
    generated = out.sequences[:, width:].reshape(len(PROMPTS), SAMPLES // 2, NEW_TOKENS)
    return generated, out.spec_stats


# every processor setting for model drafts (sampled chains, sampled trees); deterministic top-k trees and n-gram
# drafts (one-hot) on a subset
CASES = [(kind, setting) for kind in ("model-chain", "model-tree") for setting in SETTINGS] + [
    ("model-tree-top-k", "temperature"), ("model-tree-top-k", "top-p"), ("model-tree-wide", "temperature"),
    ("model-tree-wide", "top-k"), ("model-tree-far", "temperature"), ("model-tree-sharp", "temperature"),
    ("model-tree-sharp", "top-p")] + [
    (kind, setting) for kind in ("ngram-chain", "ngram-tree") for setting in ("temperature", "repetition-penalty",
                                                                            "no-repeat-ngram")] + [
    (kind, setting) for kind in ("sorted-chain", "sorted-tree", "guided-chain", "guided-tree", "eagle3-chain",
                                 "eagle3-tree")
    for setting in ("temperature", "top-p")] + [("eagle3-tree", "repetition-penalty")] + [
    (kind, setting) for kind in ("routed-split", "routed-rotating") for setting in ("temperature", "top-k")]


@pytest.mark.parametrize("kind,setting", CASES)
def test_sampling_matches_exact_distribution(target, kind, setting):
    torch.manual_seed(0)
    settings = SETTINGS[setting]
    generated, stats = sample_batch(target, drafter_for(kind, target), settings)
    if not (kind.startswith("ngram") and setting == "no-repeat-ngram"):  # there every n-gram draft is banned
        assert 0.05 < stats.acceptance_rate < 0.98, "both accept and reject paths must be exercised"
    if kind.startswith("sorted"):
        assert all(count > 0 for count in stats.exit_counts.values()), stats.exit_counts  # both exits drafted
    for row, prompt in enumerate(PROMPTS):
        width = max(map(len, PROMPTS))
        processors = captured_processors(target, prompt, width, do_sample=True, **settings)
        joint = exact_joint(target, prompt, processors, padded_width=width)
        assert deviations(generated[row], joint) < BOUND, f"{kind} / {setting} / prompt {row}"


def test_the_check_catches_a_two_percent_bias(target):
    """Negative control: samples from a distribution with 2% of one position's mass moved fail the bound."""
    torch.manual_seed(1)
    processors = captured_processors(target, PROMPTS[0], len(PROMPTS[0]), do_sample=True, temperature=0.7)
    joint = exact_joint(target, PROMPTS[0], processors)
    flat = joint.flatten().clone()
    top = flat.argsort(descending=True)
    moved = min(0.02, float(flat[top[1]]))
    flat[top[0]] += moved
    flat[top[1]] -= moved
    draws = torch.multinomial(flat, SAMPLES // 2, replacement=True)
    samples = torch.stack([(draws // VOCAB ** (NEW_TOKENS - 1 - d)) % VOCAB for d in range(NEW_TOKENS)], dim=1)
    assert deviations(samples, joint) > BOUND
    unbiased = torch.multinomial(joint.flatten(), SAMPLES // 2, replacement=True)
    samples = torch.stack([(unbiased // VOCAB ** (NEW_TOKENS - 1 - d)) % VOCAB for d in range(NEW_TOKENS)], dim=1)
    assert deviations(samples, joint) < BOUND


def wrong_sibling_q(self, chosen, top_k):
    """Biased: every sibling verified against its parent's q, as if drawn with replacement."""
    q = torch.cat(self.parent_log_q, dim=1).exp()
    return q.gather(1, self.q_slot.gather(1, chosen)[..., None].expand(-1, -1, q.shape[-1]))


def sibling_kept_by_its_own_probability(original):
    """Biased: a later sibling is dropped when its own draft probability is low, so whether it exists depends on
    what it is (the construction must decide from earlier siblings only)."""
    def children_added(self, ids, log_q, parent_ids, parent_scores, child_log_q):
        original(self, ids, log_q, parent_ids, parent_scores, child_log_q)
        own = child_log_q.exp().reshape(child_log_q.shape[0], -1)
        self.candidate[:, ids] &= ~((self.rank[:, ids] > 0) & (own < 0.25))
    return children_added


@pytest.mark.parametrize("bias", ["earlier siblings kept in q", "sibling kept by its own probability",
                                  "sharpened siblings verified against q"])
def test_the_check_catches_a_biased_sampled_tree(target, monkeypatch, bias):
    """Negative control for sampled trees: each plausible mistake in the construction fails the check."""
    from hf_specdec.drafters.trees import SampledCandidates

    sibling_temperature = TreeConfig.sibling_temperature  # the default
    if bias == "earlier siblings kept in q":
        monkeypatch.setattr(SampledCandidates, "_sibling_distributions", wrong_sibling_q)
    elif bias == "sibling kept by its own probability":
        monkeypatch.setattr(SampledCandidates, "_children_added",
                            sibling_kept_by_its_own_probability(SampledCandidates._children_added))
    else:
        monkeypatch.setattr(SampledCandidates, "_sibling_distributions",
                            siblings_verified_against_q(SampledCandidates._sibling_distributions))
        sibling_temperature = 0.33
    torch.manual_seed(0)
    settings = SETTINGS["temperature"]
    # a draft far from the target: first children are refused often, so later siblings decide many tokens
    drafter = ModelDrafter(perturbed_copy(target, noise=1.5, seed=7), tree=TreeConfig(
        depth=3, top_k=3, max_nodes=9, coverage=0.99, sibling_temperature=sibling_temperature))
    generated, _ = sample_batch(target, drafter, settings)
    width = max(map(len, PROMPTS))
    worst = max(deviations(generated[row], exact_joint(target, prompt, captured_processors(
        target, prompt, width, do_sample=True, **settings), padded_width=width)) for row, prompt in enumerate(PROMPTS))
    assert worst > BOUND, f"{bias}: {worst:.2f}"


def test_plain_sampling_passes_the_same_check(target):
    """The harness itself: transformers' own sampling passes."""
    torch.manual_seed(2)
    settings = SETTINGS["top-p"]
    out = target.generate(input_ids=torch.tensor([PROMPTS[0]]), do_sample=True, max_new_tokens=NEW_TOKENS,
                          num_return_sequences=SAMPLES // 2, pad_token_id=0, **settings)
    processors = captured_processors(target, PROMPTS[0], len(PROMPTS[0]), do_sample=True, **settings)
    assert deviations(out[:, len(PROMPTS[0]):], exact_joint(target, PROMPTS[0], processors)) < BOUND
