"""`hf-specdec` command line: `hf-specdec bench|demo|generate [options]` (also `python -m hf_specdec ...`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def _numbers(kind):
    """Parse "1,4,8" or "1 4 8" (argparse collects the latter) into a tuple of `kind`."""

    def parse(text: str):
        return tuple(kind(part) for part in text.replace(",", " ").split())

    return parse


def _flatten(values):
    return None if values is None else tuple(item for group in values for item in group)


def _drafter_pair(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH_OR_HUB_NAME, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-specdec", description="Speculative decoding for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(commands.add_parser(
        "bench",
        help="benchmark suite: plain, transformers-assisted and hf_specdec decoding side by side, by prompt category",
        description="Time plain generate, transformers' assisted generation and hf_specdec (chains, trees, n-grams, "
        "every drafter, draft-length and batch-size sweeps, greedy and sampling) on prompt sets by category. "
        "Default pair: a synthetic ~206M-parameter target and a one-layer draft built locally (nothing is "
        "downloaded); --lab uses a recipes/lab.py output; --target/--draft any Hub or local models. "
        "See docs/benchmark.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    ))
    demo = commands.add_parser(
        "demo", help="a web page that streams plain and speculative generation side by side (needs the demo extra)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    try:
        from .demo import add_demo_arguments
    except ImportError:  # the demo extra is not installed; `hf-specdec demo` says how to get it
        demo.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    else:
        add_demo_arguments(demo)
    from .generate_cli import add_generate_arguments

    add_generate_arguments(commands.add_parser(
        "generate",
        help="speculative decoding of one prompt, streamed to the terminal with accepted draft tokens coloured",
        description="Generate from --prompt (or stdin) with a target and a drafter, streaming the text; accepted "
        "draft tokens are coloured on a terminal. A statistics line (tokens/s, α, τ, rounds) goes to stderr. "
        "Default pair: the benchmark's synthetic pair, built locally (its output is token ids, not prose); --lab "
        "uses a recipes/lab.py output; --target/--draft any Hub or local models.",
    ))
    return parser


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from .bench import EXPERIMENTS

    pair = bench.add_argument_group("models")
    pair.add_argument("--target", help="target model: Hub name or local dir (default: the synthetic pair)")
    pair.add_argument("--draft", help="draft model (Hub name or local dir), named 'draft' in the tables")
    pair.add_argument("--drafter", action="append", type=_drafter_pair, metavar="NAME=PATH",
                      help="add a named drafter checkpoint (plain, sorted, guided or an EAGLE-3 head; repeatable)")
    pair.add_argument("--lab", help="a recipes/lab.py output dir: its target and every drafter it trained")
    pair.add_argument("--routing", help="a recipes/route.py output dir (routing.json + router): the drafters and "
                      "router of the specialized_drafts and adaptive_routing experiments")
    pair.add_argument("--agreement", nargs="+", type=_numbers(float), help="synthetic pair agreement rates [0.9]")
    pair.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype [float32]")
    pair.add_argument("--device", help="cpu, cuda, cuda:1, ... [cpu]")
    what = bench.add_argument_group("what to run")
    what.add_argument("--prompts", nargs="+",
                      help="built-in categories (chat code math summarization qa translation rag) and/or JSONL "
                      "files [all categories]")
    what.add_argument("--prompts-per-category", type=int, help="first N prompts of each category [2]")
    what.add_argument("--max-prompt-tokens", type=int, help="prompts keep their last N tokens [512]")
    what.add_argument("--experiments", nargs="+", type=_numbers(str),
                      help=f"any of: {', '.join(EXPERIMENTS)} [all but sorted]")
    what.add_argument("--decoding", nargs="+", choices=("greedy", "sample"), help="[greedy sample]")
    what.add_argument("--temperature", type=float, help="temperature of the sampling rows [1.0]")
    what.add_argument("--top-p", type=float, help="nucleus sampling (top_p) of the sampling rows [1.0: off]")
    what.add_argument("--num-draft-tokens", type=int, help="γ, tokens drafted per round for chains [6]")
    what.add_argument("--auto-max-draft-tokens", type=int,
                      help="the longest draft the auto row's schedule='auto' may choose [16]")
    what.add_argument("--draft-lengths", nargs="+", type=_numbers(int), help="γ values of the gamma-sweep [1 2 4 8]")
    what.add_argument("--batch-sizes", nargs="+", type=_numbers(int), help="batch sizes of the batch-sweep [1 4 8]")
    what.add_argument("--tree", type=_numbers(int), help="tree drafting: depth,top_k,max_nodes [5,4,24]")
    what.add_argument("--max-new-tokens", type=int, help="new tokens per prompt [32]")
    what.add_argument("--repeats", type=int, help="timed repetitions; tables show the median [2]")
    what.add_argument("--warmup", type=int, help="untimed warm-up passes per method [1]")
    what.add_argument("--sorted-exits", type=_numbers(int),
                      help="add SD2 rows: SortedDrafter.from_target with these exits of the target, e.g. 1,2,4")
    what.add_argument("--sorted-thresholds", type=_numbers(float),
                      help="adaptive thresholds for --sorted-exits, one per exit but the last [0.7 each]")
    what.add_argument("--seed", type=int, help="seed of the synthetic pair and of sampling [0]")
    what.add_argument("--threads", type=int, help="torch intra-op threads [torch's default: one per core]")
    what.add_argument("--quick", action="store_true", help="tiny pair and sizes: a smoke test in seconds")
    what.add_argument("--full", action="store_true",
                      help="the full suite: every experiment, 2 prompts per category, greedy and sampling (~1 h on "
                           "2 CPU cores; without it: the headline rows, ~5 min)")
    what.add_argument("--pair-shape", choices=("default", "overhead"),
                      help="synthetic pair: 'default' (206M target, compute-bound on a CPU) or 'overhead' (3-layer "
                           "width-64 target: a forward costs about as much as the loop around it) [default]")
    out = bench.add_argument_group("output")
    out.add_argument("--out", type=Path, help="write report.json, report.md and PNG plots into this directory")
    out.add_argument("--json", type=Path, help="also write the full report as JSON to this path")
    out.add_argument("--markdown", action="store_true", help="print Markdown tables")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _pair_shape(name: str | None) -> dict | None:
    if name is None:
        return None
    from .testing import PAIR_SHAPES

    return dict(PAIR_SHAPES[name])


def suite_config_from_args(args: argparse.Namespace):
    from .bench import SuiteConfig

    drafters = dict(args.drafter or [])
    if args.draft is not None:
        drafters = {"draft": args.draft, **drafters}
    experiments = _flatten(args.experiments)
    if args.routing and experiments is None:
        experiments = ("plain", "specialized_drafts", "adaptive_routing")
    if args.sorted_exits and experiments is None:
        from .bench import FULL_EXPERIMENTS, HEADLINE_EXPERIMENTS

        experiments = (*(FULL_EXPERIMENTS if args.full else HEADLINE_EXPERIMENTS), "sorted")
    given = dict(
        target=args.target, drafters=drafters or None, lab=args.lab, agreements=_flatten(args.agreement),
        dtype=args.dtype, device=args.device, prompts=tuple(args.prompts) if args.prompts else None,
        prompts_per_category=args.prompts_per_category, max_prompt_tokens=args.max_prompt_tokens,
        experiments=experiments, decodings=tuple(args.decoding) if args.decoding else None,
        temperature=args.temperature, top_p=args.top_p, num_draft_tokens=args.num_draft_tokens,
        auto_max_draft_tokens=args.auto_max_draft_tokens,
        draft_lengths=_flatten(args.draft_lengths), batch_sizes=_flatten(args.batch_sizes), tree=args.tree,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        threads=args.threads, sorted_exits=args.sorted_exits, sorted_thresholds=args.sorted_thresholds,
        pair_shape=_pair_shape(args.pair_shape), routing=args.routing,
    )
    given = {name: value for name, value in given.items() if value is not None}
    if args.quick:
        return SuiteConfig.quick(**given)
    return SuiteConfig.full(**given) if args.full else SuiteConfig(**given)


def run_bench_command(args: argparse.Namespace) -> int:
    from .bench import format_suite_report, run_suite, write_markdown_report, write_plots

    try:
        config = suite_config_from_args(args)
    except ValueError as error:
        print(f"hf-specdec bench: {error}", file=sys.stderr)
        return 2
    if args.out is not None and importlib.util.find_spec("matplotlib") is None:  # fail before a long run, not after
        print('hf-specdec bench: --out draws plots with matplotlib: pip install "hf-specdec[bench]".', file=sys.stderr)
        return 2
    report = run_suite(config, show_progress=not args.no_progress)
    print(format_suite_report(report, markdown=args.markdown))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        plots = write_plots(report, args.out / "plots")
        write_markdown_report(report, args.out / "report.md", plots)
        print(f"report.json, report.md and {len(plots)} plots written to {args.out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench_command(args)
    if args.command == "demo":
        try:
            from .demo import run_demo_command
        except ImportError as error:
            print(f'hf-specdec demo needs the demo extra: pip install "hf-specdec[demo]" ({error})', file=sys.stderr)
            return 2
        return run_demo_command(args)
    if args.command == "generate":
        from .generate_cli import run_generate_command

        return run_generate_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
