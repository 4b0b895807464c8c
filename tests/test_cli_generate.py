"""`hf-specdec generate`: the terminal streamer's draft marking, lossless greedy output through the command line,
prompts from flags / stdin / a lab, the drafter kinds, and the errors that say what to do."""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_specdec import Eagle3DraftModel, cli, generate_cli, testing
from hf_specdec.generate_cli import DRAFT_STYLE, RESET_STYLE, TerminalStreamer
from hf_specdec.testing import SyntheticTokenizer, character_tokenizer, tiny_causal_lm

VOCAB = 96  # character_tokenizer's ids: pad/bos/eos + 93 printable characters
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


class TerminalInput(io.StringIO):
    """stdin as an interactive terminal: the command must not wait for it."""

    def isatty(self):
        return True


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """target/ (with a character tokenizer), draft/ (another random model), chat_tokenizer/ (with a template)."""
    root = tmp_path_factory.mktemp("models")
    tiny_causal_lm(vocab_size=VOCAB, num_layers=2, seed=0, eos_token_id=None).save_pretrained(root / "target")
    character_tokenizer(VOCAB).save_pretrained(root / "target")
    tiny_causal_lm(vocab_size=VOCAB, num_layers=1, seed=1).save_pretrained(root / "draft")
    target_config = tiny_causal_lm(vocab_size=VOCAB, num_layers=2, seed=0).config
    Eagle3DraftModel.from_target(target_config, aux_hidden_state_layer_ids=[0, 1, 2]).save_pretrained(root / "head")
    chat = character_tokenizer(VOCAB)
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(root / "chat_tokenizer")
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """What recipes/lab.py writes: target/ with its tokenizer, drafters/<name>/, heldout.jsonl."""
    root = tmp_path_factory.mktemp("lab")
    tiny_causal_lm(vocab_size=VOCAB, num_layers=2, seed=0, eos_token_id=None).save_pretrained(root / "target")
    character_tokenizer(VOCAB).save_pretrained(root / "target")
    for name, seed in (("init", 3), ("distill-fkl", 1)):
        tiny_causal_lm(vocab_size=VOCAB, num_layers=1, seed=seed).save_pretrained(root / "drafters" / name)
    soft = tiny_causal_lm(vocab_size=VOCAB, num_layers=2, seed=2)
    soft.config.sorted_exits = [1, 2]
    soft.save_pretrained(root / "drafters" / "soft")
    prompts = [{"id": "heldout-001", "category": "python", "prompt": "def area(r): return 3.14*r*r", "source": "a.py"},
               {"id": "heldout-002", "category": "python", "prompt": "class Point:", "source": "b.py"}]
    (root / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def parse(*argv):
    parser = argparse.ArgumentParser()
    generate_cli.add_generate_arguments(parser)
    return parser.parse_args([str(arg) for arg in argv])


def generate(*argv, stdin=None):
    """run_generate with colour off and an interactive stdin unless given: (result, what it printed)."""
    stdout = io.StringIO()
    result = generate_cli.run_generate(parse("--color", "never", *argv), stdin=stdin or TerminalInput(),
                                       stdout=stdout)
    return result, stdout.getvalue()


def plain_greedy(model_dir, prompt_ids, max_new_tokens):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.tensor([prompt_ids])
    out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


# ---------------------------------------------------------------------------------------------------- streamer

PIECES = {10: "Hel", 11: "lo", 12: ",", 13: " wor", 14: "ld"}


def fake_decode(ids):
    return "".join(PIECES[i] for i in ids)


def stream(color):
    out = io.StringIO()
    streamer = TerminalStreamer(fake_decode, out, color=color)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    streamer.put_speculative(torch.tensor([10, 11, 12]), 2, 4)  # "Hel" "lo" accepted drafts, "," the target's
    streamer.put_speculative(torch.tensor([13]), 0, 4)  # nothing accepted: the target's correction
    streamer.put(torch.tensor([14]))  # plain decoding (schedule="auto" may switch to it): target tokens
    streamer.end()
    return out.getvalue()


def test_streamer_colours_exactly_the_accepted_draft_spans():
    assert stream(color=True) == f"{DRAFT_STYLE}Hello{RESET_STYLE}, world\n"


def test_streamer_without_colour_writes_the_plain_text():
    assert stream(color=False) == "Hello, world\n"


def test_streamer_waits_for_the_last_byte_of_a_character():
    tokenizer = SyntheticTokenizer(512)  # one token per UTF-8 byte
    first, second = tokenizer.encode("é")
    out = io.StringIO()
    streamer = TerminalStreamer(tokenizer.decode, out, color=True)
    streamer.put(torch.tensor([[5]]))
    streamer.put_speculative(torch.tensor(tokenizer.encode("a") + [first]), 2, 2)
    assert out.getvalue() == f"{DRAFT_STYLE}a{RESET_STYLE}"  # half of "é" is not printed as "�"
    streamer.put_speculative(torch.tensor([second] + tokenizer.encode("b")), 0, 2)
    streamer.end()
    assert out.getvalue() == f"{DRAFT_STYLE}a{RESET_STYLE}éb\n"  # "é" belongs to the span that completed it


# ---------------------------------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("drafter", [
    ["--draft", "{models}/draft"],
    ["--drafter", "model={models}/draft", "--tree", "3,2,6"],
    ["--drafter", "ngram"],
    ["--drafter", "ngram=2", "--schedule", "heuristic"],
    ["--drafter", "eagle3={models}/head", "--tree", "3,2,6"],
    ["--draft", "{models}/head"],  # the kind is read off the checkpoint
])
def test_greedy_output_equals_plain_generate(models, drafter):
    drafter = [arg.format(models=models) for arg in drafter]
    result, printed = generate("--target", models / "target", *drafter, "--prompt", "abc abc abc",
                               "--max-new-tokens", 24, "--no-do-sample")
    assert len(result.new_ids) == 24
    assert result.new_ids == plain_greedy(models / "target", result.prompt_ids, 24)
    assert printed == result.text + "\n"


def test_prompt_from_stdin_and_chat_template(models):
    result, _ = generate("--target", models / "target", "--drafter", "ngram", "--max-new-tokens", 4,
                         stdin=io.StringIO("abc abc\n"))
    tokenizer = character_tokenizer(VOCAB)
    assert result.prompt == "abc abc" and result.prompt_ids == tokenizer.encode("abc abc")

    chat = ["--target", models / "target", "--tokenizer", models / "chat_tokenizer", "--drafter", "ngram",
            "--max-new-tokens", 4, "--prompt", "hi"]
    result, _ = generate(*chat, "--system", "be brief")
    assert result.prompt_ids == tokenizer.encode("s:be brief|u:hi|a:")
    result, _ = generate(*chat, "--no-chat-template")
    assert result.prompt_ids == tokenizer.encode("hi")


def test_lab_directory_with_no_other_flags(lab):
    result, printed = generate("--lab", lab)  # interactive stdin: the lab's first held-out prompt
    assert result.prompt == "def area(r): return 3.14*r*r"
    assert result.drafter_name == "distill-fkl (model)"  # distill-fkl-long is not in this lab
    assert len(result.new_ids) == 128 and printed == result.text + "\n"
    assert result.new_ids[:24] == plain_greedy(lab / "target", result.prompt_ids, 24)

    result, _ = generate("--lab", lab, "--drafter", "soft", "--max-new-tokens", 8)
    assert result.drafter_name == "soft (sorted)"
    assert result.new_ids == plain_greedy(lab / "target", result.prompt_ids, 8)


def test_synthetic_pair_without_model_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPECDEC_CACHE", str(tmp_path))
    # calibration is test_bench's subject; here any residual scale will do
    monkeypatch.setattr(testing, "_calibrate_residual_scale", lambda *args, **kwargs: 0.5)
    result, printed = generate("--pair-shape", "overhead", "--max-new-tokens", 12)
    assert result.prompt == generate_cli.SYNTHETIC_PROMPT
    assert result.drafter_name.startswith("synthetic draft")
    assert len(result.new_ids) == 12 and printed == result.text + "\n"


# ---------------------------------------------------------------------------------------------------- the command


def test_stats_line_and_colour(models, capsys):
    # the target drafting for itself: every draft token is accepted, so the text is coloured
    argv = ["generate", "--target", models / "target", "--drafter", f"model={models / 'target'}", "--prompt", "abc",
            "--max-new-tokens", 12, "--color", "always"]
    assert cli.main([str(arg) for arg in argv]) == 0
    out, err = capsys.readouterr()
    assert DRAFT_STYLE in out and out.endswith("\n")
    stats = err.strip().splitlines()[-1]
    for expected in ("12 new tokens", "tokens/s", "α 1.00", "τ ", "rounds", "drafter"):
        assert expected in stats, (expected, stats)


def test_stats_lines_per_routed_drafter():
    stats = SimpleNamespace(acceptance_rate=0.5, mean_accepted_length=2.5, rounds=torch.tensor([4]),
                            per_drafter={"code": {"rows": 1, "alpha": 0.5, "tau": 2.5}, "switches": 0})
    result = generate_cli.GenerateResult("p", [1], [5] * 10, "t", stats, 2.0, "routed (dir)", color=False)
    main, code, switches = generate_cli.format_stats(result)
    assert "10 new tokens" in main and "5.0 tokens/s" in main and "α 0.50" in main and "τ 2.50" in main
    assert code.endswith("code: rows 1 · α 0.50 · τ 2.50") and switches.endswith("switches: 0")


@pytest.mark.parametrize("argv, message", [
    (["--drafter", "medusa=heads"], "unknown drafter kind 'medusa'; choose one of: model=PATH, sorted=PATH"),
    (["--drafter", "sorted"], "--drafter sorted needs a checkpoint: --drafter sorted=PATH"),
    (["--drafter", "ngram=x"], "N is the longest n-gram"),
    (["--tree", "5,4"], "expected DEPTH,TOP_K,MAX_NODES"),
    (["--tree", "2,2,100"], "max_nodes"),
    (["--target", "a", "--lab", "b"], "not allowed with argument"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--target", "/nonexistent/target"], "no such directory"),
    (["--target", "{models}/target", "--draft", "./missing-draft"], "--draft ./missing-draft: no such directory"),
    (["--target", "{models}/draft", "--prompt", "x"], "no tokenizer found"),
    (["--target", "{models}/target", "--drafter", "soft"], "unknown drafter 'soft'"),
    (["--target", "{models}/target"], "pass --prompt TEXT or pipe the prompt on stdin"),
    (["--target", "{models}/target", "--drafter", "sorted={models}/draft", "--prompt", "x"],
     "holds a model drafter, not a sorted one"),
    (["--target", "{models}/target", "--prompt", "x", "--system", "hi"], "--system needs a chat template"),
    (["--lab", "{models}/draft"], "not a lab directory"),
    (["--draft", "{models}/draft"], "other drafters and --tokenizer need --target or --lab"),
])
def test_bad_setups_exit_with_a_message(models, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", TerminalInput())
    argv = [arg.format(models=models) for arg in argv]
    assert cli.main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("hf-specdec generate: ") and message in err, err


def test_routed_drafter_missing_module_says_so(models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_specdec.drafters.routed", None)  # an installation without it
    assert cli.main(["generate", "--target", str(models / "target"), "--drafter", "routed=x", "--prompt", "x"]) == 2
    assert "--drafter routed needs hf_specdec.drafters.routed" in capsys.readouterr().err


def test_python_dash_m_entry_point(models):
    command = [sys.executable, "-m", "hf_specdec", "generate", "--target", str(models / "target"), "--drafter",
               "ngram", "--max-new-tokens", "6", "--seed", "0"]
    done = subprocess.run(command, check=False, input="abc abc", capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n") and "\033[" not in done.stdout  # a pipe: no colour
    assert "6 new tokens" in done.stderr and "drafter ngram" in done.stderr
