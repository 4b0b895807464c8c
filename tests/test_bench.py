"""The synthetic pair, tiny models and the speed-up formula the benchmark suite relies on (the suite itself:
test_bench_suite.py). Speed is measured by the bench, never asserted here."""

import pytest
import torch

import hf_specdec  # noqa: F401  (installs the generate() hook)
from hf_specdec import testing
from hf_specdec.bench import expected_tokens_per_round, per_token_acceptance, theoretical_speedup

TINY_PAIR = dict(hidden_size=64, num_layers=4, draft_layers=1, vocab_size=512, intermediate_size=128, num_heads=4,
                 num_kv_heads=2)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine OpenMP spinning makes them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(autouse=True)
def private_scale_cache(tmp_path, monkeypatch):
    """Calibrations go to a temporary disk cache, not the user's ~/.cache."""
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(testing, "_SCALE_CACHE", {})

def test_synthetic_pair_hits_the_requested_agreement_and_shares_modules(tmp_path):
    target, draft = testing.build_synthetic_pair(0.7, seed=3, cache_dir=tmp_path, **TINY_PAIR)
    held_out = testing.measure_greedy_agreement(target, draft, num_prompts=32, seed=1234)
    assert held_out == pytest.approx(0.7, abs=0.15)

    assert type(draft) is type(target) and draft.config.num_hidden_layers == 1
    assert draft.model.embed_tokens is target.model.embed_tokens and draft.lm_head is target.lm_head
    assert draft.model.norm is target.model.norm and draft.model.layers[0] is target.model.layers[0]
    target_storage = {parameter.data_ptr() for parameter in target.parameters()}
    assert all(parameter.data_ptr() in target_storage for parameter in draft.parameters())
    assert not draft.training and not target.training

def test_synthetic_pair_is_reproducible_and_calibrated_once(tmp_path, monkeypatch):
    first, _ = testing.build_synthetic_pair(0.9, seed=0, cache_dir=tmp_path, **TINY_PAIR)
    monkeypatch.setattr(testing, "_SCALE_CACHE", {})  # only the disk cache is left

    def fail(*args, **kwargs):
        raise AssertionError("recalibrated although the scale was cached")

    monkeypatch.setattr(testing, "_calibrate_residual_scale", fail)
    second, _ = testing.build_synthetic_pair(0.9, seed=0, cache_dir=tmp_path, **TINY_PAIR)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)

def test_full_agreement_makes_the_target_equal_its_draft():
    target, draft = testing.build_synthetic_pair(1.0, cache_dir=None, **TINY_PAIR)
    assert testing.measure_greedy_agreement(target, draft, num_prompts=4) == 1.0

@pytest.mark.parametrize("arch", sorted(testing.ARCHITECTURES))
def test_tiny_causal_lm_is_seeded_and_generates(arch):
    model = testing.tiny_causal_lm(arch, vocab_size=100, num_layers=2, seed=5)
    same = testing.tiny_causal_lm(arch, vocab_size=100, num_layers=2, seed=5)
    other = testing.tiny_causal_lm(arch, vocab_size=100, num_layers=2, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert not model.training and model.config.vocab_size == 100
    (batch,) = testing.synthetic_prompts(3, batch_size=3, vocab_size=100)
    output = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert output.shape == (3, batch["input_ids"].shape[1] + 4)

def test_tiny_causal_lm_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    testing.tiny_causal_lm("llama")
    assert torch.equal(torch.rand(3), expected)

def test_synthetic_prompts_are_left_padded_uneven_and_batch_independent():
    batches = testing.synthetic_prompts(8, batch_size=4, vocab_size=50, min_length=3, max_length=10, seed=1)
    singles = testing.synthetic_prompts(8, batch_size=1, vocab_size=50, min_length=3, max_length=10, seed=1)
    assert len(batches) == 2 and len(singles) == 8
    lengths = torch.cat([batch["attention_mask"].sum(1) for batch in batches])
    assert lengths.min() == 3 and lengths.max() == 10 and len(set(lengths.tolist())) > 1
    for index, batch in enumerate(batches):
        mask = batch["attention_mask"].bool()
        assert mask[:, -1].all()  # left padding: every row ends with a real token
        assert (batch["input_ids"][~mask] == testing.PAD_TOKEN_ID).all()
        assert (batch["input_ids"][mask] >= testing.FIRST_ORDINARY_TOKEN_ID).all()
        for row in range(4):
            single = singles[4 * index + row]["input_ids"][0]
            assert torch.equal(batch["input_ids"][row][mask[row]], single)

def test_theoretical_speedup_matches_the_closed_form():
    assert theoretical_speedup(0.8, 4, 0.0) == pytest.approx(3.3616)  # E[τ] at zero draft cost
    assert theoretical_speedup(0.8, 8, 0.05) == pytest.approx(3.09, abs=0.01)
    assert theoretical_speedup(1.0, 5, 0.1) == pytest.approx(6 / 1.5)

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 0.99])
def test_per_token_acceptance_inverts_the_expected_accepted_length(alpha):
    tau = expected_tokens_per_round(alpha, 6)
    assert per_token_acceptance(tau, 6) == pytest.approx(alpha, abs=1e-6)
