"""Sorted drafts (SD2) benchmark: adaptive exits vs each fixed exit, chains and trees, side by side.

Two pairs, both built locally:
- `soft`: the tiny world's target (trained on a synthetic language) and a SoFT-trained sorted draft (its first
  layers, every exit trained; made by `recipes/soft.py` into `--soft-dir` if it is not there yet);
- `synthetic`: the ~206M-parameter synthetic target of `hf-specdec bench`, self-speculating with its own first
  layers as exits (`SortedDrafter.from_target`).

For each drafter it reports tokens/s, speed-up over plain greedy `generate`, acceptance rate α, tokens per round τ,
the exit histogram, loop efficiency and whether the output equals plain greedy. Greedy decoding; every run is
timed after a warm-up, best of `--repeats`.

    python recipes/sorted_bench.py                      # both pairs, markdown table, out/sorted_bench.json
    python recipes/sorted_bench.py --pairs soft --thresholds 0.6 0.6
    python recipes/sorted_bench.py --compare-deep-rows   # + deep_rows 'needing' vs 'all' on a batch of the prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_specdec  # noqa: F401
from hf_specdec import SortedDrafter, TreeConfig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["soft", "synthetic"], choices=["soft", "synthetic"])
    parser.add_argument("--soft-dir", default="out/soft", help="output_dir of recipes/soft.py (trained if missing)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=None,
                        help="adaptive thresholds (one per exit but the last); default: a sweep")
    parser.add_argument("--num-draft-tokens", type=int, default=5)
    parser.add_argument("--tree", default="4,4,16", help="depth,top_k,max_nodes for the tree rows")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--json", default="out/sorted_bench.json")
    parser.add_argument("--compare-deep-rows", action="store_true",
                        help="also time deep_rows='needing' vs 'all' with the prompts in one left-padded batch")
    return parser.parse_args(argv)


def soft_pair(soft_dir: str, num_prompts: int):
    """The tiny world's target, the SoFT-trained sorted draft and held-out prompts."""
    from tiny import tiny_corpus
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(soft_dir) / "config.json").exists():
        import soft

        soft.main(["--config", str(Path(__file__).resolve().parent / "configs" / "soft.yaml"),
                   "--output_dir", soft_dir])
    tokenizer = AutoTokenizer.from_pretrained(soft_dir)
    target = AutoModelForCausalLM.from_pretrained(Path(soft_dir) / "tiny-target").eval()
    draft = AutoModelForCausalLM.from_pretrained(soft_dir).eval()
    prompts = [row["prompt"] for row in tiny_corpus(num_prompts, seed=7)]
    tokenizer.padding_side = "left"
    return target, draft, list(draft.config.sorted_exits), [tokenizer(p, return_tensors="pt") for p in prompts]


def synthetic_pair(num_prompts: int):
    from hf_specdec.testing import build_synthetic_pair

    target, _ = build_synthetic_pair(agreement=0.6, seed=0)
    generator = torch.Generator().manual_seed(0)
    prompts = [{"input_ids": torch.randint(10, 1000, (1, 24), generator=generator)} for _ in range(num_prompts)]
    return target, target, [1, 2, 4], prompts


def drafters(draft, exits, thresholds_sweep, num_draft_tokens, tree, self_speculative):
    make = SortedDrafter.from_target if self_speculative else SortedDrafter
    rows = {f"fixed exit {e}": make(draft, exits=[e], num_draft_tokens=num_draft_tokens) for e in exits}
    for thresholds in thresholds_sweep:
        rows[f"adaptive {exits} @ {thresholds}"] = make(draft, exits=exits, thresholds=thresholds,
                                                        num_draft_tokens=num_draft_tokens)
    rows[f"tree fixed exit {exits[-1]}"] = make(draft, exits=[exits[-1]], tree=tree)
    rows[f"tree fixed exit {exits[0]}"] = make(draft, exits=[exits[0]], tree=tree)
    for thresholds in thresholds_sweep:
        rows[f"tree adaptive {exits} @ {thresholds}"] = make(draft, exits=exits, thresholds=thresholds, tree=tree)
    return rows


def timed_generate(target, prompts, max_new_tokens, repeats, drafter=None):
    """Best-of-`repeats` wall time over all prompts (batch 1 each), outputs and summed statistics."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    if drafter is not None:
        kwargs["assistant_model"] = drafter
    target.generate(**prompts[0], **kwargs)  # warm-up
    best, outputs, stats = float("inf"), None, None
    for _ in range(repeats):
        start = time.perf_counter()
        results = [target.generate(**prompt, **kwargs) for prompt in prompts]
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, outputs = elapsed, [r.sequences for r in results]
            stats = [getattr(r, "spec_stats", None) for r in results]
    new_tokens = sum(o.shape[1] - p["input_ids"].shape[1] for o, p in zip(outputs, prompts))
    return best, new_tokens, outputs, stats


def summarize(stats):
    drafted = sum(int(s.drafted.sum()) for s in stats)
    accepted = sum(int(s.accepted.sum()) for s in stats)
    rounds = sum(int(s.rounds.sum()) for s in stats)
    model_seconds = sum(s.model_seconds for s in stats)
    wall = sum(s.wall_seconds for s in stats)
    exits: dict[int, int] = {}
    for s in stats:
        for layer, count in s.exit_counts.items():
            exits[layer] = exits.get(layer, 0) + count
    return {
        "alpha": accepted / max(drafted, 1),
        "tau": (accepted + rounds) / max(rounds, 1),
        "loop_efficiency": model_seconds / wall if wall else 0.0,
        "exit_histogram": exits,
    }


def run_pair(name, target, draft, exits, prompts, args, self_speculative):
    depth, top_k, max_nodes = (int(x) for x in args.tree.split(","))
    tree = TreeConfig(depth=depth, top_k=top_k, max_nodes=max_nodes)
    sweep = [args.thresholds] if args.thresholds else [[t] * (len(exits) - 1) for t in (0.5, 0.7, 0.9)]
    plain_time, new_tokens, plain_out, _ = timed_generate(target, prompts, args.max_new_tokens, args.repeats)
    rows = [{"pair": name, "drafter": "plain generate", "tokens_per_s": new_tokens / plain_time, "speedup": 1.0}]
    for label, drafter in drafters(draft, exits, sweep, args.num_draft_tokens, tree, self_speculative).items():
        elapsed, produced, outputs, stats = timed_generate(target, prompts, args.max_new_tokens, args.repeats, drafter)
        rows.append({
            "pair": name, "drafter": label, "tokens_per_s": produced / elapsed,
            "speedup": plain_time / elapsed * produced / new_tokens,
            "equal_to_greedy": all(torch.equal(a, b) for a, b in zip(outputs, plain_out)),
            **summarize(stats),
        })
        print(_row(rows[-1]), flush=True)
    return rows


def compare_deep_rows(name, target, draft, exits, prompts, args, self_speculative):
    """Rows exit at different depths: run deeper segments for the rows that need them, or for the whole batch."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        length = prompt["input_ids"].shape[1]
        input_ids[row, width - length:] = prompt["input_ids"][0]
        attention_mask[row, width - length:] = 1
    batch = [{"input_ids": input_ids, "attention_mask": attention_mask}]
    make = SortedDrafter.from_target if self_speculative else SortedDrafter
    thresholds = args.thresholds or [0.7] * (len(exits) - 1)
    rows = []
    for mode in ("all", "needing"):
        drafter = make(draft, exits=exits, thresholds=thresholds, num_draft_tokens=args.num_draft_tokens,
                       deep_rows=mode)
        elapsed, _, _, stats = timed_generate(target, batch, args.max_new_tokens, args.repeats, drafter)
        rows.append({"pair": name, "deep_rows": mode, "batch": len(prompts), "wall_seconds": elapsed,
                     "draft_forward_seconds": stats[0].draft_forward_seconds, **summarize(stats)})
        print(f"| {name} | deep_rows={mode} | batch {len(prompts)} | wall {elapsed:.2f}s | draft forwards "
              f"{stats[0].draft_forward_seconds:.2f}s | τ {rows[-1]['tau']:.2f} |", flush=True)
    return rows


def _row(row) -> str:
    histogram = ", ".join(f"{k}:{v}" for k, v in row.get("exit_histogram", {}).items())
    return (f"| {row['pair']} | {row['drafter']} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}× | "
            f"{row.get('alpha', float('nan')):.2f} | {row.get('tau', 1.0):.2f} | {histogram} | "
            f"{row.get('loop_efficiency', float('nan')):.2f} | {row.get('equal_to_greedy', True)} |")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| pair | drafter | tok/s | speed-up | α | τ | exits (tokens) | loop eff. | = greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    if "soft" in args.pairs:
        target, draft, exits, prompts = soft_pair(args.soft_dir, args.num_prompts)
        results += run_pair("soft tiny", target, draft, exits, prompts, args, self_speculative=False)
        if args.compare_deep_rows:
            results += compare_deep_rows("soft tiny", target, draft, exits, prompts, args, self_speculative=False)
    if "synthetic" in args.pairs:
        target, draft, exits, prompts = synthetic_pair(args.num_prompts)
        results += run_pair("synthetic 206M", target, draft, exits, prompts, args, self_speculative=True)
        if args.compare_deep_rows:
            results += compare_deep_rows("synthetic 206M", target, draft, exits, prompts, args, self_speculative=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
