"""Offline benchmark: every decoding method side by side, in one process, on the same prompts.

For each target/draft pair (by default the synthetic pair of `hf_specdec.testing` at several agreement rates) it
times plain greedy `generate`, transformers' own assisted generation (batch 1), hf_specdec chains, trees and
n-grams (batch 1) and hf_specdec chains against plain `generate` at larger batch sizes. Each row reports
throughput, speedup over plain decoding at the same batch size, acceptance rate α, mean accepted length τ,
whether the output equals plain greedy token for token, loop efficiency and the theoretical speedup
`(1 − α^(γ+1)) / ((1 − α)(γc + 1))` from the measured α, the draft length γ and the measured cost ratio c.

Performance is measured here, never asserted: run `hf-specdec bench` (see docs/benchmark.md).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from . import testing
from .drafters import ModelDrafter, NGramDrafter, SortedDrafter, TreeConfig
from .stats import SpecStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchConfig:
    """What to run. `quick()` gives tiny sizes for smoke tests; the defaults take ~15 minutes on a 2-core CPU."""

    target: str | None = None  # Hub name or local dir; None = the synthetic pair
    draft: str | None = None
    agreements: tuple[float, ...] = (0.6, 0.9)  # synthetic pair only
    dtype: str = "float32"
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    num_draft_tokens: int = 6
    tree: tuple[int, int, int] = (5, 4, 24)  # depth, top_k, max_nodes
    ngram_size: int = 3
    max_new_tokens: int = 32
    num_prompts: int = 8
    prompt_lengths: tuple[int, int] = (8, 32)  # min, max prompt length
    repeats: int = 3
    sampling: bool = False
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per core)
    sorted_exits: tuple[int, ...] = ()  # self-speculative SortedDrafter rows on the target's own first layers
    sorted_thresholds: tuple[float, ...] = ()  # adaptive thresholds (one per exit but the last); default 0.7 each
    pair_shape: dict = field(default_factory=lambda: dict(testing.DEFAULT_PAIR_SHAPE))

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        tiny = dict(
            batch_sizes=(1, 2, 4), num_draft_tokens=4, tree=(3, 2, 6), max_new_tokens=16, num_prompts=4,
            prompt_lengths=(4, 12), repeats=1,
            pair_shape=dict(hidden_size=64, num_layers=4, draft_layers=1, vocab_size=512, intermediate_size=128,
                            num_heads=4, num_kv_heads=2),
        )
        return cls(**{**tiny, **overrides})

    def __post_init__(self):
        if (self.target is None) != (self.draft is None):
            raise ValueError("Pass both --target and --draft, or neither (the synthetic pair).")
        if any(self.num_prompts % size for size in self.batch_sizes):
            raise ValueError(f"num_prompts={self.num_prompts} must be a multiple of every batch size {self.batch_sizes}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.repeats < 1 or self.max_new_tokens < 2:
            raise ValueError("Need repeats >= 1 and max_new_tokens >= 2.")
        TreeConfig(*self.tree)  # fail on bad tree sizes before any model is built

    @property
    def tree_config(self) -> TreeConfig:
        depth, top_k, max_nodes = self.tree
        return TreeConfig(depth=depth, top_k=top_k, max_nodes=max_nodes)


# --------------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardMeter:
    """Counts and times the top-level forward calls of some models (for methods that report no SpecStats)."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.models = models
        self.calls = dict.fromkeys(models, 0)
        self.seconds = dict.fromkeys(models, 0.0)
        self._handles, self._started = [], {}

    def __enter__(self) -> ForwardMeter:
        for name, model in self.models.items():
            self._handles.append(model.register_forward_pre_hook(self._start(name)))
            self._handles.append(model.register_forward_hook(self._stop(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _start(self, name):
        def hook(module, args):
            _synchronize(module.device)
            self._started[name] = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(module, args, output):
            _synchronize(module.device)
            self.calls[name] += 1
            self.seconds[name] += time.perf_counter() - self._started[name]

        return hook


@torch.no_grad()
def measure_step_costs(target, draft, num_verify_tokens: int, context_length: int = 32, steps: int = 12) -> dict:
    """Median seconds of one cached decoding step of each model, and of a `num_verify_tokens`-token target forward.

    c = draft step / target step enters the theoretical speedup; `verify_cost_ratio` (a γ+1-token target forward
    over a one-token one) says how far the formula's "verification costs one step" assumption holds here.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    context = torch.randint(testing.FIRST_ORDINARY_TOKEN_ID, vocab, (1, context_length), generator=generator)

    def forward_seconds(model, width: int) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(context.to(model.device), past_key_values=cache, use_cache=True)
        tokens = context[:, :width].to(model.device)
        timings = []
        for _ in range(steps + 2):  # the first two are warm-up
            _synchronize(model.device)
            start = time.perf_counter()
            model(tokens, past_key_values=cache, use_cache=True)
            _synchronize(model.device)
            timings.append(time.perf_counter() - start)
            cache.crop(-width)
        return statistics.median(timings[2:])

    target_step, draft_step = forward_seconds(target, 1), forward_seconds(draft, 1)
    verify = forward_seconds(target, num_verify_tokens)
    return dict(target_step_seconds=target_step, draft_step_seconds=draft_step, cost_ratio=draft_step / target_step,
                verify_seconds=verify, verify_cost_ratio=verify / target_step)


def expected_tokens_per_round(acceptance_rate: float, num_draft_tokens: int) -> float:
    """E[τ] = (1 − α^(γ+1)) / (1 − α) for i.i.d. per-token acceptance α (Leviathan et al. 2023)."""
    alpha, gamma = acceptance_rate, num_draft_tokens
    return gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def theoretical_speedup(acceptance_rate: float, num_draft_tokens: int, cost_ratio: float,
                        verify_cost: float = 1.0) -> float:
    """Expected walltime improvement `(1 − α^(γ+1)) / ((1 − α)(γc + 1))` (Leviathan et al. 2023).

    `verify_cost` (a γ+1-token target forward in target steps) replaces the formula's assumption that it is 1.
    """
    return expected_tokens_per_round(acceptance_rate, num_draft_tokens) / (num_draft_tokens * cost_ratio + verify_cost)


def per_token_acceptance(mean_accepted_length: float, num_draft_tokens: int) -> float:
    """The per-token α whose E[τ] equals the measured τ.

    The formula's α is the chance that one draft token is accepted given the ones before it were. Accepted/drafted
    is smaller (tokens drafted after a rejection count as drafted, never as accepted: with α = 0.9 and γ = 6 it is
    0.70), so plugging it in would understate the theory. E[τ] increases with α, so bisection inverts it.
    """
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_tokens_per_round(middle, num_draft_tokens) < mean_accepted_length \
            else (low, middle)
    return (low + high) / 2


# --------------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One row of the table: how to generate for one batch, and what to compare it with."""

    name: str
    batch_size: int
    do_sample: bool
    generate: Callable[[dict, int, bool], tuple[torch.Tensor, SpecStats | None]]  # (batch, max_new_tokens, do_sample)
    # γ for the theoretical speedup; None where the formula does not apply (trees; n-grams, which draft only
    # when they find a match, so γ tokens are not drafted every round)
    num_draft_tokens: int | None = None
    meter_draft: bool = False  # no SpecStats: count the draft model's forwards with hooks

    @property
    def key(self) -> tuple:
        return (self.name, self.batch_size, self.do_sample)

    def run(self, batch: dict, max_new_tokens: int) -> tuple[torch.Tensor, SpecStats | None]:
        return self.generate(batch, max_new_tokens, self.do_sample)


def build_methods(config: BenchConfig, target, draft) -> list[Method]:
    gamma = config.num_draft_tokens

    def plain(batch, max_new_tokens, do_sample):
        return target.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample), None

    def transformers_assisted(batch, max_new_tokens, do_sample):
        # transformers reads these from the assistant's generation_config, not from generate() kwargs.
        draft.generation_config.num_assistant_tokens = gamma
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        sequences = target.generate(**batch, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=do_sample)
        return sequences, None

    def ours(make_drafter):
        def run(batch, max_new_tokens, do_sample):
            out = target.generate(**batch, assistant_model=make_drafter(), max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, return_dict_in_generate=True)
            return out.sequences, out.spec_stats

        return run

    chain = ours(lambda: ModelDrafter(draft, num_draft_tokens=gamma))
    tree = ours(lambda: ModelDrafter(draft, tree=config.tree_config))
    ngram = ours(lambda: NGramDrafter(max_ngram=config.ngram_size, num_draft_tokens=gamma))

    methods = []
    if config.sorted_exits:
        methods += sorted_methods(config, target, ours)
    for do_sample in (False, True) if config.sampling else (False,):
        methods += [
            Method("plain", 1, do_sample, plain),
            Method("transformers-assisted", 1, do_sample, transformers_assisted, gamma, meter_draft=True),
            Method("chain", 1, do_sample, chain, gamma),
        ]
        if not do_sample:  # sampling rows compare the two chain implementations only
            methods += [Method("tree", 1, do_sample, tree), Method("ngram", 1, do_sample, ngram)]
            for size in config.batch_sizes:
                if size > 1:
                    methods += [Method("plain", size, do_sample, plain), Method("chain", size, do_sample, chain, gamma)]
    return methods


def sorted_methods(config: BenchConfig, target, ours) -> list[Method]:
    """SD2 rows: each fixed exit, adaptive exits, chain and tree, drafting with the target's own first layers.
    The speed-up formula's c (a separate draft model's cost) does not apply, so no γ is given for the theory."""
    exits = list(config.sorted_exits)
    thresholds = list(config.sorted_thresholds) or [0.7] * (len(exits) - 1)
    gamma, tree = config.num_draft_tokens, config.tree_config

    def make(**kwargs):
        return ours(lambda: SortedDrafter.from_target(target, num_draft_tokens=gamma, **kwargs))

    rows = [Method(f"sorted exit {e}", 1, False, make(exits=[e])) for e in exits]
    rows.append(Method(f"sorted adaptive {exits}", 1, False, make(exits=exits, thresholds=thresholds)))
    rows.append(Method(f"sorted tree exit {exits[-1]}", 1, False, make(exits=[exits[-1]], tree=tree)))
    rows.append(Method(f"sorted tree adaptive {exits}", 1, False, make(exits=exits, thresholds=thresholds, tree=tree)))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What one timed pass of a method over all prompts produced."""

    wall_seconds: float
    sequences: list[torch.Tensor]  # one [batch, new_tokens] tensor per batch
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    model_seconds: float = 0.0
    engine_wall_seconds: float = 0.0
    exit_counts: dict = field(default_factory=dict)  # sorted drafters: drafted tokens per exit layer


def run_method(method: Method, batches: list[dict], max_new_tokens: int, target, draft, seed: int) -> Measurement:
    models = {"target": target} if draft is None else {"target": target, "draft": draft}
    sequences, stats = [], []
    device = target.device
    with ForwardMeter(models) as meter:
        _synchronize(device)
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            torch.manual_seed(seed + index)  # sampling runs draw the same random numbers every repeat
            output, spec_stats = method.run(batch, max_new_tokens)
            sequences.append(output[:, batch["input_ids"].shape[1] :].cpu())
            stats.append(spec_stats)
        _synchronize(device)
        wall = time.perf_counter() - start
    if stats[0] is not None:  # hf_specdec reports its own counts and times
        return Measurement(
            wall, sequences,
            drafted=sum(int(s.drafted.sum()) for s in stats), accepted=sum(int(s.accepted.sum()) for s in stats),
            rounds=sum(int(s.rounds.sum()) for s in stats), target_forwards=sum(s.target_forwards for s in stats),
            draft_forwards=sum(s.draft_forwards for s in stats), model_seconds=sum(s.model_seconds for s in stats),
            engine_wall_seconds=sum(s.wall_seconds for s in stats), exit_counts=_sum_exit_counts(stats),
        )
    new_tokens = sum(s.numel() for s in sequences)
    rounds = meter.calls["target"] if draft is not None else 0  # assisted: no prefill, one target forward a round
    drafted = meter.calls.get("draft", 0)  # transformers' assistant runs one forward per drafted token
    return Measurement(wall, sequences, drafted=drafted, accepted=new_tokens - rounds if rounds else 0,
                       rounds=rounds, target_forwards=meter.calls["target"], draft_forwards=drafted,
                       model_seconds=sum(meter.seconds.values()), engine_wall_seconds=wall)


def summarize(method: Method, measurements: list[Measurement], reference: Measurement | None,
              baseline_seconds: float | None, costs: dict) -> dict:
    first = measurements[0]
    wall = statistics.median(m.wall_seconds for m in measurements)
    new_tokens = sum(s.numel() for s in first.sequences)
    speculative = method.name != "plain"
    alpha = first.accepted / first.drafted if speculative and first.drafted else None  # n-grams may draft nothing
    tau = (first.accepted + first.rounds) / first.rounds if first.rounds else None
    alpha_per_token = theory = theory_with_verify = None
    if method.num_draft_tokens and tau is not None:
        gamma = method.num_draft_tokens
        alpha_per_token = per_token_acceptance(tau, gamma)
        theory = theoretical_speedup(alpha_per_token, gamma, costs["cost_ratio"])
        theory_with_verify = theoretical_speedup(alpha_per_token, gamma, costs["cost_ratio"], costs["verify_cost_ratio"])
    equal_rows = total_rows = None
    if reference is not None and not method.do_sample:
        pairs = [(a, b) for ours, ref in zip(first.sequences, reference.sequences) for a, b in zip(ours, ref)]
        equal_rows, total_rows = sum(torch.equal(a, b) for a, b in pairs), len(pairs)
    return dict(
        method=method.name, batch_size=method.batch_size, decoding="sample" if method.do_sample else "greedy",
        new_tokens=new_tokens, wall_seconds=wall, wall_seconds_all=[m.wall_seconds for m in measurements],
        tokens_per_second=new_tokens / wall, speedup=baseline_seconds / wall if baseline_seconds else None,
        acceptance_rate=alpha, per_token_acceptance=alpha_per_token, mean_accepted_length=tau,
        drafted=first.drafted, accepted=first.accepted, rounds=first.rounds, num_draft_tokens=method.num_draft_tokens,
        target_forwards=first.target_forwards, draft_forwards=first.draft_forwards,
        equal_to_plain=None if equal_rows is None else equal_rows == total_rows,
        equal_rows=equal_rows, total_rows=total_rows,
        loop_efficiency=first.model_seconds / first.engine_wall_seconds if first.engine_wall_seconds else None,
        theoretical_speedup=theory, theoretical_speedup_with_verify_cost=theory_with_verify,
        **({"exit_counts": {str(k): v for k, v in first.exit_counts.items()}} if first.exit_counts else {}),
    )


def _sum_exit_counts(stats) -> dict:
    totals: dict[int, int] = {}
    for spec_stats in stats:
        for layer, count in spec_stats.exit_counts.items():
            totals[layer] = totals.get(layer, 0) + count
    return totals


def bench_pair(config: BenchConfig, target, draft, progress: tqdm) -> tuple[list[dict], dict]:
    """Warm every method up, then time `repeats` rounds of all methods (interleaved, so background load drifts
    hit every method alike); summarise each against plain decoding at the same batch size and sampling mode."""
    methods = build_methods(config, target, draft)
    low, high = config.prompt_lengths
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    pad = target.generation_config.pad_token_id
    batches = {size: testing.synthetic_prompts(config.num_prompts, batch_size=size, vocab_size=vocab, min_length=low,
                                               max_length=high, seed=config.seed, pad_token_id=pad,
                                               device=target.device)
               for size in {method.batch_size for method in methods}}
    costs = measure_step_costs(target, draft, num_verify_tokens=config.num_draft_tokens + 1)

    measurements: dict[tuple, list[Measurement]] = {method.key: [] for method in methods}
    for method in methods:  # warm-up: allocator, kernels, lazy inits
        progress.set_postfix_str(f"warm-up {method.name} bs={method.batch_size}")
        method.run(batches[method.batch_size][0], min(8, config.max_new_tokens))
        progress.update()
    for _ in range(config.repeats):
        for method in methods:
            progress.set_postfix_str(f"{method.name} bs={method.batch_size}")
            measurements[method.key].append(run_method(method, batches[method.batch_size], config.max_new_tokens,
                                                       target, draft if method.meter_draft else None, config.seed))
            progress.update()

    results = []
    for method in methods:
        plain_key = ("plain", method.batch_size, method.do_sample)
        reference = measurements[plain_key][0]
        baseline = statistics.median(m.wall_seconds for m in measurements[plain_key])
        result = summarize(method, measurements[method.key], reference, baseline, costs)
        plain_batch_1 = measurements.get(("plain", 1, method.do_sample))
        if plain_batch_1:
            result["speedup_vs_plain_batch_1"] = result["tokens_per_second"] / _tokens_per_second(plain_batch_1)
        results.append(result)
    return results, costs


def _tokens_per_second(measurements: list[Measurement]) -> float:
    new_tokens = sum(sequences.numel() for sequences in measurements[0].sequences)
    return new_tokens / statistics.median(m.wall_seconds for m in measurements)


# --------------------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------------------


def _load_pair(config: BenchConfig):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[config.dtype]
    target = AutoModelForCausalLM.from_pretrained(config.target, dtype=dtype).to(config.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(config.draft, dtype=dtype).to(config.device).eval()
    for model in (target, draft):  # a throughput benchmark generates to the length limit
        model.generation_config.eos_token_id = None
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = testing.PAD_TOKEN_ID
    return target, draft


def iterate_pairs(config: BenchConfig):
    """Yield (description, target, draft): the loaded pair, or one synthetic pair per agreement rate."""
    if config.target is not None:
        target, draft = _load_pair(config)
        yield dict(pair=f"{config.target} + {config.draft}"), target, draft
        return
    for agreement in config.agreements:
        target, draft = testing.build_synthetic_pair(agreement, seed=config.seed, dtype=DTYPES[config.dtype],
                                                     device=config.device, **config.pair_shape)
        yield dict(pair="synthetic", agreement=agreement, residual_scale=target.synthetic_pair_info["residual_scale"]), \
            target, draft
        del target, draft


def _parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def machine_description(device: str) -> dict:
    description = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), device=device, load_average_start=_load_average(),
    )
    import transformers

    description["transformers"] = transformers.__version__
    if str(device).startswith("cuda") and torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def run_bench(config: BenchConfig, show_progress: bool = True) -> dict:
    """Run everything `config` asks for; return a JSON-ready report (see `format_report`)."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    machine = machine_description(config.device)
    num_pairs = 1 if config.target is not None else len(config.agreements)
    methods_per_pair = len(build_methods(config, None, None))
    progress = tqdm(total=num_pairs * methods_per_pair * (config.repeats + 1), desc="bench", unit="run",
                    disable=not show_progress)
    pairs = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' assisted generation warns about its own internal kwargs
    try:
        for description, target, draft in iterate_pairs(config):
            progress.set_postfix_str(f"pair {description.get('agreement', description['pair'])}")
            with torch.no_grad():
                results, costs = bench_pair(config, target, draft, progress)
            pairs.append(dict(**description, target_parameters=_parameter_count(target),
                              draft_parameters=_parameter_count(draft), **costs, results=results))
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        progress.close()
    # Other processes on the machine skew every timing; the load average says how busy it was.
    machine["load_average_end"] = _load_average()
    return dict(config=asdict(config), machine=machine, pairs=pairs, wall_seconds=time.perf_counter() - started)


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

COLUMNS = ("method", "batch", "decoding", "tok/s", "speedup", "α", "α/tok", "τ", "=greedy", "loop eff", "theory",
           "w/ verify")


def _format_row(result: dict) -> tuple[str, ...]:
    def number(value, pattern):
        return "-" if value is None else pattern.format(value)

    if result["equal_rows"] is None:
        equal = "n/a" if result["decoding"] == "sample" else "-"
    elif result["method"] == "plain":
        equal = "ref"
    else:
        equal = "yes" if result["equal_to_plain"] else f"no {result['equal_rows']}/{result['total_rows']}"
    speculative = result["method"] != "plain"
    return (
        result["method"], str(result["batch_size"]), result["decoding"], number(result["tokens_per_second"], "{:.1f}"),
        number(result["speedup"], "{:.2f}x"), number(result["acceptance_rate"] if speculative else None, "{:.2f}"),
        number(result["per_token_acceptance"], "{:.2f}"),
        number(result["mean_accepted_length"] if speculative else None, "{:.2f}"), equal,
        number(result["loop_efficiency"], "{:.2f}"), number(result["theoretical_speedup"], "{:.2f}x"),
        number(result["theoretical_speedup_with_verify_cost"], "{:.2f}x"),
    )


def format_table(results: Sequence[dict], markdown: bool = False) -> str:
    rows = [COLUMNS] + [_format_row(result) for result in results]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    aligned = [
        "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(aligned[:1] + ["-" * len(aligned[0])] + aligned[1:])


def pair_heading(pair: dict, config: dict) -> str:
    name = f"synthetic pair, agreement {pair['agreement']}" if pair["pair"] == "synthetic" else pair["pair"]
    return (
        f"{name}: target {pair['target_parameters'] / 1e6:.3g}M params, draft {pair['draft_parameters'] / 1e6:.3g}M; "
        f"target step {pair['target_step_seconds'] * 1e3:.1f} ms, draft step "
        f"{pair['draft_step_seconds'] * 1e3:.1f} ms, c = {pair['cost_ratio']:.3f}, γ+1-token verify = "
        f"{pair['verify_cost_ratio']:.2f} target steps; γ = {config['num_draft_tokens']}, tree "
        f"(depth, top_k, max_nodes) = {tuple(config['tree'])}, {config['num_prompts']} prompts × "
        f"{config['max_new_tokens']} new tokens, median of {config['repeats']}"
    )


def format_report(report: dict, markdown: bool = False) -> str:
    blocks = []
    for pair in report["pairs"]:
        blocks.append(pair_heading(pair, report["config"]) + "\n\n" + format_table(pair["results"], markdown))
        exits = [f"{row['method']}: {row['exit_counts']}" for row in pair["results"] if row.get("exit_counts")]
        if exits:
            blocks.append("drafted tokens per exit layer — " + "; ".join(exits))
    blocks.append(f"total wall time {report['wall_seconds']:.0f} s")
    return "\n\n".join(blocks)

