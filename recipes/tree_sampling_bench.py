"""Sampled trees vs sampled chains: τ and tokens/s of the same drafters on the same prompts with the same seeds.

Three rows per drafter and temperature, all with `do_sample=True`, top-p 0.9:
- `chain`:       a sampled chain of γ tokens (Leviathan's rule);
- `tree-top-k`:  trees whose children are the draft's top-k (`TreeConfig(sampling="top_k")`, the construction
                 before 0.3), accepted with the target's probability of each token;
- `tree`:        trees whose children are drawn without replacement and verified by recursive rejection
                 (`TreeConfig(sampling="recursive")`, the default).

Pairs:
- `lab`:   the lab's target and its trained drafters (`--lab out/lab`, made by recipes/lab.py), on its held-out
           prompts, through the benchmark suite (chains of 4, trees 4/2/12 as in the lab);
- `flat`:  a tiny Qwen2 target whose distribution is almost flat (max probability about 0.03) and a draft that
           matches it almost exactly: the case where top-k children fail hardest;
- `synthetic`: the benchmark's 206M synthetic pair at agreement 0.9 (one prompt per category).

    python recipes/tree_sampling_bench.py --lab out/lab                  # lab + flat (~10 min on 2 CPU cores)
    python recipes/tree_sampling_bench.py --pairs flat synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_specdec import ModelDrafter, TreeConfig
from hf_specdec.bench import SuiteConfig, run_suite

METHODS = ("chain", "tree-top-k", "tree")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["lab", "flat"], choices=["lab", "flat", "synthetic"])
    parser.add_argument("--lab", default="out/lab", help="output_dir of recipes/lab.py")
    parser.add_argument("--drafters", nargs="+", default=None, help="lab drafters to measure [every one]")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.6, 1.0])
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="out/tree_sampling_bench.json")
    return parser.parse_args(argv)


def suite_rows(config: SuiteConfig, pair: str) -> list[dict]:
    """One row per (drafter, method) of a sampling-only suite run."""
    report = run_suite(config, show_progress=True)
    rows = []
    for row in report["pairs"][0]["rows"]:
        if row["experiment"] in METHODS:
            overall = row["overall"]
            rows.append(dict(pair=pair, drafter=row["drafter"], method=row["experiment"],
                             temperature=config.temperature, tau=overall["mean_accepted_length"],
                             tokens_per_second=overall["tokens_per_second"], speedup=overall["speedup"]))
    return rows


def lab_rows(args, temperature: float) -> list[dict]:
    from hf_specdec.drafters import lab_checkpoints

    target, drafters = lab_checkpoints(args.lab)
    if args.drafters:
        drafters = {name: path for name, path in drafters.items() if name in args.drafters}
    config = SuiteConfig(target=target, drafters=drafters, prompts=(str(Path(args.lab) / "heldout.jsonl"),),
                         prompts_per_category=16, experiments=("plain", *METHODS), decodings=("sample",),
                         temperature=temperature, top_p=args.top_p, max_new_tokens=64, num_draft_tokens=4,
                         tree=(4, 2, 12), repeats=args.repeats, threads=args.threads)
    return suite_rows(config, "lab")


def synthetic_rows(args, temperature: float) -> list[dict]:
    config = SuiteConfig(experiments=("plain", *METHODS), decodings=("sample",), temperature=temperature,
                         top_p=args.top_p, repeats=args.repeats, threads=args.threads, max_prompt_tokens=128)
    return suite_rows(config, "synthetic")


def flat_rows(args, temperature: float) -> list[dict]:
    """The flat pair, timed directly: 8 prompts × 64 tokens, one left-padded batch of 1 at a time."""
    import time

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    target = Qwen2ForCausalLM(config).eval()
    draft = Qwen2ForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        target.lm_head.weight.mul_(5.0)  # flat: the largest probability is about 0.03
        for parameter in draft.parameters():  # a near-copy: agrees with the target almost everywhere
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02 * parameter.std())
    prompts = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    drafters = {"chain": lambda: ModelDrafter(draft, num_draft_tokens=5),
                "tree-top-k": lambda: ModelDrafter(draft, tree=TreeConfig(5, 4, 24, sampling="top_k")),
                "tree": lambda: ModelDrafter(draft, tree=TreeConfig(5, 4, 24))}
    rows = []
    for method, make in drafters.items():
        accepted = rounds = tokens = 0
        seconds = 0.0
        torch.manual_seed(1)
        for prompt in prompts:
            start = time.perf_counter()
            out = target.generate(input_ids=prompt[None], do_sample=True, temperature=temperature, top_p=args.top_p,
                                  max_new_tokens=64, assistant_model=make(), return_dict_in_generate=True,
                                  pad_token_id=0)
            seconds += time.perf_counter() - start
            stats = out.spec_stats
            accepted, rounds = accepted + int(stats.accepted.sum()), rounds + int(stats.rounds.sum())
            tokens += int(stats.new_tokens.sum()) if stats.new_tokens is not None else 64
        rows.append(dict(pair="flat", drafter="near-copy", method=method, temperature=temperature,
                         tau=(accepted + rounds) / rounds, tokens_per_second=tokens / seconds, speedup=None))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (pair, drafter, temperature) with τ and tok/s of each method and tree ÷ chain."""
    lines = ["| pair | drafter | T | τ chain | τ tree-top-k | τ tree | tree ÷ chain (τ) | tok/s chain | tok/s "
             "tree-top-k | tok/s tree |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["drafter"], row["temperature"]), {})[row["method"]] = row
    for (pair, drafter, temperature), methods in groups.items():
        tau = {m: methods[m]["tau"] if m in methods else None for m in METHODS}
        speed = {m: methods[m]["tokens_per_second"] if m in methods else None for m in METHODS}
        ratio = tau["tree"] / tau["chain"] if tau["tree"] and tau["chain"] else None
        cells = [f"{tau[m]:.2f}" if tau[m] else "–" for m in METHODS] + [f"{ratio:.2f}×" if ratio else "–"]
        cells += [f"{speed[m]:.1f}" if speed[m] else "–" for m in METHODS]
        lines.append(f"| {pair} | {drafter} | {temperature} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    measure = {"lab": lab_rows, "flat": flat_rows, "synthetic": synthetic_rows}
    rows = [row for pair in args.pairs for temperature in args.temperatures for row in measure[pair](args, temperature)]
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
