"""The benchmark suite end to end on tiny pairs: every experiment's rows, per-category numbers, outputs and errors.
Speed is measured by the suite, never asserted here; what is asserted is that its bookkeeping is right."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_specdec  # noqa: F401  (installs the generate() hook)
from hf_specdec import Eagle3DraftModel, SortedDrafter, testing
from hf_specdec.bench import BUILTIN_CATEGORIES, SuiteConfig, load_prompts
from hf_specdec.bench.prompts import Prompt, encode, render
from hf_specdec.cli import build_parser, main, suite_config_from_args


@pytest.fixture(autouse=True)
def private_scale_cache(tmp_path, monkeypatch):
    """Calibrations go to a temporary disk cache, not the user's ~/.cache."""
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(testing, "_SCALE_CACHE", {})


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    exit_code = main(["bench", "--quick", "--prompts", "code", "rag", "--max-new-tokens", "8", "--no-progress",
                      "--decoding", "greedy", "sample", "--top-p", "0.9",
                      "--experiments", "plain,assisted,assisted-default,chain,auto,tree,tree-top-k,ngram,gamma-sweep,batch-sweep,sorted",
                      "--sorted-exits", "1,4", "--draft-lengths", "1,2", "--batch-sizes", "1,2", "--out", str(out)])
    assert exit_code == 0
    return json.loads((out / "report.json").read_text()), out


def test_suite_rows_cover_every_experiment_and_greedy_rows_equal_plain(quick_report):
    report, _ = quick_report
    assert report["categories"] == ["code", "rag"] and len(report["prompts"]) == 2
    (pair,) = report["pairs"]
    names = {(row["name"], row["batch_size"], row["decoding"]) for row in pair["rows"]}
    for decoding in ("greedy", "sample"):
        assert {("plain", 1, decoding), ("assisted[draft]", 1, decoding), ("chain[draft]", 1, decoding),
                ("tree[draft]", 1, decoding), ("ngram", 1, decoding), ("gamma-sweep[draft] γ=1", 1, decoding),
                ("gamma-sweep[draft] γ=2", 1, decoding), ("sorted exit 1", 1, decoding),
                ("sorted adaptive [1, 4]", 1, decoding), ("sorted tree adaptive [1, 4]", 1, decoding),
                ("auto[draft]", 1, decoding), ("assisted-default[draft]", 1, decoding)} <= names
    assert {("plain", 2, "greedy"), ("chain[draft]", 2, "greedy")} <= names
    # the top-k construction differs from `tree` only under sampling
    assert ("tree-top-k[draft]", 1, "sample") in names and ("tree-top-k[draft]", 1, "greedy") not in names
    for row in pair["rows"]:
        overall = row["overall"]
        assert overall["new_tokens"] == 2 * 8 and overall["tokens_per_second"] > 0, row["name"]
        if row["decoding"] == "greedy":  # lossless: every method reproduces plain greedy decoding
            assert overall["equal_to_plain"] is True, row["name"]
        else:
            assert overall["equal_to_plain"] is None
        if row["experiment"] == "plain":
            assert overall["speedup"] == pytest.approx(1.0) and overall["mean_accepted_length"] is None
        elif row["experiment"] != "auto":  # auto may hand the call to plain decoding (no rounds)
            assert overall["mean_accepted_length"] >= 1.0 and overall["rounds"] > 0, row["name"]
        if row["experiment"] not in ("plain",):  # the spread of the speed-up over the repeats, and whether it
            low, high = overall["speedup_spread"]  # includes 1.0 (then the table marks it '~')
            assert low <= overall["speedup"] <= high or low == high
            assert overall["speedup_uncertain"] == (low <= 1.0 <= high)
        if row["experiment"] in ("chain", "auto") and row["batch_size"] == 1:
            assert row["versus_assisted"]["wall_ratio"] > 0
        if row["experiment"] == "auto":  # --quick's ceiling for the draft lengths auto may choose
            assert row["num_draft_tokens"] == 4
        if row["experiment"] == "chain":
            assert overall["ops_per_round"] > 0 and overall["syncs_per_round"] >= 0


def test_suite_per_category_numbers_add_up_to_overall(quick_report):
    report, _ = quick_report
    (pair,) = report["pairs"]
    for row in pair["rows"]:
        overall = row["overall"]
        if row["batch_size"] > 1:
            assert row["categories"] == {}  # batches mix categories
            continue
        categories = row["categories"]
        assert set(categories) == {"code", "rag"}
        for key in ("new_tokens", "drafted", "accepted", "rounds"):
            assert sum(stats[key] for stats in categories.values()) == overall[key], (row["name"], key)
        assert sum(stats["wall_seconds"] for stats in categories.values()) == pytest.approx(overall["wall_seconds"])
        assert overall["latency_p50"] <= overall["latency_p95"]
        walls = [stats["wall_seconds"] for stats in categories.values()]  # one prompt per category: one latency each
        assert min(walls) <= overall["latency_p50"] <= max(walls)


def test_suite_histograms_theory_and_exit_counts_are_consistent(quick_report):
    report, _ = quick_report
    (pair,) = report["pairs"]
    assert pair["drafters"]["draft"]["kind"] == "model" and 0 < pair["drafters"]["draft"]["cost_ratio"] < 1
    for row in pair["rows"]:
        overall, histogram = row["overall"], row["accepted_length_counts"]
        if row["experiment"] in ("chain", "tree", "ngram", "gamma-sweep", "sorted"):
            assert sum(histogram) == overall["rounds"], row["name"]
            assert sum(k * n for k, n in enumerate(histogram)) == overall["accepted"], row["name"]
        has_formula = row["experiment"] in ("chain", "assisted", "gamma-sweep")
        assert (overall["theoretical_speedup"] is not None) == has_formula, row["name"]
        if has_formula:
            assert 0.0 <= overall["per_token_acceptance"] <= 1.0
            assert overall["theoretical_speedup_with_verify_cost"] is not None
        if row["experiment"] == "sorted":
            assert sum(row["exit_counts"].values()) == overall["drafted"], row["name"]
    exit_1 = next(row for row in pair["rows"] if row["name"] == "sorted exit 1")
    assert set(exit_1["exit_counts"]) == {"1"}


def test_suite_writes_markdown_report_and_plots(quick_report):
    _, out = quick_report
    plots = sorted(path.name for path in (out / "plots").glob("*.png"))
    assert plots == ["acceptance_histogram.png", "speedup_by_category.png", "tau_vs_draft_length.png",
                     "throughput_vs_batch_size.png"]
    for path in (out / "plots").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    markdown = (out / "report.md").read_text()
    assert "speed-up vs plain by category" in markdown and "| chain[draft] | 1 | greedy |" in markdown
    assert "![speedup_by_category](plots/speedup_by_category.png)" in markdown


def test_builtin_prompt_sets_load_with_rag_the_longest():
    prompts = load_prompts(BUILTIN_CATEGORIES)
    assert len(prompts) == 70 and {p.category for p in prompts} == set(BUILTIN_CATEGORIES)
    assert all(p.messages and p.messages[-1]["role"] == "user" for p in prompts if p.category == "chat")
    length = {category: max(len(p.text or "") for p in prompts if p.category == category)
              for category in BUILTIN_CATEGORIES if category != "chat"}
    assert max(length, key=length.get) == "rag"
    assert [p.id for p in load_prompts(("code", "qa"), per_category=2)] == ["code-01", "code-02", "qa-01", "qa-02"]


def test_user_prompt_files_are_read_and_bad_lines_get_clear_errors(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text('{"prompt": "def add(a, b):"}\n\n{"category": "chat", "messages": [{"role": "user", '
                    '"content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", '
                    '"content": "Bye"}]}\n')
    first, second = load_prompts((str(good),))
    assert (first.id, first.category, first.text) == ("mine-1", "mine", "def add(a, b):")
    tokenizer = testing.SyntheticTokenizer(512)
    assert render(second, tokenizer)[0] == "User: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:"
    assert tokenizer.decode(encode(second, tokenizer, max_prompt_tokens=10)) == "Assistant:"  # keeps the end
    for content, message in (("{not json", "not valid JSON"), ('{"text": "x"}', "exactly one of"),
                             ('{"messages": []}', "non-empty list")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content + "\n")
        with pytest.raises(ValueError, match=message):
            load_prompts((str(bad),))
    with pytest.raises(ValueError, match="neither a built-in category"):
        load_prompts(("poetry",))


def test_chat_template_tokenizers_render_prompts_as_conversations():
    vocabulary = {token: index for index, token in enumerate(["<unk>", "<|user|>", "<|assistant|>", "hi", "there"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>")))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text, add_special_tokens = render(Prompt("p", "qa", text="hi there"), tokenizer)
    assert text == "<|user|> hi there <|assistant|>" and add_special_tokens is False


def test_suite_runs_local_checkpoints_and_a_lab_layout(tmp_path):
    target = testing.tiny_causal_lm("llama", vocab_size=512, num_layers=3, seed=0)
    target.save_pretrained(tmp_path / "lab" / "target")  # no tokenizer saved: byte tokens are used
    testing.tiny_causal_lm("qwen2", vocab_size=512, num_layers=1, seed=1).save_pretrained(
        tmp_path / "lab" / "drafters" / "small")
    SortedDrafter.from_target(target, exits=[1, 3]).save_pretrained(tmp_path / "lab" / "drafters" / "sorted")
    Eagle3DraftModel.from_target(target.config).save_pretrained(tmp_path / "lab" / "drafters" / "eagle3")
    out = tmp_path / "report.json"
    assert main(["bench", "--quick", "--lab", str(tmp_path / "lab"), "--prompts", "qa", "--experiments",
                 "plain,chain,tree,assisted", "--decoding", "greedy", "--no-progress", "--json", str(out)]) == 0
    (pair,) = json.loads(out.read_text())["pairs"]
    assert {name: info["kind"] for name, info in pair["drafters"].items()} == {
        "small": "model", "sorted": "sorted", "eagle3": "eagle3"}
    rows = {row["name"]: row for row in pair["rows"]}
    assert set(rows) == {"plain", "assisted[small]", "chain[small]", "tree[small]", "chain[sorted]", "tree[sorted]",
                         "chain[eagle3]", "tree[eagle3]"}
    assert all(row["overall"]["equal_to_plain"] for name, row in rows.items() if name != "plain")
    assert rows["chain[sorted]"]["overall"]["theoretical_speedup"] is None  # its cost depends on the exits taken
    assert rows["chain[eagle3]"]["overall"]["theoretical_speedup"] is not None  # the head's step cost is measured


def test_cli_builds_suite_configs():
    args = build_parser().parse_args(["bench", "--quick", "--draft", "d", "--target", "t", "--drafter", "x=path/x",
                                      "--experiments", "plain,chain", "tree", "--batch-sizes", "1,4", "8",
                                      "--decoding", "greedy", "--tree", "4,2,8", "--prompts", "code", "my.jsonl"])
    config = suite_config_from_args(args)
    assert config.drafters == {"draft": "d", "x": "path/x"} and config.experiments == ("plain", "chain", "tree")
    assert config.batch_sizes == (1, 4, 8) and config.tree == (4, 2, 8) and config.decodings == ("greedy",)
    assert config.prompts == ("code", "my.jsonl") and config.pair_shape["hidden_size"] < 1024
    sorted_args = build_parser().parse_args(["bench", "--sorted-exits", "1,2"])
    assert "sorted" in suite_config_from_args(sorted_args).experiments
    routing = suite_config_from_args(build_parser().parse_args(["bench", "--routing", "out/route"]))
    assert routing.routing == "out/route"
    assert routing.experiments == ("plain", "specialized_drafts", "adaptive_routing")  # --routing's default rows


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(experiments=("plain", "beam")), "Unknown experiments"),
    (dict(experiments=("plain", "adaptive_routing")), "needs --routing"),
    (dict(target="some/model"), "need a drafter"),
    (dict(lab="x", target="y"), "either --lab or --target"),
    (dict(decodings=("greedy", "beam")), "greedy and/or sample"),
    (dict(experiments=("sorted",)), "--sorted-exits"),
    (dict(tree=(2, 2, 50)), "max_nodes"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
])
def test_suite_config_rejects_inconsistent_requests(overrides, message):
    with pytest.raises(ValueError, match=message):
        SuiteConfig(**overrides)


def test_lab_dir_without_outputs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a lab output"):
        SuiteConfig(lab=str(tmp_path))


def test_cli_reports_bad_requests_without_a_traceback(capsys):
    assert main(["bench", "--experiments", "beam", "--no-progress"]) == 2
    assert "Unknown experiments" in capsys.readouterr().err
    torch.manual_seed(0)  # leave the global RNG seeded for whoever runs next


def test_greedy_divergences_are_diagnosed_as_ties_or_real_differences():
    """A row that leaves plain greedy is explained: at an exact tie of the top two logits it is float rounding
    (`tie`), anywhere else a real difference."""
    from hf_specdec.bench.experiments import Method
    from hf_specdec.bench.report import main_row
    from hf_specdec.bench.suite import BatchRun, diagnose_mismatches

    target = testing.tiny_causal_lm("llama", vocab_size=64, num_layers=1, seed=0)
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    plain_tokens = target.generate(**batch, max_new_tokens=4, do_sample=False)[:, 3:]
    chosen = int(plain_tokens[0, 2])
    twin = max(set(range(chosen + 1, 64)) - set(plain_tokens[0].tolist()))
    with torch.no_grad():  # `twin` gets the chosen token's LM-head row: an exact tie that argmax resolves to `chosen`
        target.lm_head.weight[twin] = target.lm_head.weight[chosen]
    assert torch.equal(target.generate(**batch, max_new_tokens=4, do_sample=False)[:, 3:], plain_tokens)
    swapped = plain_tokens.clone()
    swapped[0, 2] = twin
    unrelated = plain_tokens.clone()
    with torch.no_grad():
        unrelated[0, 1] = target(torch.cat([batch["input_ids"], plain_tokens[:, :1]], 1)).logits[0, -1].argmin()

    plain = Method("plain", "greedy", None)
    methods = [plain, Method("chain", "greedy", None, drafter="tie"), Method("chain", "greedy", None, drafter="bad")]
    runs = {plain.key: [[BatchRun(1.0, plain_tokens, 4)]], methods[1].key: [[BatchRun(1.0, swapped, 4)]],
            methods[2].key: [[BatchRun(1.0, unrelated, 4)]]}
    (tie,) = diagnose_mismatches(methods[1], methods, runs, {1: [batch]}, target)
    assert tie["position"] == 2 and tie["tie"] and tie["logit_margin"] == 0.0
    (real,) = diagnose_mismatches(methods[2], methods, runs, {1: [batch]}, target)
    assert real["position"] == 1 and not real["tie"] and real["logit_margin"] > 1e-2

    def row(mismatches):
        overall = dict.fromkeys(("tokens_per_second", "speedup", "acceptance_rate", "mean_accepted_length",
                                 "latency_p50", "latency_p95", "loop_efficiency", "theoretical_speedup",
                                 "theoretical_speedup_with_verify_cost"))
        return dict(name="chain", experiment="chain", batch_size=1, decoding="greedy",
                    overall={**overall, "equal_to_plain": False}, greedy_mismatches=mismatches)

    from hf_specdec.bench.report import MAIN_COLUMNS

    equal = MAIN_COLUMNS.index("=greedy")
    assert main_row(row([tie]))[equal] == "tie ×1" and main_row(row([tie, real]))[equal] == "NO"


def test_out_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["bench", "--quick", "--out", str(tmp_path / "suite"), "--no-progress"]) == 2
    assert "hf-specdec[bench]" in capsys.readouterr().err and not (tmp_path / "suite").exists()


def test_compiled_rows_warm_up_every_shape_and_stay_lossless(tmp_path):
    """plain-compiled (transformers' static cache + compile) and compiled (ours) rows: captured once in the
    warm-up, equal to plain greedy, in one interleaved run."""
    exit_code = main(["bench", "--quick", "--prompts", "code", "--max-new-tokens", "8", "--no-progress",
                      "--decoding", "greedy", "--experiments", "plain,plain-compiled,compiled",
                      "--json", str(tmp_path / "report.json")])
    assert exit_code == 0
    (pair,) = json.loads((tmp_path / "report.json").read_text())["pairs"]
    rows = {row["experiment"]: row["overall"] for row in pair["rows"]}
    assert set(rows) == {"plain", "plain-compiled", "compiled"}
    assert rows["compiled"]["equal_to_plain"] is True and rows["plain-compiled"]["equal_to_plain"] is True
