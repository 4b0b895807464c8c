"""recipes/lab.py at toy sizes: every stage builds its outputs, a second run reuses them all, a changed setting
rebuilds only what depends on it, every drafter loads with `load_drafter` and decodes losslessly through the
benchmark suite, and bad input fails clearly."""

import json
import shutil
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))

TOY = [
    "--heldout_fraction", "0.25", "--vocab_size", "320", "--block_length", "32", "--eval_blocks", "8",
    "--num_prompts", "4", "--prompt_min_tokens", "8", "--prompt_max_tokens", "12",
    "--target_hidden_size", "32", "--target_layers", "2", "--target_heads", "2", "--target_intermediate_size", "64",
    "--target_steps", "4", "--batch_size", "4", "--draft_batch_size", "4",
    "--draft_hidden_size", "16", "--draft_layers", "1", "--draft_heads", "2", "--draft_intermediate_size", "32",
    "--sft_steps", "2", "--distill_fkl_steps", "2", "--distill_tvd_steps", "2", "--soft_steps", "2",
    "--soft_layers", "2", "--soft_exits", "1", "2", "--soft_exit_thresholds", "0.7", "0.0",
    "--guided_steps", "2", "--eagle3_steps", "2", "--eagle3_ttt_steps", "2", "--eagle3_draft_vocab_size", "128",
    "--bench_prompts", "2", "--max_new_tokens", "8", "--bench_repeats", "1", "--logging_steps", "1",
]  # fmt: skip
STAGES = ("corpus", "tokenizer", "data", "prompts", "target")
DRAFTERS = ("init", "sft", "distill-fkl", "distill-tvd", "adaspec", "distill-fkl-long", "soft", "guided", "eagle3")


def write_text_dir(root: Path, files: int = 12) -> Path:
    """Small Python modules with enough repetition that a few steps learn something."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        functions = [
            f"def function_{i}_{j}(value, other=None):\n"
            f'    """Return value plus {j}."""\n'
            f"    if other is None:\n        other = {j}\n    return value + other\n\n\n"
            for j in range(12)
        ]
        (root / f"module_{i:02d}.py").write_text(f"import os\n\nCONSTANT = {i}\n\n\n" + "".join(functions))
    return root


def run(text_dir: Path, output_dir: Path, *extra: str) -> dict:
    import lab

    return lab.main(["--text_dir", str(text_dir), "--output_dir", str(output_dir), *TOY, *extra])


def markers(output_dir: Path) -> dict[str, tuple[str, float]]:
    return {
        str(path.parent.relative_to(output_dir)): (json.loads(path.read_text())["key"], path.stat().st_mtime)
        for path in output_dir.rglob("lab_stage.json")
    }


def rebuilt(payload: dict) -> set[str]:
    stages = {name for name in STAGES if not payload["stages"][name]["reused"]}
    return stages | {name for name, record in payload["drafters"].items() if not record["reused"]}


@pytest.fixture(scope="module")
def lab_dirs(tmp_path_factory):
    """One toy lab, built once (no benchmark: the suite is checked on its own below)."""
    root = tmp_path_factory.mktemp("lab")
    text_dir, output_dir = write_text_dir(root / "text"), root / "out"
    payload = run(text_dir, output_dir, "--benchmark", "false")
    return text_dir, output_dir, payload


def test_every_stage_produces_its_outputs(lab_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdec import Eagle3Drafter, ModelDrafter, SortedDrafter
    from hf_specdec.drafters import load_drafter
    from hf_specdec.drafters.guided import GuidedModelDrafter

    _, output_dir, payload = lab_dirs
    assert rebuilt(payload) == set(STAGES) | set(DRAFTERS)
    corpus = payload["stages"]["corpus"]["metrics"]
    assert corpus["train"]["files"] > 0 and corpus["heldout"]["files"] > 0
    target = payload["stages"]["target"]["metrics"]
    assert target["steps"] == 4 and target["final_train_loss"] > 0
    assert payload["target_heldout"]["perplexity"] > 1 and 0 <= payload["target_heldout"]["next_token_accuracy"] <= 1

    tokenizer = AutoTokenizer.from_pretrained(output_dir / "target")
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token and len(tokenizer) == 320
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level round trip
    AutoModelForCausalLM.from_pretrained(output_dir / "target")

    prompts = [json.loads(line) for line in (output_dir / "heldout.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and prompts[0]["id"] == "heldout-001"
    assert all(p["category"] == "python" and p["prompt"] for p in prompts)
    heldout_files = {json.loads(line)["path"] for line in (output_dir / "corpus" / "heldout.jsonl").open()}
    assert {p["source"] for p in prompts} <= heldout_files

    for name in DRAFTERS:
        directory = output_dir / "drafters" / name
        assert AutoTokenizer.from_pretrained(directory).get_vocab() == tokenizer.get_vocab()
        drafter = load_drafter(str(directory), num_draft_tokens=3)
        kinds = {"soft": SortedDrafter, "guided": GuidedModelDrafter, "eagle3": Eagle3Drafter}
        assert type(drafter) is kinds.get(name, ModelDrafter), name
    assert SortedDrafter.from_pretrained(str(output_dir / "drafters" / "soft")).exits == [1, 2]
    # the target is 2 layers deep: both read its hidden states 1 and 2 (EAGLE-3's default for a target that shallow)
    assert payload["drafters"]["guided"]["settings"]["states"] == payload["drafters"]["eagle3"]["settings"]["states"]
    assert payload["drafters"]["eagle3"]["settings"]["states"] == [1, 2]
    head = load_drafter(str(output_dir / "drafters" / "eagle3")).model
    assert head.config.draft_vocab_size == 128 and head.config.aux_hidden_state_layer_ids == [1, 2]
    assert payload["drafters"]["adaspec"]["metrics"]["steps"] == 5  # distill_fkl_steps / k = 2 / 0.4
    assert payload["drafters"]["distill-fkl-long"]["metrics"]["steps"] == 5
    assert set(payload["heldout_acceptance"]) == set(DRAFTERS)
    assert all(0 <= m["expected_acceptance"] <= 1 for m in payload["heldout_acceptance"].values())
    assert set(payload["heldout_acceptance"]["soft"]["exits"]) == {"1", "2"}
    report = (output_dir / "lab_report.md").read_text()
    assert "| adaspec |" in report and "orderings reproduce" in report
    assert json.loads((output_dir / "lab_report.json").read_text())["arguments"]["target_steps"] == 4


def test_second_run_reuses_every_stage(lab_dirs):
    text_dir, output_dir, _ = lab_dirs
    before = markers(output_dir)
    payload = run(text_dir, output_dir, "--benchmark", "false")
    assert rebuilt(payload) == set()
    assert markers(output_dir) == before  # same keys, markers not rewritten


def test_changed_settings_rebuild_only_what_depends_on_them(lab_dirs, tmp_path):
    text_dir, output_dir, _ = lab_dirs
    copy = tmp_path / "out"
    shutil.copytree(output_dir, copy)
    before = markers(copy)
    assert rebuilt(run(text_dir, copy, "--benchmark", "false", "--sft_steps", "3")) == {"sft"}
    after = markers(copy)
    assert {k for k in after if after[k] != before[k]} == {"drafters/sft"}
    # adaspec's reference is distill-fkl, and distill-fkl-long takes AdaSPEC's step count: both follow it
    payload = run(text_dir, copy, "--benchmark", "false", "--sft_steps", "3", "--distill_fkl_steps", "3")
    assert rebuilt(payload) == {"distill-fkl", "adaspec", "distill-fkl-long"}
    # prompts and measuring settings retrain nothing
    payload = run(text_dir, copy, "--benchmark", "false", "--sft_steps", "3", "--distill_fkl_steps", "3",
                  "--num_prompts", "3", "--eval_blocks", "4")
    assert rebuilt(payload) == {"prompts"} and len((copy / "heldout.jsonl").read_text().splitlines()) == 3
    # the EAGLE-3 head's TTT depth is its own; the guided drafter is trained for the benchmark's draft length
    payload = run(text_dir, copy, "--benchmark", "false", "--sft_steps", "3", "--distill_fkl_steps", "3",
                  "--num_prompts", "3", "--eagle3_ttt_steps", "3", "--num_draft_tokens", "3")
    assert rebuilt(payload) == {"eagle3", "guided"}


def test_on_policy_distillation_retrains_the_distilled_drafters(lab_dirs, tmp_path):
    text_dir, output_dir, _ = lab_dirs
    copy = tmp_path / "out"
    shutil.copytree(output_dir, copy)
    payload = run(text_dir, copy, "--benchmark", "false", "--distill_lmbda", "0.5")
    assert rebuilt(payload) == {"distill-fkl", "distill-tvd", "adaspec", "distill-fkl-long"}
    on_policy = payload["drafters"]["distill-fkl"]["metrics"]["steps"]
    assert on_policy == 2


def test_benchmark_through_the_suite_is_lossless(lab_dirs, tmp_path):
    bench = pytest.importorskip("hf_specdec.bench")
    if not hasattr(bench, "run_suite"):
        pytest.skip("hf_specdec.bench.run_suite is not there yet")
    text_dir, output_dir, _ = lab_dirs
    copy = tmp_path / "out"
    shutil.copytree(output_dir, copy)
    payload = run(text_dir, copy)
    assert rebuilt(payload) == set()
    cells = payload["benchmark"]
    assert set(cells) == set(DRAFTERS)
    for name, modes in cells.items():
        assert set(modes) == {"chain/greedy", "chain/sample", "tree/greedy", "tree/sample"}, name
        assert modes["chain/greedy"]["equal_to_plain"] is True, name
        assert modes["tree/greedy"]["equal_to_plain"] is True, name
    report = (copy / "lab_report.md").read_text()
    assert "speed-up chain greedy" in report and "| NO |" not in report


def test_greedy_differences_are_reported_from_the_suites_diagnosis():
    import lab

    tie = {"batch": 1, "row": 0, "position": 7, "plain_token": 5, "token": 6, "logit_margin": 4.8e-7, "tie": True}
    real = dict(tie, logit_margin=0.9, tie=False)
    exact = {"equal_to_plain": True, "greedy_mismatches": []}
    cells = {
        "a": {"chain/greedy": exact, "tree/greedy": exact},
        "b": {"chain/greedy": exact, "tree/greedy": {"equal_to_plain": False, "greedy_mismatches": [tie]}},
        "c": {"chain/greedy": {"equal_to_plain": False, "greedy_mismatches": [tie, real]}, "tree/greedy": exact},
    }
    assert [lab.lossless_verdict(cells[name]) for name in "abc"] == ["yes", "tie", "NO"]
    notes = lab.mismatch_notes(cells, ["heldout-001", "heldout-002"])
    assert len(notes) == 3 and "b tree/greedy, prompt heldout-002" in notes[0] and "float near-tie" in notes[0]
    assert "NOT a tie" in notes[2]


def test_corpus_skips_large_generated_and_third_party_files(tmp_path):
    import lab

    text_dir = write_text_dir(tmp_path / "text", files=8)
    (text_dir / "big.py").write_text("x = 1\n" * 100_000)
    (text_dir / "tables.py").write_text("# This file was generated by gen.py; do not edit.\nTABLE = {}\n")
    (text_dir / "site-packages").mkdir()
    (text_dir / "site-packages" / "vendored.py").write_text("y = 2\n")
    (text_dir / "notes.txt").write_text("not python\n")
    argv = ["--text_dir", str(text_dir), "--max_file_kb", "64", "--heldout_fraction", "0.5"]
    (args,) = lab.parse_args((lab.LabArguments,), argv)
    files, skipped = lab.select_files(args)
    assert sorted(path for path, _ in files) == [f"module_{i:02d}.py" for i in range(8)]
    assert skipped["too_large"] == 1 and skipped["generated"] == 1 and skipped["excluded_dir"] == 1
    # the split depends on each file's relative path only, not on the order files are found in
    split = lab.split_corpus(args, files)
    reordered = lab.split_corpus(args, list(reversed(files)))
    assert {k: sorted(v) for k, v in reordered.items()} == {k: sorted(v) for k, v in split.items()}


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1"])
def test_heldout_fraction_out_of_range_is_refused(tmp_path, fraction):
    with pytest.raises(ValueError, match="heldout_fraction must be strictly between 0 and 1"):
        run(write_text_dir(tmp_path / "text", files=2), tmp_path / "out", "--heldout_fraction", fraction)


def test_empty_text_dir_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No usable '\\*.py' files"):
        run(tmp_path / "empty", tmp_path / "out", "--benchmark", "false")
    with pytest.raises(ValueError, match="is not a directory"):
        run(tmp_path / "missing", tmp_path / "out", "--benchmark", "false")
