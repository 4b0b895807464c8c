"""`hf-specdec` command line: `hf-specdec bench [options]` (also `python -m hf_specdec bench`)."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-specdec", description="Speculative decoding for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="offline benchmark: plain, transformers-assisted and hf_specdec decoding side by side",
        description="Time plain generate, transformers' assisted generation and hf_specdec (chain, tree, n-gram, "
        "batched) on the same prompts. Default pair: a synthetic ~206M-parameter target and a one-layer draft "
        "built locally at each --agreement rate (nothing is downloaded). See docs/benchmark.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--target", help="target model: Hub name or local dir (default: the synthetic pair)")
    bench.add_argument("--draft", help="draft model: Hub name or local dir (with --target)")
    bench.add_argument("--agreement", nargs="+", type=_numbers(float), help="synthetic pair agreement rates [0.6 0.9]")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype [float32]")
    bench.add_argument("--device", help="cpu, cuda, cuda:1, ... [cpu]")
    bench.add_argument("--batch-sizes", nargs="+", type=_numbers(int), help="batch sizes for the batched rows [1 4 8]")
    bench.add_argument("--num-draft-tokens", type=int, help="γ, tokens drafted per round for chains [6]")
    bench.add_argument("--tree", type=_numbers(int), help="tree drafting: depth,top_k,max_nodes [5,4,24]")
    bench.add_argument("--max-new-tokens", type=int, help="new tokens per prompt [32]")
    bench.add_argument("--num-prompts", type=int, help="prompts (a multiple of every batch size) [8]")
    bench.add_argument("--repeats", type=int, help="timed repetitions; the table shows the median [3]")
    bench.add_argument("--sampling", action="store_true", help="add sampling rows (equality not checked there)")
    bench.add_argument("--sorted-exits", type=_numbers(int),
                       help="add SD2 rows: SortedDrafter.from_target with these exits of the target, e.g. 1,2,4")
    bench.add_argument("--sorted-thresholds", type=_numbers(float),
                       help="adaptive thresholds for --sorted-exits, one per exit but the last [0.7 each]")
    bench.add_argument("--seed", type=int, help="seed of the synthetic pair and prompts [0]")
    bench.add_argument("--threads", type=int, help="torch intra-op threads [torch's default: one per core]")
    bench.add_argument("--json", type=Path, help="also write the full report as JSON to this path")
    bench.add_argument("--markdown", action="store_true", help="print Markdown tables")
    bench.add_argument("--quick", action="store_true", help="tiny pair and sizes: a smoke test in seconds")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def bench_config_from_args(args: argparse.Namespace):
    from .bench import BenchConfig

    given = dict(
        target=args.target, draft=args.draft, agreements=_flatten(args.agreement), dtype=args.dtype,
        device=args.device, batch_sizes=_flatten(args.batch_sizes), num_draft_tokens=args.num_draft_tokens,
        tree=args.tree, max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts, repeats=args.repeats,
        sampling=args.sampling or None, seed=args.seed, threads=args.threads,
        sorted_exits=args.sorted_exits, sorted_thresholds=args.sorted_thresholds,
    )
    given = {name: value for name, value in given.items() if value is not None}
    return BenchConfig.quick(**given) if args.quick else BenchConfig(**given)


def run_bench_command(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    try:
        config = bench_config_from_args(args)
    except ValueError as error:
        print(f"hf-specdec bench: {error}", file=sys.stderr)
        return 2
    report = run_bench(config, show_progress=not args.no_progress)
    print(format_report(report, markdown=args.markdown))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
