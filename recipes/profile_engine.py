"""Where a speculative round spends its time: a per-phase breakdown from torch.profiler.

    python recipes/profile_engine.py                       # the overhead-bound pair (3-layer width-64 target)
    python recipes/profile_engine.py --pair synthetic      # the 206M synthetic pair (compute-bound on a CPU)
    python recipes/profile_engine.py --compile             # the captured (torch.compile) forwards

Every aten op the profiler records is attributed to the innermost engine phase that ran it (draft, verify
forward, processors, acceptance, cache ops, bookkeeping; "prefill" and "other" for the rest). The table gives,
per phase: CPU time, aten ops per round and host-synchronising ops per round (`item`/`bool()`/`int()` reads,
`nonzero`, `unique`, copies to the host — each one stalls the host on an accelerator). Numbers are per
steady-state round, from one profiled generate() after a warm-up.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hf_specdec
from hf_specdec import ModelDrafter, testing
from hf_specdec.engine import PHASES

# ops that make the host wait for the device (on a CPU they are cheap, but they still count)
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select", "aten::_to_copy_to_host", "aten::item")

PAIRS = {
    # 3-layer width-64 target and its first layer as the draft: a forward costs about as much as the loop around it
    "overhead": dict(agreement=0.75, hidden_size=64, num_layers=3, draft_layers=1, vocab_size=1024,
                     intermediate_size=128, num_heads=4, num_kv_heads=2),
    "synthetic": {},  # the benchmark's default 206M pair
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="overhead")
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
    target, draft = testing.build_synthetic_pair(**PAIRS[args.pair])
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

    with hf_specdec.engine.profiled_phases(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = target.generate(**batch, assistant_model=drafter, **kwargs)
        wall = time.perf_counter() - start
    rounds = int(out.spec_stats.rounds.max())
    print(f"pair {args.pair}, batch {args.batch_size}, γ={args.num_draft_tokens}, {args.new_tokens} new tokens: "
          f"{rounds} rounds, τ {out.spec_stats.mean_accepted_length:.2f}, wall {wall * 1e3:.1f} ms under the "
          f"profiler ({wall / rounds * 1e3:.2f} ms per round)")
    print_breakdown(prof, rounds)


def print_breakdown(prof, rounds: int) -> None:
    time_us, ops, syncs = collections.Counter(), collections.Counter(), collections.Counter()
    phase_names = {f"spec::{name}" for name in PHASES}
    for event in prof.events():
        if event.name in phase_names:
            time_us[event.name[6:]] += event.cpu_time_total
            continue
        if not event.name.startswith("aten::"):
            continue
        phase, parent = "other", event.cpu_parent
        while parent is not None:
            if parent.name in phase_names:
                phase = parent.name[6:]
                break
            parent = parent.cpu_parent
        is_top_level_op = event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")
        ops[phase] += is_top_level_op
        syncs[phase] += event.name in SYNC_OPS
    print(f"{'phase':<16}{'ms/round':>10}{'ops/round':>11}{'syncs/round':>13}")
    for phase in [*PHASES, "other"]:
        print(f"{phase:<16}{time_us[phase] / 1e3 / rounds:>10.3f}{ops[phase] / rounds:>11.1f}"
              f"{syncs[phase] / rounds:>13.1f}")
    print(f"{'total':<16}{sum(time_us.values()) / 1e3 / rounds:>10.3f}{sum(ops.values()) / rounds:>11.1f}"
          f"{sum(syncs.values()) / rounds:>13.1f}")


if __name__ == "__main__":
    main()
