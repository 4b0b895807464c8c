"""recipes/lab.py with `domains`: the tiny code + prose config runs end to end, every corpus row, block and held-out
prompt keeps its domain, prompts are balanced, the domain drafters load with `load_drafter` and are measured per
domain; domain sources are read robustly; and a lab without domains keeps every stage's settings (so its caches)."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

TINY = ROOT / "recipes" / "configs" / "lab_domains_tiny.yaml"
DOMAINS = ("code", "prose")
DOMAIN_DRAFTERS = ("distill-code", "distill-prose", "distill-all")


def parse(*argv: str):
    import lab

    (args,) = lab.parse_args((lab.LabArguments,), list(argv))
    return args


@pytest.fixture(scope="module")
def domains_lab(tmp_path_factory):
    """The tiny domains lab, built once, without the benchmark."""
    import lab

    output_dir = tmp_path_factory.mktemp("lab-domains") / "out"
    payload = lab.main(["--config", str(TINY), "--output_dir", str(output_dir), "--benchmark", "false"])
    return output_dir, payload


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_rows_and_blocks_carry_their_domain(domains_lab):
    output_dir, payload = domains_lab
    for side in ("train", "heldout"):
        rows = read_jsonl(output_dir / "corpus" / f"{side}.jsonl")
        assert {row["domain"] for row in rows} == set(DOMAINS), side
        assert all(row["path"].startswith(row["domain"] + "/") for row in rows)
    train_paths = {row["path"] for row in read_jsonl(output_dir / "corpus" / "train.jsonl")}
    heldout_paths = {row["path"] for row in read_jsonl(output_dir / "corpus" / "heldout.jsonl")}
    assert not train_paths & heldout_paths
    prose = [row["text"] for row in read_jsonl(output_dir / "corpus" / "train.jsonl") if row["domain"] == "prose"]
    assert not any(text.startswith("Metadata-Version:") for text in prose)  # package metadata: description only

    corpus = payload["stages"]["corpus"]
    assert set(corpus["settings"]["domains"]) == set(DOMAINS) and "text_dir" not in corpus["settings"]
    data = output_dir / "data"
    per_domain = {name: torch.load(data / f"train-{name}.pt") for name in DOMAINS}
    assert torch.equal(torch.load(data / "train.pt"), torch.cat(list(per_domain.values())))
    assert all(len(torch.load(data / f"heldout-{name}.pt")) > 0 for name in DOMAINS)
    assert payload["stages"]["data"]["metrics"]["domains"]["code"]["train_blocks"] == len(per_domain["code"])


def test_prompts_are_balanced_and_labelled_with_their_domain(domains_lab):
    output_dir, _ = domains_lab
    prompts = read_jsonl(output_dir / "heldout.jsonl")
    assert Counter(p["category"] for p in prompts) == {"code": 4, "prose": 4}  # num_prompts 8, two domains
    assert [p["id"] for p in prompts] == [f"heldout-{i:03d}" for i in range(1, 9)]
    assert [p["category"] for p in prompts[:2]] == list(DOMAINS)  # interleaved: any first 2n are balanced
    heldout = {row["path"]: row["domain"] for row in read_jsonl(output_dir / "corpus" / "heldout.jsonl")}
    assert all(heldout[p["source"]] == p["category"] and p["prompt"] for p in prompts)


def test_domain_drafters_train_on_their_domain_and_load(domains_lab):
    from transformers import AutoTokenizer

    from hf_specdec import ModelDrafter
    from hf_specdec.drafters import load_drafter

    output_dir, payload = domains_lab
    assert list(payload["drafters"]) == ["init", *DOMAIN_DRAFTERS]
    vocab = AutoTokenizer.from_pretrained(output_dir / "target").get_vocab()
    for name in DOMAIN_DRAFTERS:
        directory = output_dir / "drafters" / name
        assert isinstance(load_drafter(str(directory), num_draft_tokens=3), ModelDrafter)
        assert AutoTokenizer.from_pretrained(directory).get_vocab() == vocab
        record = payload["drafters"][name]
        assert record["metrics"]["steps"] == 10 and record["settings"]["steps"] == 10  # distill_fkl_steps
    settings = {name: payload["drafters"][name]["settings"]["domains"] for name in DOMAIN_DRAFTERS}
    assert settings == {"distill-code": ["code"], "distill-prose": ["prose"], "distill-all": ["code", "prose"]}


def test_acceptance_is_measured_per_domain(domains_lab):
    output_dir, payload = domains_lab
    acceptance = payload["heldout_acceptance"]
    assert set(acceptance) == {"init", *DOMAIN_DRAFTERS}
    for name, result in acceptance.items():
        assert set(result["domains"]) == set(DOMAINS), name
        assert all(0 <= m["expected_acceptance"] <= 1 for m in result["domains"].values())
        # each domain has as many measured blocks, so the overall number is the domains' mean
        mean = sum(m["expected_acceptance"] for m in result["domains"].values()) / len(DOMAINS)
        assert result["expected_acceptance"] == pytest.approx(mean)
    assert set(payload["target_heldout"]["domains"]) == set(DOMAINS)
    assert payload["domain_acceptance"]["distill-code"] == acceptance["distill-code"]["domains"]
    report = (output_dir / "lab_report.md").read_text()
    assert "## Held-out acceptance per domain" in report and "| distill-prose |" in report
    assert "code E[accept]" in report and "on `prose`: distill-prose is **" in report


def test_second_run_reuses_every_stage(domains_lab):
    import lab

    output_dir, _ = domains_lab
    payload = lab.main(["--config", str(TINY), "--output_dir", str(output_dir), "--benchmark", "false"])
    assert all(record["reused"] for record in payload["stages"].values())
    assert all(record["reused"] for record in payload["drafters"].values())


# ----- reading domain sources ---------------------------------------------------------------------------------


def write_sources(root: Path) -> Path:
    (root / "pkg-1.0.dist-info").mkdir(parents=True)
    (root / "pkg-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pkg\nLicense: MIT\n    Permission is hereby granted, free of charge\n\n"
        "Pkg does useful things.\n\nIt is a package.\n"
    )
    (root / "docs").mkdir()
    (root / "docs" / "guide.txt").write_text("Read this guide.\n\nIt explains everything.\n")
    (root / "docs" / "LICENSE.txt").write_text("Some licence.\n")
    (root / "docs" / "mit.txt").write_text("Permission is hereby granted, free of charge, to any person ...\n")
    (root / "docs" / "headed.md").write_text("<!--\nLicensed under the Apache License, Version 2.0\n-->\n# Tool\n\nA tool.\n")
    (root / "docs" / "blob.txt").write_bytes(b"text\x00with a nul byte\n")
    (root / "docs" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "docs" / "huge.txt").write_text("word " * 400)
    return root


def test_domain_sources_are_read_robustly(tmp_path):
    import lab

    root = write_sources(tmp_path / "src")
    spec = {"sources": [f"{root}/*.dist-info/METADATA", f"{root}/docs/*.txt", f"{root}/docs/*.md", f"{root}/nothing/*"],
            "exclude": ["licen[cs]e*"], "max_file_kb": 1, "max_mb": 1.0, "prompt_start": "paragraph"}
    files, info = lab.select_domain_files("prose", spec)
    texts = dict(files)
    assert set(texts) == {"prose/pkg-1.0.dist-info/METADATA", "prose/guide.txt", "prose/headed.md"}
    assert texts["prose/pkg-1.0.dist-info/METADATA"] == "Pkg does useful things.\n\nIt is a package.\n"
    assert texts["prose/headed.md"].strip() == "# Tool\n\nA tool."  # the licence header dropped, the README kept
    skipped = info["skipped"]
    assert (skipped["excluded"], skipped["licence"], skipped["binary"], skipped["not_utf8"],
            skipped["too_large"]) == (1, 1, 1, 1, 1)
    assert info["sources"][f"{root}/nothing/*"] == 0  # a source this machine lacks is not an error
    with pytest.raises(ValueError, match="Domain 'prose': no usable files"):
        lab.select_domain_files("prose", {**spec, "sources": [f"{root}/nothing/*"]})


def test_placeholders_expand_to_this_pythons_paths():
    import sysconfig

    import lab

    assert lab.expand_source("{stdlib}/**/*.py") == sysconfig.get_paths()["stdlib"] + "/**/*.py"
    assert lab.glob_root("/a/b/*.dist-info/METADATA") == "/a/b"
    with pytest.raises(ValueError, match="unknown placeholder"):
        lab.expand_source("{nowhere}/*.txt")


def test_paragraph_prompts_start_at_sentences_not_headings():
    import lab

    text = "Title\n=====\n\nThis opens a paragraph.\nMore.\n\nProperties\n----------\n\n* item\n\nAnother one here.\n"
    assert [text[i:].split("\n")[0] for i in lab.prompt_starts(text, "paragraph")] == [
        "This opens a paragraph.", "Another one here."]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--domains", '{"all": {"sources": ["x"]}}'], "Domain name 'all'"),
        (["--domains", '{"code": {"sources": ["x"], "size": 1}}'], "keys from"),
        (["--domains", '{"code": {}}'], "needs sources"),
        (["--domains", '{"code": {"sources": ["x"], "prompt_start": "line"}}'], "prompt_start must be one of"),
        (["--domains", '{"a": {"sources": ["x"]}, "b": {"sources": ["y"]}}', "--num_prompts", "5"], "multiple of"),
        (["--domains", '{"code": {"sources": ["x"]}}', "--text_dir", "/tmp"], "either text_dir"),
        (["--drafters", "distill-code"], "exist only with --domains"),
        (["--domains", '{"code": {"sources": ["x"]}}', "--drafters", "distill-prose"], "Unknown drafters"),
    ],
)
def test_bad_domain_settings_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_domains_from_the_command_line_get_defaults():
    args = parse("--domains", '{"code": {"sources": "{stdlib}/**/*.py"}}', "--max_file_kb", "100",
                 "--num_prompts", "4", "--drafters", "init", "distill-code", "distill-all")
    assert args.domains == {"code": {"sources": ["{stdlib}/**/*.py"],
                                     "exclude": ["site-packages", "dist-packages", "__pycache__"],
                                     "max_file_kb": 100, "max_mb": 16.0, "prompt_start": "def"}}
    assert args.wanted_drafters() == ["init", "distill-code", "distill-all"]


# ----- a lab without domains keeps its stage settings -----------------------------------------------------------


@pytest.mark.parametrize("config", ["lab.yaml", "lab_tiny.yaml"])
def test_labs_without_domains_keep_every_stage_setting(config):
    """The settings each stage's key hashes, for the existing configs, exactly as before domains existed (these
    literal dicts are what the lab wrote then): no `domains` key anywhere, so out/lab caches stay valid."""
    import lab
    import yaml

    values = yaml.safe_load((ROOT / "recipes" / "configs" / config).read_text())
    args = parse("--config", str(ROOT / "recipes" / "configs" / config))
    assert args.domains is None
    assert lab.LAB_VERSION == 2  # a bump rebuilds every cache on purpose; then update this test
    key = {"key": "k"}
    records = {"data": key, "init": key, "target": key, "distill-fkl": key}
    files = [("a.py", "x = 1\n")]
    assert lab.corpus_settings(args, files) == {
        "text_dir": str(args.resolved_text_dir), "file_glob": "*.py",
        "exclude_dirs": ["site-packages", "dist-packages", "__pycache__"], "max_file_kb": values.get("max_file_kb", 256),
        "max_corpus_mb": values["max_corpus_mb"], "heldout_fraction": values["heldout_fraction"],
        "content": lab.content_digest(files),
    }
    assert lab.content_digest(files) == "afc521d7035a98c0"  # sha256 of path NUL text NUL, as always
    assert lab.tokenizer_settings(args, key) == {"vocab_size": values["vocab_size"], "corpus": "k"}
    assert lab.data_settings(args, key) == {"block_length": values["block_length"], "seed": 0, "tokenizer": "k"}
    assert lab.prompts_settings(args, key, key) == {
        "num_prompts": values["num_prompts"], "prompt_tokens": [values["prompt_min_tokens"], values["prompt_max_tokens"]],
        "category": "python", "seed": 0, "corpus": "k", "tokenizer": "k"}
    assert lab.target_settings(args, key) == {
        "hidden_size": values["target_hidden_size"], "layers": values["target_layers"], "heads": values["target_heads"],
        "intermediate_size": values["target_intermediate_size"], "steps": values["target_steps"], "max_minutes": None,
        "learning_rate": 0.003, "batch_size": values["batch_size"], "bf16": args.bf16, "seed": 0, "data": "k"}
    assert lab.init_settings(args, key) == {
        "hidden_size": values["draft_hidden_size"], "layers": values["draft_layers"], "heads": values["draft_heads"],
        "intermediate_size": values["draft_intermediate_size"], "seed": 1, "max_positions": 1024, "tokenizer": "k"}
    assert args.wanted_drafters() == list(lab.DRAFTERS)
    shared = {"learning_rate": 0.003, "batch_size": values["draft_batch_size"],
              "train_blocks": values["draft_train_blocks"], "bf16": args.bf16, "seed": 0, "data": "k"}
    distill = {"lmbda": 0.0, "init": "k", "target": "k"}
    adaspec_steps = -(-values["distill_fkl_steps"] * 10 // 4)  # ceil(steps / 0.4)
    assert lab.drafter_settings(args, "distill-fkl", records) == {
        "drafter": "distill-fkl", **shared, "steps": values["distill_fkl_steps"], **distill}
    assert lab.drafter_settings(args, "adaspec", records) == {
        "drafter": "adaspec", **shared, "steps": adaspec_steps, "k": 0.4, **distill, "reference": "k"}
    for name in lab.DRAFTERS[1:]:
        assert "domains" not in lab.drafter_settings(args, name, records)
