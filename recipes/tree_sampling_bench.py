"""Sampled trees vs sampled chains: τ and tokens/s of the same drafters on the same prompts with the same seeds.

Four rows per drafter, temperature and top-k, all with `do_sample=True`, top-p 0.9:
- `chain`:       a sampled chain of γ tokens (Leviathan's rule);
- `tree-top-k`:  trees whose children are the draft's top-k (`TreeConfig(sampling="top_k")`, the construction
                 before 0.3), accepted with the target's probability of each token;
- `tree`:        the default: children drawn from q without replacement and verified by recursive rejection;
- `tree-sharp`:  the same with later siblings drawn from q sharpened to `TreeConfig(sibling_temperature=0.33)`.

Every method runs on every prompt with the same seed, one after the other in an order rotated per prompt (so load
drift hits all alike), with a fresh drafter per prompt. `--top-k 50 0`: transformers' default top-k of 50 (most
generation configs keep it) and none (the nucleus alone).

Pairs:
- `lab`:   the lab's target and its trained drafters (`--lab out/lab`, made by recipes/lab.py), on its held-out
           prompts (chains of 4, trees 4/2/12 as in the lab; `--tree` / `--chain` to change);
- `flat`:  a tiny Qwen2 target whose distribution is almost flat (max probability about 0.03) and a draft that
           matches it almost exactly: the case where top-k children fail hardest (chains of 5, trees 5/4/24).

    python recipes/tree_sampling_bench.py --lab out/lab --drafters sft distill-fkl-long   # ~15 min on 2 CPU cores
    python recipes/tree_sampling_bench.py --pairs flat
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_specdec import ModelDrafter, TreeConfig

METHODS = ("chain", "tree-top-k", "tree", "tree-sharp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["lab", "flat"], choices=["lab", "flat"])
    parser.add_argument("--lab", default="out/lab", help="output_dir of recipes/lab.py")
    parser.add_argument("--drafters", nargs="+", default=None, help="lab drafters to measure [every one]")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.6, 1.0])
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", nargs="+", type=int, default=[50, 0], help="0 = no top-k truncation")
    parser.add_argument("--chain", type=int, default=None, help="chain length [lab 4, flat 5]")
    parser.add_argument("--tree", type=int, nargs=3, default=None, metavar=("DEPTH", "TOP_K", "MAX_NODES"),
                        help="tree shape [lab 4 2 12, flat 5 4 24]")
    parser.add_argument("--prompts", type=int, default=16, help="lab prompts (flat: 8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="out/tree_sampling_bench.json")
    return parser.parse_args(argv)


def drafters_to_compare(draft, chain_length: int, shape: tuple[int, int, int]) -> dict:
    return {"chain": lambda: ModelDrafter(draft, num_draft_tokens=chain_length),
            "tree-top-k": lambda: ModelDrafter(draft, tree=TreeConfig(*shape, sampling="top_k")),
            "tree": lambda: ModelDrafter(draft, tree=TreeConfig(*shape)),
            "tree-sharp": lambda: ModelDrafter(draft, tree=TreeConfig(*shape, sibling_temperature=0.33))}


def measure(target, draft, prompts: list[torch.Tensor], sampling: dict, args, chain_length: int,
            shape: tuple[int, int, int]) -> dict[str, dict]:
    """{method: {"tau", "tokens_per_second"}} over the prompts, every method with the same seed per prompt."""
    makers = drafters_to_compare(draft, chain_length, shape)
    totals = {method: dict(accepted=0, rounds=0, tokens=0, seconds=0.0) for method in makers}
    for index, prompt in enumerate(prompts):
        order = list(makers)[index % len(makers):] + list(makers)[: index % len(makers)]
        for method in order:
            torch.manual_seed(index)
            start = time.perf_counter()
            out = target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **sampling,
                                  max_new_tokens=args.new_tokens, assistant_model=makers[method](),
                                  return_dict_in_generate=True, pad_token_id=0)
            total, stats = totals[method], out.spec_stats
            total["seconds"] += time.perf_counter() - start
            total["accepted"] += int(stats.accepted.sum())
            total["rounds"] += int(stats.rounds.sum())
            total["tokens"] += int(stats.new_tokens.sum())
    return {method: dict(tau=(t["accepted"] + t["rounds"]) / t["rounds"], tokens_per_second=t["tokens"] / t["seconds"])
            for method, t in totals.items()}


def rows_for(pair: str, drafter: str, target, draft, prompts, args, chain_length, shape) -> list[dict]:
    rows = []
    for temperature in args.temperatures:
        for top_k in args.top_k:
            sampling = dict(do_sample=True, temperature=temperature, top_p=args.top_p, top_k=top_k)
            results = measure(target, draft, prompts, sampling, args, chain_length, shape)
            rows += [dict(pair=pair, drafter=drafter, method=method, temperature=temperature, top_k=top_k,
                          chain=chain_length, tree=list(shape), **result) for method, result in results.items()]
            print(table(rows[-len(results):]), flush=True)
    return rows


def lab_rows(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specdec.drafters import lab_checkpoints

    target_dir, drafters = lab_checkpoints(args.lab)
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    lines = Path(args.lab, "heldout.jsonl").read_text().splitlines()[: args.prompts]
    prompts = [tokenizer(json.loads(line)["prompt"], return_tensors="pt").input_ids for line in lines]
    rows = []
    for name, path in drafters.items():
        if args.drafters is None or name in args.drafters:
            draft = AutoModelForCausalLM.from_pretrained(path).eval()
            rows += rows_for("lab", name, target, draft, prompts, args, args.chain or 4, tuple(args.tree or (4, 2, 12)))
    return rows


def flat_rows(args) -> list[dict]:
    """A tiny Qwen2 whose largest probability is about 0.03 and a near-copy draft; 8 prompts of 12 tokens."""
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
    prompts = list(torch.randint(3, 128, (8, 1, 12), generator=torch.Generator().manual_seed(0)))
    return rows_for("flat", "near-copy", target, draft, prompts, args, args.chain or 5, tuple(args.tree or (5, 4, 24)))


def table(rows: list[dict]) -> str:
    """Markdown: one line per (pair, drafter, temperature, top-k) with τ and tok/s of each method and tree ÷ chain."""
    lines = ["| pair | drafter | T | top-k | " + " | ".join(f"τ {m}" for m in METHODS) + " | tree ÷ chain (τ) | "
             + " | ".join(f"tok/s {m}" for m in METHODS) + " |", "|---|---|---:|---:|" + "---:|" * (2 * len(METHODS) + 1)]
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["drafter"], row["temperature"], row["top_k"]), {})[row["method"]] = row
    for (pair, drafter, temperature, top_k), methods in groups.items():
        tau = [f"{methods[m]['tau']:.2f}" if m in methods else "–" for m in METHODS]
        speed = [f"{methods[m]['tokens_per_second']:.1f}" if m in methods else "–" for m in METHODS]
        ratio = f"{methods['tree']['tau'] / methods['chain']['tau']:.2f}×" if {"tree", "chain"} <= set(methods) else "–"
        lines.append(f"| {pair} | {drafter} | {temperature} | {top_k or 'off'} | " + " | ".join(tau) + f" | {ratio} | "
                     + " | ".join(speed) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    measure_pair = {"lab": lab_rows, "flat": flat_rows}
    rows = [row for pair in args.pairs for row in measure_pair[pair](args)]
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
