"""`hf-specdec generate`: speculative decoding of one prompt in the terminal.

    hf-specdec generate --prompt "def fib(n):"                                  # the synthetic pair, offline
    hf-specdec generate --lab out/lab                                           # the lab's target + best drafter
    echo "Explain KV caches." | hf-specdec generate --target Qwen/Qwen3-1.7B --draft Qwen/Qwen3-0.6B --do-sample

The text streams to stdout as the target accepts it; accepted draft tokens are coloured (on a terminal, or with
`--color always`). A statistics line (tokens/s, α, τ, rounds, drafter) goes to stderr, so piping stdout gives the
text alone. `run_generate(args)` is the whole run without the printing of statistics, for tests and scripts.

torch, transformers and the models are imported inside the functions that use them: building the parser costs
nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# what `--drafter KIND=PATH` accepts
DRAFTER_KINDS = ("model", "sorted", "guided", "eagle3", "ngram", "routed")
SHORT_KINDS = "model=PATH, sorted=PATH, guided=PATH, eagle3=PATH, routed=DIR, ngram[=N]"
CHECKPOINT_KINDS = ("auto", "model", "sorted", "guided", "eagle3")  # kinds whose PATH is a checkpoint (auto: --draft)
# a lab's drafters in order of preference when --lab is given without --drafter: the compute-matched forward-KL
# distillation is the lab's best plain drafter; distill-fkl is its shorter-trained twin
LAB_DEFAULT_DRAFTERS = ("distill-fkl-long", "distill-fkl", "distill-all")
DEFAULT_NGRAM = 3
SYNTHETIC_PROMPT = "Speculative decoding: a small model drafts, the large model verifies. "
DRAFT_STYLE, RESET_STYLE = "\033[32m", "\033[0m"  # green: accepted draft tokens
UNFINISHED_CHARACTER = "\ufffd"  # what a byte-level decode shows for a multi-byte character missing its last bytes


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrafterChoice:
    """What `--draft` / `--drafter` asked for. kind "auto": detect from the checkpoint (`--draft PATH`); "lab": a
    drafter of the `--lab` directory, by name."""

    kind: str
    path: str | None = None


def parse_drafter(text: str) -> DrafterChoice:
    """`--drafter KIND=PATH`, `--drafter ngram[=N]` or, with --lab, `--drafter NAME` (checked once the lab is read)."""
    kind, has_path, path = text.partition("=")
    if kind not in DRAFTER_KINDS:
        if has_path:
            raise argparse.ArgumentTypeError(f"unknown drafter kind {kind!r}; choose one of: {SHORT_KINDS}")
        return DrafterChoice("lab", text)
    if kind == "ngram":
        if path and not (path.isdigit() and int(path) >= 1):
            raise argparse.ArgumentTypeError(f"ngram={path}: N is the longest n-gram matched, a positive integer "
                                             "(e.g. ngram=3)")
        return DrafterChoice("ngram", path or None)
    if not path:
        raise argparse.ArgumentTypeError(f"--drafter {kind} needs a checkpoint: --drafter {kind}=PATH")
    return DrafterChoice(kind, path)


def parse_tree(text: str):
    """`--tree DEPTH,TOP_K,MAX_NODES` -> `TreeConfig`; its own checks (max_nodes fits the tree) become argparse's."""
    parts = text.replace(" ", "").split(",")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected DEPTH,TOP_K,MAX_NODES (three integers, e.g. 5,4,24), got {text!r}")
    from .drafters import TreeConfig

    try:
        return TreeConfig(*(int(part) for part in parts))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (default: the benchmark's synthetic pair, built locally)")
    source = models.add_mutually_exclusive_group()
    source.add_argument("--target", help="target model: Hub name or local dir")
    source.add_argument("--lab", metavar="DIR", help="a recipes/lab.py output: its target and drafters (default "
                        f"drafter: {' or '.join(LAB_DEFAULT_DRAFTERS)} if trained, else the first)")
    drafter = models.add_mutually_exclusive_group()
    drafter.add_argument("--draft", metavar="PATH", help="drafter checkpoint, kind detected (plain, sorted or guided)")
    drafter.add_argument("--drafter", type=parse_drafter, metavar="KIND=PATH",
                         help="a drafter of a given kind: model=, sorted=, guided=PATH (checkpoints), routed=DIR, "
                         "ngram[=N] (prompt lookup, n-grams up to N [3]); with --lab also a lab drafter's name. "
                         "Default: the synthetic pair's draft, the lab's, or ngram with --target")
    models.add_argument("--tokenizer", help="tokenizer (Hub name or dir) when the target has none saved with it")
    models.add_argument("--agreement", type=float, default=0.9,
                        help="synthetic pair: the draft's greedy agreement with the target [0.9]")
    models.add_argument("--pair-shape", choices=("default", "overhead"), default="default",
                        help="synthetic pair: 'default' (206M target) or 'overhead' (3-layer width-64 target, builds "
                        "in a second) [default]")
    models.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype; the drafter follows the target [auto: the checkpoint's]")
    models.add_argument("--device", help="cpu, cuda, cuda:1, ... [cuda when available, else cpu]")

    prompt = parser.add_argument_group("prompt (default: stdin when it is not a terminal; --lab: its first held-out "
                                       "prompt)")
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--system", help="system message for the chat template")
    prompt.add_argument("--no-chat-template", action="store_true",
                        help="encode the prompt as is, even if the tokenizer has a chat template")

    sampling = parser.add_argument_group("decoding, as in generate() (unset: the model's generation_config)")
    sampling.add_argument("--max-new-tokens", type=positive_int, default=128, help="[128]")
    sampling.add_argument("--do-sample", action=argparse.BooleanOptionalAction, help="sample; --no-do-sample: greedy")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--seed", type=int, help="seed torch, numpy and random before generating")

    speculative = parser.add_argument_group("speculative decoding")
    speculative.add_argument("--num-draft-tokens", type=positive_int, default=5, help="γ, tokens drafted per round [5]")
    speculative.add_argument("--tree", type=parse_tree, metavar="DEPTH,TOP_K,MAX_NODES",
                             help="draft EAGLE-2-style trees instead of chains, e.g. 5,4,24")
    speculative.add_argument("--schedule", choices=("constant", "heuristic", "auto"), default="constant",
                             help="draft length: constant γ; heuristic (+2 after a fully accepted round, -1 else); "
                             "auto (the length, 0 included, that maximises measured tokens/s) [constant]")

    output = parser.add_argument_group("output")
    output.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour accepted draft tokens [auto: when stdout is a terminal and NO_COLOR is unset]")
    output.add_argument("--no-stream", action="store_true", help="print the text once generation is over")


# --------------------------------------------------------------------------------------------------------------
# Streaming to the terminal
# --------------------------------------------------------------------------------------------------------------


class TerminalStreamer:
    """A `generate()` streamer that writes the new text as it arrives, accepted draft tokens marked in colour.

    Like transformers' `TextStreamer(skip_prompt=True)` it skips the first `put` (the prompt) and decodes the whole
    generated id list on every call, writing only the new suffix: a piece that merges with its neighbours (BPE) or
    a multi-byte character split over tokens decodes right. A character still missing bytes waits for them, so
    it is written, and coloured, with the span of tokens that completes it. Unlike TextStreamer it does not hold
    text back until a space: the synthetic pair's output has none.

    The engine calls `put_speculative(tokens, num_from_draft, num_drafted)` each round: the leading
    `num_from_draft` tokens were accepted draft tokens, the rest came from the target (correction or bonus token).
    Plain decoding (schedule="auto" may switch to it) calls `put` with the target's tokens.
    """

    def __init__(self, decode, out: TextIO, color: bool):
        self.decode, self.out, self.color = decode, out, color
        self.tokens: list[int] = []
        self.written = 0  # characters of decode(tokens) already written
        self.prompt_skipped = False
        self.last_from_draft = False

    def put(self, value) -> None:
        if not self.prompt_skipped:
            self.prompt_skipped = True
            return
        self._write(value.reshape(-1).tolist(), from_draft=False)

    def put_speculative(self, tokens, num_from_draft: int, num_drafted: int) -> None:
        ids = tokens.reshape(-1).tolist()
        self._write(ids[:num_from_draft], from_draft=True)
        self._write(ids[num_from_draft:], from_draft=False)

    def end(self) -> None:
        text = self.decode(self.tokens)
        self._emit(text[self.written:], self.last_from_draft)  # characters that never got their last bytes
        self.written = len(text)
        if not text.endswith("\n"):
            self.out.write("\n")
        self.out.flush()

    def _write(self, ids: list[int], from_draft: bool) -> None:
        if not ids:
            return
        self.tokens.extend(ids)
        self.last_from_draft = from_draft
        text = self.decode(self.tokens)
        complete = len(text.rstrip(UNFINISHED_CHARACTER))
        if complete > self.written:
            self._emit(text[self.written:complete], from_draft)
            self.written = complete
            self.out.flush()

    def _emit(self, text: str, from_draft: bool) -> None:
        if text:
            self.out.write(f"{DRAFT_STYLE}{text}{RESET_STYLE}" if from_draft and self.color else text)


def use_color(choice: str, out: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    return "NO_COLOR" not in os.environ and hasattr(out, "isatty") and out.isatty()  # no-color.org


# --------------------------------------------------------------------------------------------------------------
# Loading: target, tokenizer, drafter
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    target: Any
    tokenizer: Any  # an HF tokenizer or the synthetic pair's byte tokenizer: encode / decode
    drafter: Any
    drafter_name: str


def requested_drafter(args) -> DrafterChoice | None:
    return DrafterChoice("auto", args.draft) if args.draft else args.drafter


def check_arguments(args) -> None:
    """Refuse what can be refused before a model loads (a big target takes minutes)."""
    choice = requested_drafter(args)
    if args.lab:
        from .drafters import lab_checkpoints

        lab_checkpoints(args.lab)  # says what a lab directory looks like
    elif args.target:
        checkpoint_location(args.target, "--target")
    elif args.tokenizer or (choice is not None and choice.kind != "ngram"):
        raise ValueError("the synthetic pair (no --target, no --lab) has its own byte tokenizer and draft: other "
                         "drafters and --tokenizer need --target or --lab (--drafter ngram works with it)")
    if choice is not None and choice.kind == "lab" and not args.lab:
        raise ValueError(f"unknown drafter {choice.path!r}: choose a kind ({SHORT_KINDS}), or give --lab DIR and "
                         "name one of its drafters")
    if choice is not None and choice.kind in CHECKPOINT_KINDS:
        checkpoint_location(choice.path, _drafter_flag(choice.kind))


def _drafter_flag(kind: str) -> str:
    return "--draft" if kind == "auto" else f"--drafter {kind}="


def default_prompt(args) -> str | None:
    """The prompt when none is given: the lab's first held-out prompt, the synthetic pair's fixed one; a --target
    has none (a model's answer to a made-up prompt says nothing)."""
    if args.lab:
        return _first_heldout_prompt(Path(args.lab))
    return None if args.target else SYNTHETIC_PROMPT


def load_everything(args: argparse.Namespace) -> Loaded:
    """Tokenizer first: it loads in a moment and may be missing, the target may take minutes."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.lab:
        return _load_lab(args, dtype, device)
    if args.target:
        target_path = checkpoint_location(args.target, "--target")
        tokenizer = load_tokenizer([args.tokenizer or target_path], target_path)
        target = _load_target(target_path, dtype, device)
        drafter, name = make_drafter(requested_drafter(args) or DrafterChoice("ngram"), args, target)
        return Loaded(target, tokenizer, drafter, name)
    return _load_synthetic(args, dtype, device)


def checkpoint_location(name_or_path: str, flag: str) -> str:
    """A local directory (checked now, so a typo is not sent to the Hub) or a Hub name (loaded as is)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag} {name_or_path} has no config.json: pass a directory written by "
                             "save_pretrained(), or a Hub name")
        return str(path)
    # a Hub name is `model` or `owner/model`; anything else that does not exist is a mistyped local path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise ValueError(f"{flag} {name_or_path}: no such directory; check the path (or pass a Hub name, owner/model)")
    return name_or_path


def _load_target(name_or_path: str, dtype, device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as error:
        raise ValueError(f"cannot load the target {name_or_path}: {error}") from None
    return model.to(device).eval()


def load_tokenizer(sources: list[str], target_path: str):
    """The first of `sources` that holds a tokenizer."""
    from transformers import AutoTokenizer

    reasons = []
    for source in sources:
        try:
            return AutoTokenizer.from_pretrained(source)
        except OSError as error:  # not on the Hub, or the Hub out of reach: worth saying which
            reasons.append(f" ({str(error).splitlines()[0]})")
        except (ValueError, TypeError):  # a folder without tokenizer files (transformers blames sentencepiece)
            continue
    raise ValueError(f"no tokenizer found in {' or '.join(sources)}{''.join(reasons)}: pass --tokenizer "
                     f"NAME_OR_DIR (the tokenizer {target_path} was trained with), or save one next to the model "
                     "with tokenizer.save_pretrained()")


def _load_lab(args, dtype, device) -> Loaded:
    from .drafters import lab_checkpoints

    root = Path(args.lab)
    target_path, lab_drafters = lab_checkpoints(root)
    # recipes/lab.py saves the tokenizer next to the target; older or hand-made labs may only have DIR/tokenizer
    tokenizer = load_tokenizer([args.tokenizer] if args.tokenizer else [target_path, str(root / "tokenizer")],
                               target_path)
    choice = requested_drafter(args) or _lab_default_drafter(lab_drafters)
    if choice.kind == "lab" and choice.path not in lab_drafters:
        raise ValueError(f"{args.lab} has no drafter {choice.path!r}; its drafters: "
                         f"{', '.join(lab_drafters) or 'none'} (or a kind: {SHORT_KINDS})")
    target = _load_target(target_path, dtype, device)
    if choice.kind != "lab":
        drafter, drafter_name = make_drafter(choice, args, target)
        return Loaded(target, tokenizer, drafter, drafter_name)
    drafter, kind = checkpoint_drafter("auto", lab_drafters[choice.path], args, target)
    return Loaded(target, tokenizer, drafter, f"{choice.path} ({kind})")


def _lab_default_drafter(lab_drafters: dict[str, str]) -> DrafterChoice:
    preferred = [name for name in LAB_DEFAULT_DRAFTERS if name in lab_drafters] + list(lab_drafters)
    return DrafterChoice("lab", preferred[0]) if preferred else DrafterChoice("ngram")


def _first_heldout_prompt(root: Path) -> str | None:
    """The first prompt of the lab's `heldout.jsonl` (one {"id", "category", "prompt", "source"} per line)."""
    import json

    path = root / "heldout.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            return json.loads(line)["prompt"]
    return None


def _load_synthetic(args, dtype, device) -> Loaded:
    import torch

    from . import testing
    from .drafters import ModelDrafter

    target, draft = testing.build_synthetic_pair(args.agreement, dtype=torch.float32 if dtype == "auto" else dtype,
                                                 device=device, **testing.PAIR_SHAPES[args.pair_shape])
    tokenizer = testing.SyntheticTokenizer(target.config.vocab_size)
    if args.drafter:  # n-gram: check_arguments refused the others
        drafter, name = make_drafter(args.drafter, args, target)
    else:
        drafter = ModelDrafter(draft, **_drafter_settings(args))
        name = f"synthetic draft ({len(draft.model.layers)} layer of {len(target.model.layers)})"
    return Loaded(target, tokenizer, drafter, name)


def _drafter_settings(args) -> dict:
    return dict(num_draft_tokens=args.num_draft_tokens, tree=args.tree, schedule=args.schedule)


def make_drafter(choice: DrafterChoice, args, target) -> tuple[Any, str]:
    """The drafter `choice` names (not a lab's: `_load_lab` resolves those) and its name in the statistics."""
    if choice.kind == "ngram":
        from .drafters import NGramDrafter

        max_ngram = int(choice.path or DEFAULT_NGRAM)
        return NGramDrafter(max_ngram=max_ngram, **_drafter_settings(args)), f"ngram (n ≤ {max_ngram})"
    if choice.kind == "routed":
        return _routed_drafter(choice.path, args, target), f"routed ({choice.path})"
    drafter, kind = checkpoint_drafter(choice.kind, choice.path, args, target)
    return drafter, f"{choice.path} ({kind})"


def checkpoint_drafter(kind: str, name_or_path: str, args, target) -> tuple[Any, str]:
    """A plain, sorted, guided or EAGLE-3 drafter from a checkpoint; `kind` "auto" takes what the checkpoint holds, "model"
    also drafts with a sorted checkpoint's full depth."""
    from .drafters import ModelDrafter, drafter_kind, load_drafter, load_drafter_model

    path = checkpoint_location(name_or_path, _drafter_flag(kind))
    try:
        found = drafter_kind(path)
    except OSError as error:
        raise ValueError(f"cannot read the drafter {name_or_path}: {error}") from None
    kind = found if kind == "auto" else kind
    if kind != found and (kind, found) != ("model", "sorted"):
        raise ValueError(f"{name_or_path} holds a {found} drafter, not a {kind} one: use --drafter {found}="
                         f"{name_or_path} or --draft {name_or_path} (detects the kind)")
    model = load_drafter_model(path, found, dtype=target.dtype).to(target.device)
    if kind == "model":
        return ModelDrafter(model, **_drafter_settings(args)), kind
    return load_drafter(path, model=model, **_drafter_settings(args)), kind


def _routed_drafter(directory: str, args, target):
    try:
        from .drafters.routed import RoutedDrafter
    except ImportError as error:
        raise ValueError(f"--drafter routed needs hf_specdec.drafters.routed, which this installation lacks "
                         f"({error}); upgrade hf-specdec") from None
    if args.schedule != "constant":
        raise ValueError("--schedule applies to one drafter; a routed drafter's members draft num_draft_tokens each "
                         "(drop --schedule)")
    model_kwargs = dict(dtype=target.dtype)
    if target.device.type != "cpu":
        model_kwargs["device_map"] = target.device
    return RoutedDrafter.from_pretrained(directory, num_draft_tokens=args.num_draft_tokens, tree=args.tree,
                                         **model_kwargs)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    prompt: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the generated text (plain, without colour)
    stats: Any  # hf_specdec.SpecStats
    seconds: float  # wall time of generate(), prefill included
    drafter_name: str
    color: bool

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else 0.0


def read_prompt(args, stdin: TextIO | None, default: str | None) -> str:
    """--prompt, else stdin when it is not a terminal (and not empty), else the default (lab / synthetic pair)."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give the text to continue")
        return args.prompt
    if stdin is not None and not stdin.isatty():
        text = stdin.read()
        if text.strip():
            return text.rstrip("\n")  # the newline `echo` adds is not part of the prompt
    if default is None:
        raise ValueError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    return default


def encode_prompt(tokenizer, prompt: str, system: str | None, chat_template: bool) -> list[int]:
    """Prompt ids, wrapped in the tokenizer's chat template when it has one (instruction-tuned models)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
    if system:
        raise ValueError("--system needs a chat template: this tokenizer has none (or --no-chat-template is set); "
                         "put the instructions in the prompt instead")
    return tokenizer.encode(prompt)


def generation_kwargs(args, tokenizer) -> dict:
    """generate() settings: the flags given; the ones left unset keep the model's generation_config."""
    settings = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    for name in ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:  # else generate() warns that it falls back to EOS, every run
        settings["pad_token_id"] = pad
    return settings


def run_generate(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> GenerateResult:
    """Load, generate with streaming, return the ids and statistics (raises ValueError on bad arguments)."""
    import torch

    stdout = stdout if stdout is not None else sys.stdout
    stdin = stdin if stdin is not None else sys.stdin
    check_arguments(args)
    prompt = read_prompt(args, stdin, default_prompt(args))
    loaded = load_everything(args)
    prompt_ids = encode_prompt(loaded.tokenizer, prompt, args.system, not args.no_chat_template)
    color = use_color(args.color, stdout)
    out = io.StringIO() if args.no_stream else stdout
    streamer = TerminalStreamer(lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True), out, color)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.target.device)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    start = time.perf_counter()
    output = loaded.target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    assistant_model=loaded.drafter, streamer=streamer,
                                    **generation_kwargs(args, loaded.tokenizer))
    seconds = time.perf_counter() - start
    if args.no_stream:
        stdout.write(out.getvalue())
        stdout.flush()
    new_ids = output.sequences[0, len(prompt_ids):].tolist()
    return GenerateResult(prompt, prompt_ids, new_ids, loaded.tokenizer.decode(new_ids, skip_special_tokens=True),
                          output.spec_stats, seconds, loaded.drafter_name, color)


def format_stats(result: GenerateResult) -> list[str]:
    """The statistics line, plus one line per drafter when a routed drafter reports them."""
    stats = result.stats
    rounds = int(stats.rounds.sum())
    # no verification round: schedule="auto" kept to plain decoding (or one token was asked of a drafter that reads
    # the target's prefill states: the prefill chose it)
    acceptance = (f"α {stats.acceptance_rate:.2f} · τ {stats.mean_accepted_length:.2f} · {rounds} "
                  f"round{'s' * (rounds > 1)}" if rounds else "α – · τ – · 0 rounds (plain decoding)")
    line = (f"[hf-specdec] {len(result.new_ids)} new tokens · {result.seconds:.2f} s · "
            f"{result.tokens_per_second:.1f} tokens/s · {acceptance} · drafter {result.drafter_name}")
    if result.color:
        line += f" · {DRAFT_STYLE}green{RESET_STYLE}: accepted draft tokens"
    lines = [line]
    for name, entry in (getattr(stats, "per_drafter", None) or {}).items():
        if isinstance(entry, dict):
            lines.append(f"[hf-specdec]   {name}: " + " · ".join(_stat(key, value) for key, value in entry.items()))
        else:  # a counter of the routing policy (e.g. switches)
            lines.append(f"[hf-specdec]   {name}: {entry}")
    return lines


def _stat(key: str, value) -> str:
    label = {"alpha": "α", "tau": "τ"}.get(key, key)
    return f"{label} {value:.2f}" if isinstance(value, float) else f"{label} {value}"


def run_generate_command(args: argparse.Namespace) -> int:
    try:
        result = run_generate(args)
    except ValueError as error:
        print(f"hf-specdec generate: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    sys.stdout.flush()  # the text before the statistics, where both go to one terminal
    for line in format_stats(result):
        print(line, file=sys.stderr)
    return 0
