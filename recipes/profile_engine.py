"""Where a speculative round spends its time: a per-phase breakdown from torch.profiler.

    python recipes/profile_engine.py                       # the overhead-bound pair (3-layer width-64 target)
    python recipes/profile_engine.py --pair default        # the 206M synthetic pair (compute-bound on a CPU)
    python recipes/profile_engine.py --compile             # the captured (torch.compile) forwards

Every aten op the profiler records is attributed to the innermost engine phase that ran it (draft, verify
forward, processors, acceptance, cache ops, bookkeeping; "prefill" and "other" for the rest). The table gives,
per phase: CPU time, aten ops per round (split into those inside model calls and the loop's own outside them)
and host-synchronising ops per round (`item`/`bool()`/`int()` reads,
`nonzero`, `unique`, copies to the host — each one stalls the host on an accelerator). Numbers are per
steady-state round, from one profiled generate() after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_specdec import ModelDrafter, testing
from hf_specdec.bench.measure import round_profile


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(testing.PAIR_SHAPES), default="overhead")
    parser.add_argument("--agreement", type=float, default=0.75)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-draft-tokens", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="captured forwards (compile_config)")
    parser.add_argument("--sample", action="store_true", help="sampling instead of greedy")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    target, draft = testing.build_synthetic_pair(agreement=args.agreement, **testing.PAIR_SHAPES[args.pair])
    batch = testing.synthetic_prompts(1, batch_size=args.batch_size, vocab_size=target.config.vocab_size,
                                      min_length=args.prompt_length, max_length=args.prompt_length)[0]
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=args.sample, return_dict_in_generate=True)
    if args.repetition_penalty:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.compile:
        from transformers import CompileConfig

        kwargs["compile_config"] = CompileConfig()
    drafter = ModelDrafter(draft, num_draft_tokens=args.num_draft_tokens)
    for _ in range(2):  # warm-up (and compilation)
        target.generate(**batch, assistant_model=drafter, **kwargs)

    def generate():
        return target.generate(**batch, assistant_model=drafter, **kwargs)

    start = time.perf_counter()
    phases, out = round_profile(generate)
    wall = time.perf_counter() - start
    rounds = int(out.spec_stats.rounds.max())
    print(f"pair {args.pair}, batch {args.batch_size}, γ={args.num_draft_tokens}, {args.new_tokens} new tokens: "
          f"{rounds} rounds, τ {out.spec_stats.mean_accepted_length:.2f}, wall {wall * 1e3:.1f} ms under the "
          f"profiler ({wall / rounds * 1e3:.2f} ms per round)")
    print(f"{'phase':<16}{'ms/round':>10}{'ops/round':>11}{'in model':>10}{'outside':>9}{'syncs/round':>13}")
    rows = {**phases, "total": tuple(sum(values) for values in zip(*phases.values()))}
    for phase, (milliseconds, ops, syncs, model_ops) in rows.items():
        print(f"{phase:<16}{milliseconds / rounds:>10.3f}{ops / rounds:>11.1f}{model_ops / rounds:>10.1f}"
              f"{(ops - model_ops) / rounds:>9.1f}{syncs / rounds:>13.1f}")


if __name__ == "__main__":
    main()
