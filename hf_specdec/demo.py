"""`hf-specdec demo`: a Gradio page that streams plain and speculative generation side by side.

The speculative pane colours the tokens that were accepted drafts (the rest came from the target: corrections
and bonus tokens) and shows live tokens/s, α (accepted / drafted) and τ (tokens per
verification round); the plain pane shows tokens/s, and the summary the speed-up and, under greedy decoding,
whether both outputs are identical (they must be: decoding is lossless).

Offline it serves the synthetic pair (`hf_specdec.testing.build_synthetic_pair`), the lab's pair (`--lab DIR`,
written by `recipes/lab.py`) or any target/draft checkpoints (`--target`, `--draft`); every target also gets an
n-gram drafter. Models load on first use and stay cached. Gradio (extra `demo`) is imported only when the page
is built. Usage: docs/demo.md.
"""

from __future__ import annotations

import argparse
import html
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .drafters import ModelDrafter, NGramDrafter
from .drafters.loading import drafter_kind, lab_checkpoints, load_drafter
from .testing import DEFAULT_PAIR_SHAPE, SyntheticTokenizer, build_synthetic_pair

TITLE = "hf_specdec — speculative decoding, live"
DEFAULT_PROMPT = "Speculative decoding: a small model drafts, the large model verifies. "
# The tiny synthetic shape of `--quick`: builds in a second, generates hundreds of tokens per second on a CPU.
QUICK_SHAPE = dict(hidden_size=64, num_layers=4, draft_layers=1, vocab_size=512, intermediate_size=128, num_heads=4,
                   num_kv_heads=2)
DRAFT_COLOUR = (166, 233, 160)  # background of accepted draft tokens; the browser test counts these pixels
NGRAM_DRAFTER = "n-gram (prompt lookup)"
REFRESH_SECONDS = 0.1  # the page re-renders at most this often while a generation streams

CSS = f"""
.hfsd-pane {{ border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 12px; min-height: 12em; }}
.hfsd-pane h3 {{ margin: 0 0 4px 0; }}
.hfsd-stats {{ font-size: 0.95em; margin-bottom: 8px; color: #57606a; }}
.hfsd-stats b {{ color: #1f2328; }}
.hfsd-tokens {{ white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace;
               line-height: 1.7; color: #1f2328; }}
.hfsd-draft {{ background: rgb{DRAFT_COLOUR}; color: #0b3d0b; border-radius: 3px; }}
.hfsd-legend {{ font-size: 0.9em; color: #57606a; }}
.hfsd-summary {{ font-size: 1.05em; padding: 4px 0; }}
"""


# --------------------------------------------------------------------------------------------------------------
# Streaming: what generate() appended, which tokens were accepted drafts, and when
# --------------------------------------------------------------------------------------------------------------


class GenerationCancelled(Exception):
    """Raised from inside generate() (by the streamer) when the page stops listening."""


class Transcript:
    """A streamer for plain and speculative `generate()` that records the generated tokens, which of them were
    accepted draft tokens, and the counters behind live tokens/s, α and τ.

    Both generate() paths put the prompt first; plain generate then puts one target token per step, the
    speculative engine calls `put_speculative` once per verification round (and `put` for a prefill's token).
    generate() runs in a worker thread while the page reads snapshots, hence the lock.
    """

    def __init__(self):
        self.tokens: list[int] = []
        self.spans: list[tuple[int, bool]] = []  # (end, from_draft): consecutive runs of draft / target tokens
        self.drafted = self.accepted = self.rounds = 0
        self.started: float | None = None  # when the prompt was put: generate() has started
        self.last: float | None = None  # when the latest tokens arrived
        self.cancelled = False
        self._lock = threading.Lock()

    # the streamer protocol
    def put(self, value: torch.Tensor) -> None:
        if self.started is None:  # the prompt
            self.started = time.perf_counter()
            return
        self._append(value.reshape(-1).tolist())

    def put_speculative(self, tokens: torch.Tensor, num_from_draft: int, num_drafted: int) -> None:
        self._append(tokens.tolist(), num_from_draft, num_drafted, is_round=True)  # one verification round

    def end(self) -> None:
        """Nothing to do: the worker thread signals the end, errors included (see `stream_generate`)."""

    def _append(self, tokens: list[int], num_from_draft: int = 0, num_drafted: int = 0, is_round: bool = False):
        if self.cancelled:  # unwinds generate() in its thread
            raise GenerationCancelled
        with self._lock:
            self.rounds += is_round
            self.drafted += num_drafted
            self.accepted += num_from_draft
            self._extend(tokens[:num_from_draft], from_draft=True)
            self._extend(tokens[num_from_draft:], from_draft=False)
            self.last = time.perf_counter()

    def _extend(self, tokens: list[int], from_draft: bool) -> None:
        if not tokens:
            return
        self.tokens.extend(tokens)
        if self.spans and self.spans[-1][1] == from_draft:  # merge runs of the same kind
            self.spans[-1] = (len(self.tokens), from_draft)
        else:
            self.spans.append((len(self.tokens), from_draft))

    # live numbers
    def snapshot(self) -> tuple[list[int], list[tuple[int, bool]]]:
        with self._lock:
            return list(self.tokens), list(self.spans)

    @property
    def seconds(self) -> float:
        return 0.0 if self.started is None or self.last is None else self.last - self.started

    @property
    def tokens_per_second(self) -> float:
        """New tokens over wall time from the start of generate() (prefill included) to the latest token."""
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """α = accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ = tokens per verification round, bonus included (as `SpecStats.mean_accepted_length`)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def stream_generate(model, transcript: Transcript, kwargs: dict, render: Callable[[], Any]) -> Iterator[Any]:
    """Run `model.generate(**kwargs, streamer=transcript)` in a worker thread and yield `render()` every
    `REFRESH_SECONDS` meanwhile; `output = yield from stream_generate(...)` gets generate()'s output.

    A thread, because generate() blocks while Gradio needs a generator that yields. If the caller stops
    listening (the browser left), the transcript makes generate() raise, so no orphan generation keeps a core.
    """
    finished, result = threading.Event(), {}

    def work():
        try:
            result["output"] = model.generate(**kwargs, streamer=transcript)
        except BaseException as error:  # noqa: BLE001  (re-raised in the caller's thread)
            result["error"] = error
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="hf-specdec-demo-generate", daemon=True)
    worker.start()
    try:
        while not finished.wait(REFRESH_SECONDS):
            yield render()
    finally:
        transcript.cancelled = not finished.is_set()
        worker.join()
    if "error" in result and not isinstance(result["error"], GenerationCancelled):
        raise result["error"]
    return result.get("output")


# --------------------------------------------------------------------------------------------------------------
# Rendering (escaped HTML)
# --------------------------------------------------------------------------------------------------------------


def split_text(decode: Callable[[list[int]], str], tokens: list[int], ends: list[int]) -> list[str]:
    """The texts of `tokens[previous end:end]`, which add up to exactly `decode(tokens)`.

    Decoding a span alone can be wrong: a multi-byte character or a word's leading space may straddle two spans.
    So each cut is placed where `decode(tokens[:end])` stops agreeing with the full text.
    """
    full = decode(tokens)
    pieces, start = [], 0
    for end in ends:
        cut = len(full) if end >= len(tokens) else max(start, _common_prefix_length(decode(tokens[:end]), full))
        pieces.append(full[start:cut])
        start = cut
    return pieces


def _common_prefix_length(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def render_tokens(decode: Callable[[list[int]], str], tokens: list[int], spans: list[tuple[int, bool]]) -> str:
    """The generated text as HTML: accepted draft tokens in highlighted spans, target tokens as plain text."""
    pieces = split_text(decode, tokens, [end for end, _ in spans])
    parts = [f'<span class="hfsd-draft">{html.escape(piece)}</span>' if from_draft else html.escape(piece)
             for piece, (_, from_draft) in zip(pieces, spans)]
    return f'<div class="hfsd-tokens">{"".join(parts)}</div>'


def render_pane(title: str, transcript: Transcript, decode, *, speculative: bool, spec_stats=None,
                note: str = "") -> str:
    """One side of the page: heading, live numbers, the text. `spec_stats` (a finished run's `SpecStats`) gives
    the exact α and τ; until then they are counted from the stream."""
    tokens, spans = transcript.snapshot()
    numbers = [f"<b>{transcript.tokens_per_second:.1f}</b> tok/s", f"{len(tokens)} tokens",
               f"{transcript.seconds:.2f} s"]
    if speculative:
        alpha, tau = transcript.acceptance_rate, transcript.mean_accepted_length
        if spec_stats is not None:
            alpha, tau = spec_stats.acceptance_rate, spec_stats.mean_accepted_length
        numbers += [f"α <b>{alpha:.2f}</b>", f"τ <b>{tau:.2f}</b>", f"{transcript.rounds} rounds"]
    note_html = f" — {html.escape(note)}" if note else ""
    return (f'<div class="hfsd-pane"><h3>{html.escape(title)}{note_html}</h3>'
            f'<div class="hfsd-stats">{" · ".join(numbers)}</div>{render_tokens(decode, tokens, spans)}</div>')


def render_summary(speculative: Transcript, plain: Transcript, *, greedy: bool, done: bool, message: str = "") -> str:
    """Speed-up and, when both runs are over, whether greedy outputs agree. `data-done` marks the end of a run."""
    parts = [html.escape(message)] if message else []
    if speculative.tokens_per_second and plain.tokens_per_second:
        speedup = speculative.tokens_per_second / plain.tokens_per_second
        parts.append(f"speed-up <b>{speedup:.2f}×</b> ({speculative.tokens_per_second:.1f} vs "
                     f"{plain.tokens_per_second:.1f} tok/s)")
    if done and greedy:
        same = speculative.tokens == plain.tokens
        parts.append("greedy outputs identical ✓" if same else "greedy outputs differ ✗")
    elif done:
        parts.append("sampling: outputs differ from run to run, both follow the target's distribution")
    return f'<div class="hfsd-summary" data-done="{int(done)}">{" · ".join(parts)}</div>'


# --------------------------------------------------------------------------------------------------------------
# Models: the targets on offer, their drafters, loaded on first use
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedTarget:
    model: Any
    tokenizer: Any  # an HF tokenizer or `SyntheticTokenizer`: encode(text) -> ids, decode(ids) -> text
    drafter_models: dict[str, Any] = field(default_factory=dict)  # loaded once, shared by every drafter built on them


DrafterFactory = Callable[[LoadedTarget, int], Any]  # (loaded target, draft length) -> a Drafter


@dataclass
class TargetOption:
    load: Callable[[], LoadedTarget]
    drafters: dict[str, DrafterFactory]


class Catalog:
    """The targets the page offers and the drafters of each; a target is loaded the first time it is used."""

    def __init__(self, options: dict[str, TargetOption]):
        if not options:
            raise ValueError("no target to offer")
        self.options = options
        self._loaded: dict[str, LoadedTarget] = {}

    def target_names(self) -> list[str]:
        return list(self.options)

    def drafter_names(self, target_name: str) -> list[str]:
        return list(self.options[target_name].drafters)

    def target(self, name: str) -> LoadedTarget:
        if name not in self._loaded:
            self._loaded[name] = self.options[name].load()
        return self._loaded[name]

    def drafter(self, target_name: str, drafter_name: str, num_draft_tokens: int):
        """A fresh drafter per call (cheap: the weights are cached), so no state leaks between generations."""
        factory = self.options[target_name].drafters[drafter_name]
        return factory(self.target(target_name), num_draft_tokens)


def _ngram_drafter(loaded: LoadedTarget, num_draft_tokens: int):
    return NGramDrafter(max_ngram=3, num_draft_tokens=num_draft_tokens)


def _checkpoint_drafter(path: str, **model_kwargs) -> DrafterFactory:
    """A drafter saved at `path` (plain, sorted or guided), its weights loaded once."""

    def make(loaded: LoadedTarget, num_draft_tokens: int):
        drafter = load_drafter(path, num_draft_tokens=num_draft_tokens, model=loaded.drafter_models.get(path),
                               **model_kwargs)
        loaded.drafter_models[path] = drafter.model.to(loaded.model.device)
        return drafter

    return make


def synthetic_options(agreements, *, quick: bool, dtype: torch.dtype, device: str) -> dict[str, TargetOption]:
    """One target per agreement rate: the synthetic pair's random Llama, with its draft and an n-gram drafter."""
    shape = QUICK_SHAPE if quick else DEFAULT_PAIR_SHAPE
    size = "tiny" if quick else "206M"
    layers = shape["draft_layers"]
    draft_name = f"draft model ({layers} layer{'s' if layers > 1 else ''})"

    def loader(agreement: float) -> Callable[[], LoadedTarget]:
        def load() -> LoadedTarget:
            target, draft = build_synthetic_pair(agreement, seed=0, dtype=dtype, device=device, **shape)
            return LoadedTarget(target, SyntheticTokenizer(shape["vocab_size"]), {"draft": draft})

        return load

    def draft_drafter(loaded: LoadedTarget, num_draft_tokens: int):
        return ModelDrafter(loaded.drafter_models["draft"], num_draft_tokens=num_draft_tokens)

    return {f"synthetic {agreement:g} ({size})": TargetOption(loader(agreement), {draft_name: draft_drafter,
                                                                                 NGRAM_DRAFTER: _ngram_drafter})
            for agreement in agreements}


def _pretrained_loader(path: str, *, dtype: torch.dtype, device: str) -> Callable[[], LoadedTarget]:
    def load() -> LoadedTarget:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return LoadedTarget(model, AutoTokenizer.from_pretrained(path))

    return load


def lab_options(directory: str | Path, *, dtype: torch.dtype, device: str) -> dict[str, TargetOption]:
    """`DIR/target/` (model + tokenizer) with every drafter saved under `DIR/drafters/<name>/`, plus n-gram."""
    target, checkpoints = lab_checkpoints(directory)
    drafters = {f"{name} ({drafter_kind(path)})": _checkpoint_drafter(path, dtype=dtype)
                for name, path in checkpoints.items()}
    drafters[NGRAM_DRAFTER] = _ngram_drafter
    return {"lab": TargetOption(_pretrained_loader(target, dtype=dtype, device=device), drafters)}


def checkpoint_options(target: str, draft: str | None, *, dtype: torch.dtype, device: str) -> dict[str, TargetOption]:
    """`--target NAME [--draft NAME]`: Hub names or local directories; the tokenizer comes with the target."""
    drafters = {draft: _checkpoint_drafter(draft, dtype=dtype)} if draft else {}
    drafters[NGRAM_DRAFTER] = _ngram_drafter
    return {target: TargetOption(_pretrained_loader(target, dtype=dtype, device=device), drafters)}


def catalog_from_args(args: argparse.Namespace) -> Catalog:
    """The targets given on the command line; the synthetic pair when none is given."""
    if args.draft and not args.target:
        raise ValueError("--draft needs --target (the draft shares the target's tokenizer)")
    dtype = getattr(torch, args.dtype)
    options = {}
    if args.lab:
        options.update(lab_options(args.lab, dtype=dtype, device=args.device))
    if args.target:
        options.update(checkpoint_options(args.target, args.draft, dtype=dtype, device=args.device))
    if not options:
        options = synthetic_options(args.agreement, quick=args.quick, dtype=dtype, device=args.device)
    return Catalog(options)


# --------------------------------------------------------------------------------------------------------------
# One click: speculative and plain generation, one after the other
# --------------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str, device) -> dict[str, torch.Tensor]:
    """Token ids of the prompt, wrapped in the tokenizer's chat template when it has one (instruct models)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


def generation_settings(tokenizer, temperature: float, max_new_tokens: int) -> dict:
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0, pad_token_id=pad_token_id)
    if temperature > 0:
        settings["temperature"] = float(temperature)
    return settings


def compare(catalog: Catalog, prompt: str, target_name: str, drafter_name: str, num_draft_tokens: int,
            temperature: float, max_new_tokens: int, plain_first: bool = False) -> Iterator[tuple[str, str, str]]:
    """Stream (speculative pane, plain pane, summary) HTML while both generations run, in the chosen order.

    Sequential on purpose: run side by side they would share the CPU cores and both tokens/s would be wrong.
    """
    if not prompt or not prompt.strip():
        raise ValueError("Type a prompt first.")
    greedy = temperature <= 0
    runs = {"speculative": Transcript(), "plain": Transcript()}
    stats = {}
    yield "", "", render_summary(runs["speculative"], runs["plain"], greedy=greedy, done=False,
                                 message=f"loading {target_name} …")
    loaded = catalog.target(target_name)
    drafter = catalog.drafter(target_name, drafter_name, int(num_draft_tokens))

    def decode(ids: list[int]) -> str:
        return loaded.tokenizer.decode(ids, skip_special_tokens=True)

    def view(running: str | None = None, done: bool = False):
        notes = {name: "running…" if name == running else "" for name in runs}
        return (render_pane(f"Speculative: {drafter_name}, γ={int(num_draft_tokens)}", runs["speculative"], decode,
                            speculative=True, spec_stats=stats.get("speculative"), note=notes["speculative"]),
                render_pane("Plain generate()", runs["plain"], decode, speculative=False, note=notes["plain"]),
                render_summary(runs["speculative"], runs["plain"], greedy=greedy, done=done))

    inputs = encode_prompt(loaded.tokenizer, prompt, loaded.model.device)
    settings = {**inputs, **generation_settings(loaded.tokenizer, temperature, max_new_tokens)}
    for name in ("plain", "speculative") if plain_first else ("speculative", "plain"):
        extra = dict(assistant_model=drafter, return_dict_in_generate=True) if name == "speculative" else {}
        torch.manual_seed(0)  # the same seed for both runs when sampling
        output = yield from stream_generate(loaded.model, runs[name], {**settings, **extra},
                                            render=lambda name=name: view(running=name))
        if name == "speculative":
            stats[name] = output.spec_stats
    yield view(done=True)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

INTRO = """Type a prompt and press **Generate**: the same target generates it twice, with a drafter (left) and
with plain `generate()` (right). <span class="hfsd-draft">Highlighted</span> text = accepted draft tokens; plain text
came from the target (the first token, corrections, bonus tokens). α = accepted / drafted, τ = tokens per
verification round. The two runs go **one after the other**, never at once, so they do not share the CPU cores and
their tokens/s are comparable. At temperature 0 (greedy) both outputs must be identical: decoding is lossless."""


def build_app(catalog: Catalog, *, num_draft_tokens: int = 5, max_new_tokens: int = 64):
    """The Gradio Blocks of the demo (not launched: see `launch`)."""
    import gradio as gr

    targets = catalog.target_names()

    def drafters_for(target_name: str):
        names = catalog.drafter_names(target_name)
        return gr.Dropdown(choices=names, value=names[0])

    def on_generate(*inputs):
        try:
            yield from compare(catalog, *inputs)
        except ValueError as error:  # bad input or a pair that does not fit: show it, keep the page alive
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="hf_specdec demo", analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(INTRO, elem_classes="hfsd-legend")
        with gr.Row():
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=3, scale=3, elem_id="prompt")
            with gr.Column(scale=2):
                target = gr.Dropdown(targets, value=targets[0], label="Target", elem_id="target")
                drafter = gr.Dropdown(catalog.drafter_names(targets[0]), value=catalog.drafter_names(targets[0])[0],
                                      label="Drafter", elem_id="drafter")
        with gr.Row():
            draft_length = gr.Slider(1, 12, value=num_draft_tokens, step=1, label="Draft length γ",
                                     elem_id="draft-length")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
            new_tokens = gr.Slider(8, 512, value=max_new_tokens, step=8, label="Max new tokens",
                                   elem_id="max-new-tokens")
            plain_first = gr.Checkbox(False, label="Run plain first", elem_id="plain-first")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        summary = gr.HTML(elem_id="summary")
        with gr.Row(equal_height=True):
            speculative_pane = gr.HTML(elem_id="speculative-pane")
            plain_pane = gr.HTML(elem_id="plain-pane")

        target.change(drafters_for, inputs=target, outputs=drafter)
        # one generation at a time, whoever clicks: concurrent runs would share the cores and distort tokens/s
        button.click(on_generate, inputs=[prompt, target, drafter, draft_length, temperature, new_tokens, plain_first],
                     outputs=[speculative_pane, plain_pane, summary], concurrency_limit=1,
                     concurrency_id="generate", show_progress="minimal")
    return app


def launch(app, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True) -> str:
    """Serve the page and return its local URL; `block=True` serves until Ctrl-C, `block=False` returns at once
    (tests: the caller then owns `app.close()`)."""
    # quiet: Gradio's own banner would suggest `share=True` in launch(); here it is --share
    _, local_url, share_url = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                         quiet=True, css=CSS, ssr_mode=False, footer_links=[])
    if block:
        print(f"hf-specdec demo: {local_url}" + (f" (public link: {share_url})" if share_url else ""), flush=True)
        app.block_thread()
    return local_url


# --------------------------------------------------------------------------------------------------------------
# Command line (`hf-specdec demo`)
# --------------------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (default: the synthetic pair)")
    models.add_argument("--quick", action="store_true", help="tiny synthetic pair: builds in a second")
    models.add_argument("--agreement", nargs="+", type=float, default=[0.9, 0.6],
                        help="synthetic pair: one target per draft agreement rate")
    models.add_argument("--lab", metavar="DIR", help="the lab's pair: the output directory of recipes/lab.py")
    models.add_argument("--target", help="target model: Hub name or local dir (its tokenizer is used)")
    models.add_argument("--draft", help="draft model for --target: Hub name or local dir (model, sorted or guided)")
    models.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="model dtype")
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    page = parser.add_argument_group("page")
    page.add_argument("--num-draft-tokens", type=int, default=5, help="initial draft length γ (1-12)")
    page.add_argument("--max-new-tokens", type=int, default=64, help="initial max new tokens")
    page.add_argument("--threads", type=int, help="torch intra-op threads (unset: 1 with --quick, else torch's default)")
    page.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    page.add_argument("--port", type=int, help="port (unset: 7860 or the next free one)")
    page.add_argument("--share", action="store_true", help="also open a temporary public Gradio link")


def build_app_from_args(args: argparse.Namespace):
    """The page `hf-specdec demo` serves for these arguments (raises ValueError on bad ones)."""
    if not 1 <= args.num_draft_tokens <= 12:
        raise ValueError(f"--num-draft-tokens must be in 1..12, got {args.num_draft_tokens}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    catalog = catalog_from_args(args)
    return build_app(catalog, num_draft_tokens=args.num_draft_tokens, max_new_tokens=args.max_new_tokens)


def run_demo_command(args: argparse.Namespace) -> int:
    """Build the page from the arguments and serve it until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('hf-specdec demo needs Gradio: pip install "hf-specdec[demo]"', file=sys.stderr)
        return 2
    try:
        app = build_app_from_args(args)
    except ValueError as error:
        print(f"hf-specdec demo: {error}", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.quick else None)
    if threads:  # tiny models run far faster on one thread than split over several
        torch.set_num_threads(threads)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0
