"""How much a node's extra children can add under sampling, and how close recursive rejection gets to the best any
verification could do with the same children.

On the target's own sampled continuations of held-out lab prompts it takes, at every position, the target's
processed distribution p and the drafter's q (the same temperature, top-k and top-p) and estimates, for k children
drawn from q without replacement (Gumbel top-k):
- `recursive`: the probability that recursive rejection accepts one of them (what a sampled tree's node accepts);
- `bound`:     sum_x min(p(x), P(x is among the k children)), an upper bound for *any* lossless verification of
               those children (the target's token can only be a drafted one with at most that probability);
- `sharpened`: recursive rejection when siblings after the first come from q^(1/t) (`TreeConfig.sibling_temperature`).
k = 1 is the chain's sum min(p, q). Monte Carlo over `--draws` draws per position.

    python recipes/sibling_acceptance.py --lab out/lab --drafter sft --temperature 0.6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab", default="out/lab")
    parser.add_argument("--drafter", default="sft")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--positions", type=int, default=300, help="positions sampled for the estimates")
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--sibling-temperatures", type=float, nargs="+", default=[0.33])
    return parser.parse_args(argv)


def distributions(args) -> tuple[torch.Tensor, torch.Tensor]:
    """p and q [positions, V] at every position of the target's sampled continuations."""
    lab = Path(args.lab)
    target = AutoModelForCausalLM.from_pretrained(lab / "target").eval()
    draft = AutoModelForCausalLM.from_pretrained(lab / "drafters" / args.drafter).eval()
    tokenizer = AutoTokenizer.from_pretrained(lab / "target")
    warpers = LogitsProcessorList([TemperatureLogitsWarper(args.temperature), TopPLogitsWarper(args.top_p)])
    if args.top_k:
        warpers.insert(1, TopKLogitsWarper(args.top_k))
    p, q = [], []
    torch.manual_seed(0)
    with torch.no_grad():
        for line in (lab / "heldout.jsonl").read_text().splitlines()[: args.prompts]:
            prompt = tokenizer(json.loads(line)["prompt"], return_tensors="pt").input_ids
            text = target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   max_new_tokens=args.new_tokens, pad_token_id=0)
            start = prompt.shape[1] - 1
            for model, out in ((target, p), (draft, q)):
                logits = model(text).logits[0, start:-1]
                out.append(warpers(text[:, : start + 1], logits).softmax(-1))
    return torch.cat(p), torch.cat(q)


def without_replacement(log_weights: torch.Tensor, k: int, draws: int, exclude=None) -> torch.Tensor:
    keys = log_weights.expand(draws, -1).clone()
    if exclude is not None:
        keys.scatter_(1, exclude, float("-inf"))
    return (keys - torch.empty_like(keys).exponential_().log()).topk(k, dim=-1).indices


def recursive_acceptance(p, q, k, draws, sibling_temperature=1.0) -> float:
    """P(recursive rejection accepts one of k children: the first from q, the rest from q^(1/t) without it)."""
    log_q = q.log()
    first = without_replacement(log_q, 1, draws)
    later_weights = log_q / sibling_temperature
    children = torch.cat([first, without_replacement(later_weights, k - 1, draws, exclude=first)], 1) if k > 1 else first
    residual = p.expand(draws, -1).clone()
    accepted = torch.zeros(draws, dtype=torch.bool)
    drawn = torch.zeros(draws, p.shape[-1], dtype=torch.bool)
    for j in range(k):
        proposal = (log_q if j == 0 else later_weights).expand(draws, -1).masked_fill(drawn, float("-inf"))
        proposal = proposal.softmax(-1).nan_to_num(0.0)
        token = children[:, j : j + 1]
        p_token, q_token = residual.gather(1, token)[:, 0], proposal.gather(1, token)[:, 0]
        trying = ~accepted & (q_token > 0)
        accept = trying & (torch.rand(draws) * q_token < p_token)
        refused = trying & ~accept
        left = (residual - proposal).clamp(min=0)
        left = left / left.sum(-1, keepdim=True).clamp(min=1e-30)
        residual = torch.where(refused[:, None], left, residual)
        accepted |= accept
        drawn.scatter_(1, token, True)
    return accepted.float().mean().item()


def acceptance_bound(p, q, k, draws) -> float:
    """sum_x min(p(x), P(x among k children drawn from q without replacement))."""
    children = without_replacement(q.log(), k, draws)
    inclusion = torch.zeros_like(p).scatter_add_(0, children.flatten(), torch.ones(children.numel())) / draws
    return torch.minimum(p, inclusion).sum().item()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    p, q = distributions(args)
    torch.manual_seed(1)
    positions = torch.randperm(len(p))[: args.positions].tolist()
    print(f"{args.drafter}, T = {args.temperature}, top-p {args.top_p}, top-k {args.top_k or 'off'}: "
          f"{len(p)} positions, {len(positions)} sampled; chain sum min(p, q) = {torch.minimum(p, q).sum(-1).mean():.3f}")
    rows = {"recursive": lambda i, k: recursive_acceptance(p[i], q[i], k, args.draws),
            "bound": lambda i, k: acceptance_bound(p[i], q[i], k, args.draws)}
    for t in args.sibling_temperatures:
        rows[f"sharpened t={t}"] = lambda i, k, t=t: recursive_acceptance(p[i], q[i], k, args.draws, t)
    print("| children k | " + " | ".join(rows) + " |\n|---:|" + "---:|" * len(rows))
    for k in (1, 2, 3, 4):
        cells = [sum(estimate(i, k) for i in positions) / len(positions) for estimate in rows.values()]
        print(f"| {k} | " + " | ".join(f"{value:.3f}" for value in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
