"""The offline benchmark and the models it runs on. Speed is measured by the bench, never asserted here."""

import json

import pytest
import torch

import hf_specdec  # noqa: F401  (installs the generate() hook)
from hf_specdec import testing
from hf_specdec.bench import BenchConfig, expected_tokens_per_round, per_token_acceptance, theoretical_speedup
from hf_specdec.cli import bench_config_from_args, build_parser, main

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


def test_bench_end_to_end_writes_a_complete_json_report(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    exit_code = main(["bench", "--quick", "--agreement", "0.8", "--batch-sizes", "1,2", "--num-prompts", "2",
                      "--max-new-tokens", "8", "--sampling", "--no-progress", "--json", str(report_path)])
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert "transformers-assisted" in printed and "theory" in printed

    report = json.loads(report_path.read_text())
    assert set(report) == {"config", "machine", "pairs", "wall_seconds"}
    assert report["config"]["agreements"] == [0.8] and report["machine"]["torch"] == torch.__version__
    (pair,) = report["pairs"]
    for key in ("agreement", "residual_scale", "target_parameters", "draft_parameters", "target_step_seconds",
                "draft_step_seconds", "cost_ratio", "verify_cost_ratio"):
        assert pair[key] is not None, key
    rows = {(row["method"], row["batch_size"], row["decoding"]): row for row in pair["results"]}
    assert set(rows) == {
        ("plain", 1, "greedy"), ("transformers-assisted", 1, "greedy"), ("chain", 1, "greedy"),
        ("tree", 1, "greedy"), ("ngram", 1, "greedy"), ("plain", 2, "greedy"), ("chain", 2, "greedy"),
        ("plain", 1, "sample"), ("transformers-assisted", 1, "sample"), ("chain", 1, "sample"),
    }
    for (method, batch_size, decoding), row in rows.items():
        assert row["new_tokens"] == 2 * 8 and row["tokens_per_second"] > 0 and row["speedup"] > 0
        assert 0.0 < row["loop_efficiency"] <= 1.0 + 1e-6
        if decoding == "greedy":  # lossless: every method reproduces plain greedy decoding
            assert row["equal_to_plain"] is True and row["equal_rows"] == row["total_rows"] == 2
        else:
            assert row["equal_to_plain"] is None
        if method == "plain":
            assert row["acceptance_rate"] is None and row["speedup"] == pytest.approx(1.0)
        else:
            assert row["acceptance_rate"] is None or 0.0 <= row["acceptance_rate"] <= 1.0
            assert row["mean_accepted_length"] >= 1.0
            assert row["rounds"] > 0
        has_formula = method in ("chain", "transformers-assisted")
        assert (row["theoretical_speedup"] is not None) == has_formula
        assert (row["theoretical_speedup_with_verify_cost"] is not None) == has_formula
        if has_formula:
            assert 0.0 <= row["per_token_acceptance"] <= 1.0


def test_bench_sorted_rows_report_exit_histograms(tmp_path, capsys):
    report_path = tmp_path / "sorted.json"
    exit_code = main(["bench", "--quick", "--agreement", "0.9", "--batch-sizes", "1", "--num-prompts", "2",
                      "--max-new-tokens", "8", "--sorted-exits", "1,2,4", "--sorted-thresholds", "0.3,0.3",
                      "--no-progress", "--json", str(report_path)])
    assert exit_code == 0 and "drafted tokens per exit layer" in capsys.readouterr().out
    (pair,) = json.loads(report_path.read_text())["pairs"]
    rows = {row["method"]: row for row in pair["results"] if row["method"].startswith("sorted")}
    assert set(rows) == {"sorted exit 1", "sorted exit 2", "sorted exit 4", "sorted adaptive [1, 2, 4]",
                         "sorted tree exit 4", "sorted tree adaptive [1, 2, 4]"}
    for name, row in rows.items():
        assert row["equal_to_plain"] is True, name
        assert sum(row["exit_counts"].values()) == row["drafted"], name  # the histogram covers every draft token
    assert set(rows["sorted exit 2"]["exit_counts"]) == {"2"}


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


def test_cli_parses_lists_and_quick_defaults():
    args = build_parser().parse_args(["bench", "--quick", "--batch-sizes", "1,4", "8", "--tree", "4,2,8",
                                      "--agreement", "0.5", "0.7,0.95", "--max-new-tokens", "12", "--num-prompts", "8"])
    config = bench_config_from_args(args)
    assert config.batch_sizes == (1, 4, 8) and config.tree == (4, 2, 8)
    assert config.agreements == (0.5, 0.7, 0.95) and config.max_new_tokens == 12
    assert config.pair_shape["hidden_size"] == BenchConfig.quick().pair_shape["hidden_size"] < 1024


def test_bench_config_rejects_inconsistent_requests():
    with pytest.raises(ValueError, match="multiple"):
        BenchConfig(num_prompts=6, batch_sizes=(1, 4))
    with pytest.raises(ValueError, match="--draft"):
        BenchConfig(target="some/model")
    with pytest.raises(ValueError, match="max_nodes"):
        BenchConfig(tree=(2, 2, 50))


def test_bench_loads_a_local_target_and_draft_with_from_pretrained(tmp_path):
    testing.tiny_causal_lm("llama", vocab_size=256, num_layers=3, seed=0).save_pretrained(tmp_path / "target")
    testing.tiny_causal_lm("qwen2", vocab_size=256, num_layers=1, seed=1).save_pretrained(tmp_path / "draft")
    report_path = tmp_path / "report.json"
    assert main(["bench", "--quick", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                 "--batch-sizes", "1", "--num-prompts", "2", "--max-new-tokens", "6", "--no-progress",
                 "--json", str(report_path)]) == 0
    (pair,) = json.loads(report_path.read_text())["pairs"]
    assert pair["pair"].endswith("draft") and "agreement" not in pair
    assert all(row["equal_to_plain"] for row in pair["results"])  # EOS is off: every row runs to the limit
    assert {row["new_tokens"] for row in pair["results"]} == {12}
