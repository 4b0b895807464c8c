"""The benchmark suite: every experiment on every prompt, side by side in one process.

Per pair: warm every method up, then time `repeats` passes of all methods interleaved (background load drifts hit
every method alike), each prompt (or batch) timed on its own so latency percentiles and per-category numbers come
from the same runs. A batch's time is its median over the repeats; a row's tokens/s is Σ tokens / Σ times.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .. import testing
from ..drafters import TreeConfig, lab_checkpoints
from ..stats import add_counts
from .experiments import EXPERIMENTS, FULL_EXPERIMENTS, HEADLINE_EXPERIMENTS, Method, add_oracle_rows, build_methods
from .measure import (
    DTYPES,
    ForwardMeter,
    load_average,
    machine_description,
    measure_step_costs,
    per_token_acceptance,
    percentile,
    round_profile,
    synchronize,
    theoretical_speedup,
)
from .pairs import Pair, iterate_pairs
from .prompts import BUILTIN_CATEGORIES, Prompt, encode, left_padded_batches, load_prompts

QUICK_PAIR = dict(hidden_size=64, num_layers=4, draft_layers=1, vocab_size=512, intermediate_size=128, num_heads=4,
                  num_kv_heads=2)


@dataclass
class SuiteConfig:
    """What to run. Defaults: the headline rows (plain, transformers' assisted, our chain and `auto`, greedy) on the
    synthetic ~206M pair at agreement 0.9, one prompt of each built-in category (about 5 minutes on 2 CPU cores).
    `full()` runs every experiment on 2 prompts per category, greedy and sampling; `quick()` a tiny smoke test."""

    target: str | None = None  # Hub name or local dir; None = the synthetic pair (or the lab's, with `lab`)
    drafters: dict[str, str] = field(default_factory=dict)  # name -> Hub name / local dir
    lab: str | None = None  # a recipes/lab.py output dir: its target and every drafter it trained
    prompts: tuple[str, ...] = BUILTIN_CATEGORIES  # built-in category names and/or JSONL paths
    prompts_per_category: int | None = 1
    max_prompt_tokens: int = 512  # prompts keep their last this-many tokens
    experiments: tuple[str, ...] = HEADLINE_EXPERIMENTS
    decodings: tuple[str, ...] = ("greedy",)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling of the sampling rows (1.0: off)
    agreements: tuple[float, ...] = (0.9,)  # synthetic pair only
    dtype: str = "float32"
    device: str = "cpu"
    num_draft_tokens: int = 6
    auto_max_draft_tokens: int = 16  # the auto row's num_draft_tokens: the longest draft schedule="auto" may pick
    draft_lengths: tuple[int, ...] = (1, 2, 4, 8)  # gamma-sweep
    batch_sizes: tuple[int, ...] = (1, 4, 8)  # batch-sweep
    tree: tuple[int, int, int] = (5, 4, 24)  # depth, top_k, max_nodes
    ngram_size: int = 3
    max_new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per core)
    sorted_exits: tuple[int, ...] = ()
    sorted_thresholds: tuple[float, ...] = ()
    routing: str | None = None  # a recipes/route.py output (routing.json + router): specialized_drafts, adaptive_routing
    pair_shape: dict = field(default_factory=lambda: dict(testing.DEFAULT_PAIR_SHAPE))

    @classmethod
    def full(cls, **overrides) -> SuiteConfig:
        everything = dict(prompts_per_category=2, experiments=FULL_EXPERIMENTS, decodings=("greedy", "sample"))
        return cls(**{**everything, **overrides})

    @classmethod
    def quick(cls, **overrides) -> SuiteConfig:
        tiny = dict(prompts_per_category=1, max_prompt_tokens=48, max_new_tokens=12, num_draft_tokens=3,
                    draft_lengths=(1, 4), batch_sizes=(1, 4), tree=(3, 2, 6), repeats=1, pair_shape=dict(QUICK_PAIR),
                    auto_max_draft_tokens=4)
        return cls(**{**tiny, **overrides})

    def __post_init__(self):
        self.prompts, self.experiments, self.decodings = tuple(self.prompts), tuple(self.experiments), \
            tuple(self.decodings)
        if self.lab is not None:
            if self.target is not None:
                raise ValueError("Pass either --lab or --target, not both.")
            self.target, lab_drafters = lab_checkpoints(self.lab)
            self.drafters = {**lab_drafters, **self.drafters}
        if self.target is not None and not self.drafters and set(self.experiments) - {"plain", "ngram", "sorted"}:
            raise ValueError(f"Experiments {sorted(set(self.experiments) - {'plain', 'ngram', 'sorted'})} need a "
                             "drafter: pass --draft (or --drafter NAME=PATH), or run only plain/ngram/sorted.")
        if unknown := set(self.experiments) - set(EXPERIMENTS):
            raise ValueError(f"Unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}.")
        if "adaptive_routing" in self.experiments and not self.routing:
            raise ValueError("The adaptive_routing experiment needs --routing DIR (a recipes/route.py output).")
        if "sorted" in self.experiments and not self.sorted_exits:
            raise ValueError("The sorted experiment needs --sorted-exits (e.g. 1,2,4).")
        if bad := set(self.decodings) - {"greedy", "sample"}:
            raise ValueError(f"decodings must be greedy and/or sample, got {sorted(bad)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.repeats < 1 or self.warmup < 0 or self.max_new_tokens < 2 or self.max_prompt_tokens < 1:
            raise ValueError("Need repeats >= 1, warmup >= 0, max_new_tokens >= 2 and max_prompt_tokens >= 1.")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (greedy decoding is the 'greedy' decoding).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if min(self.batch_sizes) < 1 or min(self.draft_lengths) < 1 or self.auto_max_draft_tokens < 1:
            raise ValueError("batch sizes, draft lengths and auto_max_draft_tokens must be >= 1.")
        TreeConfig(*self.tree)  # fail on bad tree sizes before any model is built

    @property
    def tree_config(self) -> TreeConfig:
        return TreeConfig(*self.tree)


@dataclass
class BatchRun:
    """One timed generate() call."""

    wall_seconds: float
    sequences: torch.Tensor  # [batch, new tokens] (on the CPU)
    new_tokens: int  # generated tokens up to and including EOS
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    model_seconds: float = 0.0
    engine_seconds: float = 0.0
    accepted_length_counts: list[int] = field(default_factory=list)
    exit_counts: dict[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def run_suite(config: SuiteConfig, show_progress: bool = True) -> dict:
    """Run everything `config` asks for; return a JSON-ready report (see `report.format_suite_report`)."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    machine = machine_description(config.device)
    prompts = load_prompts(config.prompts, config.prompts_per_category)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' assisted generation warns about its own internal kwargs
    pairs = []
    try:
        for pair in iterate_pairs(config):
            with torch.no_grad():
                pairs.append(bench_pair(config, pair, prompts, show_progress))
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
    machine["load_average_end"] = load_average()
    categories = list(dict.fromkeys(prompt.category for prompt in prompts))
    return dict(config=asdict(config), machine=machine, categories=categories,
                prompts=[dict(id=p.id, category=p.category) for p in prompts], pairs=pairs,
                wall_seconds=time.perf_counter() - started)


def bench_pair(config: SuiteConfig, pair: Pair, prompts: list[Prompt], show_progress: bool) -> dict:
    methods = build_methods(config, pair)
    token_lists = [encode(prompt, pair.tokenizer, config.max_prompt_tokens) for prompt in prompts]
    batches = {size: left_padded_batches(token_lists, size, pair.pad_token_id, pair.target.device)
               for size in {method.batch_size for method in methods}}
    eos = _eos_ids(pair.target)
    progress = tqdm(total=len(methods) * (config.warmup + config.repeats), desc=f"bench {_pair_name(pair)}",
                    unit="run", disable=not show_progress)
    for _ in range(config.warmup):  # allocator, kernels, lazy inits; captured graphs; auto's measurements
        for method in methods:
            progress.set_postfix_str(f"warm-up {method.name} bs={method.batch_size}")
            warm = batches[method.batch_size] if method.warmup_every_batch else batches[method.batch_size][:1]
            for _ in range(method.warmup_runs):
                for batch in warm:
                    method.generate(batch, config.max_new_tokens if method.warmup_every_batch else
                                    min(8, config.max_new_tokens))
            progress.update()
    runs: dict[tuple, list[list[BatchRun]]] = {method.key: [] for method in methods}
    for repeat in range(config.repeats):
        # every method once per repeat, in an order rotated by one each repeat: load drift hits all alike
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            progress.set_postfix_str(f"{method.name} {method.decoding} bs={method.batch_size}")
            runs[method.key].append(time_method(method, batches[method.batch_size], config, pair, eos))
            progress.update()
    progress.close()
    add_oracle_rows(methods, runs)
    costs = _step_costs(methods, pair.target)
    rows = [summarize_method(method, methods, runs, prompts, costs) for method in methods]
    for method, row in zip(methods, rows):
        if method.experiment in SPECULATIVE_ENGINE_ROWS:  # one extra, untimed run under the profiler
            row["overall"].update(round_costs(method, batches[method.batch_size][0], config.max_new_tokens))
    for method, row in zip(methods, rows):
        if row["overall"]["equal_to_plain"] is False:
            row["greedy_mismatches"] = diagnose_mismatches(method, methods, runs, batches, pair.target)
    return dict(**pair.description, target_parameters=_parameters(pair.target),
                target_step_seconds=next(iter(costs.values()), {}).get("target_step_seconds"),
                drafters={spec.name: dict(kind=spec.kind, parameters=_parameters(spec.model),
                                          **_drafter_costs(costs, spec.model)) for spec in pair.drafters},
                rows=rows)


def time_method(method: Method, batches: list[dict], config: SuiteConfig, pair: Pair, eos) -> list[BatchRun]:
    results = []
    models = {"target": pair.target}
    if method.meter_draft:
        models["draft"] = method.draft_model
    for index, batch in enumerate(batches):
        torch.manual_seed(config.seed + index)  # sampling draws the same random numbers in every repeat
        with ForwardMeter(models) as meter:
            synchronize(pair.target.device)
            start = time.perf_counter()
            sequences, stats = method.generate(batch, config.max_new_tokens)
            synchronize(pair.target.device)
            wall = time.perf_counter() - start
        new = sequences[:, batch["input_ids"].shape[1] :].cpu()
        results.append(_batch_run(wall, new, _generated_tokens(new, eos), stats, meter))
    return results


def _batch_run(wall, sequences, new_tokens, stats, meter) -> BatchRun:
    if stats is not None:  # hf_specdec reports its own counts and times
        return BatchRun(wall, sequences, new_tokens, drafted=int(stats.drafted.sum()),
                        accepted=int(stats.accepted.sum()), rounds=int(stats.rounds.sum()),
                        model_seconds=stats.model_seconds, engine_seconds=stats.wall_seconds,
                        accepted_length_counts=list(stats.accepted_length_counts), exit_counts=dict(stats.exit_counts))
    if "draft" not in meter.calls:  # plain generate
        return BatchRun(wall, sequences, new_tokens, model_seconds=sum(meter.seconds.values()), engine_seconds=wall)
    # transformers' assisted generation: one target forward per round (its prefill included, as a round that
    # accepted nothing), one draft forward per drafted token
    rounds, drafted = meter.calls["target"], meter.calls["draft"]
    return BatchRun(wall, sequences, new_tokens, drafted=drafted, accepted=max(new_tokens - rounds, 0), rounds=rounds,
                    model_seconds=sum(meter.seconds.values()), engine_seconds=wall)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


def _generated_tokens(sequences: torch.Tensor, eos: set[int]) -> int:
    """Tokens generated per row up to and including its first EOS (the rest is padding)."""
    if not eos:
        return sequences.numel()
    is_eos = torch.isin(sequences, torch.tensor(sorted(eos)))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(sequences[:, 0], sequences.shape[1]))
    return int(first.sum())


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------


def summarize_method(method: Method, methods: list[Method], runs: dict, prompts: list[Prompt], costs: dict) -> dict:
    """Overall and per-category numbers of one method (per category for batch size 1 only)."""
    plain = _plain_for(method, methods)
    mine, baseline = runs[method.key], runs[plain.key] if plain else None
    groups = {"overall": range(len(mine[0]))}
    if method.batch_size == 1:
        for category in dict.fromkeys(prompt.category for prompt in prompts):
            groups[category] = [i for i, prompt in enumerate(prompts) if prompt.category == category]
    cost = costs.get((id(method.draft_model), method.num_draft_tokens)) if method.has_formula else None
    stats = {name: _group_stats(method, mine, baseline, list(indices), cost) for name, indices in groups.items()}
    assisted = _assisted_for(method, methods)
    versus = _wall_ratio(mine, runs[assisted.key]) if assisted is not None and method.experiment in \
        SPECULATIVE_ENGINE_ROWS else None
    first = mine[0]
    row = dict(experiment=method.experiment, name=method.name, drafter=method.drafter, batch_size=method.batch_size,
               decoding=method.decoding, num_draft_tokens=method.num_draft_tokens,
               tree=None if method.tree is None else list(method.tree), overall=stats.pop("overall"),
               categories=stats, versus_assisted=versus,
               accepted_length_counts=functools.reduce(add_counts, (run.accepted_length_counts for run in first), []))
    exits = _sum_dicts(run.exit_counts for run in first)
    if exits:
        row["exit_counts"] = {str(layer): count for layer, count in sorted(exits.items())}
    return row


# rows of hf_specdec's engine that are compared with transformers' assisted generation and profiled per round
SPECULATIVE_ENGINE_ROWS = ("chain", "compiled", "auto")


def _assisted_for(method: Method, methods: list[Method]) -> Method | None:
    for other in methods:
        if other.experiment == "assisted" and (other.decoding, other.batch_size) == (method.decoding, method.batch_size):
            return other
    return None


def _wall_ratio(mine: list[list[BatchRun]], theirs: list[list[BatchRun]]) -> dict:
    """Our wall time ÷ theirs over all batches, per repeat (both ran in the same repeat, next to each other)."""
    ratios = [sum(run.wall_seconds for run in a) / sum(run.wall_seconds for run in b) for a, b in zip(mine, theirs)]
    return dict(wall_ratio=statistics.median(ratios), spread=[min(ratios), max(ratios)],
                uncertain=min(ratios) <= 1.0 <= max(ratios))


def round_costs(method: Method, batch: dict, max_new_tokens: int) -> dict:
    """Aten ops and host-synchronising ops per round (prefill excluded), from one profiled run."""
    phases, (_, stats) = round_profile(lambda: method.generate(batch, max_new_tokens))
    rounds = int(stats.rounds.max()) if stats is not None else 0
    if not rounds:  # auto handed the call to plain decoding
        return dict(ops_per_round=None, syncs_per_round=None)
    in_rounds = [values for phase, values in phases.items() if phase != "prefill"]
    return dict(ops_per_round=sum(v[1] for v in in_rounds) / rounds,
                syncs_per_round=sum(v[2] for v in in_rounds) / rounds)


def _plain_for(method: Method, methods: list[Method]) -> Method | None:
    for other in methods:
        if other.experiment == "plain" and (other.decoding, other.batch_size) == (method.decoding, method.batch_size):
            return other
    return None


def _group_stats(method: Method, mine: list[list[BatchRun]], baseline, indices: list[int], cost) -> dict:
    walls = [statistics.median(repeat[i].wall_seconds for repeat in mine) for i in indices]
    first = [mine[0][i] for i in indices]
    tokens = sum(run.new_tokens for run in first)
    tokens_per_second = tokens / sum(walls)
    speedup, spread = None, None
    if baseline is not None:
        plain_walls = [statistics.median(repeat[i].wall_seconds for repeat in baseline) for i in indices]
        plain_tokens = sum(baseline[0][i].new_tokens for i in indices)
        speedup = tokens_per_second / (plain_tokens / sum(plain_walls))
        # per repeat, against the plain run of the same repeat
        spread = [(tokens / sum(repeat[i].wall_seconds for i in indices))
                  / (plain_tokens / sum(base[i].wall_seconds for i in indices)) for repeat, base in zip(mine, baseline)]
    drafted, accepted, rounds = (sum(getattr(run, name) for run in first) for name in ("drafted", "accepted", "rounds"))
    speculative = method.experiment != "plain"
    tau = (accepted + rounds) / rounds if speculative and rounds else None
    stats = dict(
        new_tokens=tokens, wall_seconds=sum(walls), tokens_per_second=tokens_per_second, speedup=speedup,
        speedup_spread=[min(spread), max(spread)] if spread and method.experiment != "plain" else None,
        speedup_uncertain=bool(spread) and method.experiment != "plain" and min(spread) <= 1.0 <= max(spread),
        acceptance_rate=accepted / drafted if speculative and drafted else None, mean_accepted_length=tau,
        drafted=drafted, accepted=accepted, rounds=rounds,
        latency_p50=percentile(walls, 0.5), latency_p95=percentile(walls, 0.95),
        equal_to_plain=_equal_to_plain(method, first, baseline, indices),
        loop_efficiency=_ratio(sum(r.model_seconds for r in first), sum(r.engine_seconds for r in first)),
        per_token_acceptance=None, theoretical_speedup=None, theoretical_speedup_with_verify_cost=None,
    )
    if cost is not None and tau is not None:
        gamma = method.num_draft_tokens
        alpha = per_token_acceptance(tau, gamma)  # the i.i.d. α whose E[τ] is the measured τ
        stats.update(per_token_acceptance=alpha,
                     theoretical_speedup=theoretical_speedup(alpha, gamma, cost["cost_ratio"]),
                     theoretical_speedup_with_verify_cost=theoretical_speedup(alpha, gamma, cost["cost_ratio"],
                                                                              cost["verify_cost_ratio"]))
    return stats


def _equal_to_plain(method: Method, first: list[BatchRun], baseline, indices: list[int]) -> bool | None:
    if method.decoding != "greedy" or baseline is None:
        return None  # sampled outputs are checked statistically by the test suite, not here
    return all(torch.equal(run.sequences, baseline[0][i].sequences) for run, i in zip(first, indices))


# A greedy divergence where plain decoding's top two logits differ by less than this (relative to the logit) is a
# floating-point tie: a multi-token verify forward sums in another order than a one-token decoding step, so
# near-equal logits can swap. Anything larger is a real difference. Half-precision dtypes round far more coarsely.
TIE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@torch.no_grad()
def diagnose_mismatches(method: Method, methods: list[Method], runs: dict, batches: dict, target) -> list[dict]:
    """Where a greedy row left plain greedy: prompt row, first differing position, and plain decoding's logit
    margin there (the target re-run on plain's own prefix). `tie` = the margin is within float rounding."""
    plain = _plain_for(method, methods)
    found = []
    for index, (mine, reference) in enumerate(zip(runs[method.key][0], runs[plain.key][0])):
        batch = batches[method.batch_size][index]
        for row in range(reference.sequences.shape[0]):
            expected, got = reference.sequences[row], mine.sequences[row]
            differ = (expected != got).nonzero()
            if not len(differ):
                continue
            position = int(differ[0])
            prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            context = torch.cat([prompt, expected[:position].to(prompt.device)])[None]
            logits = target(context).logits[0, -1].float()
            margin = float(logits[expected[position]] - logits[got[position]])
            tolerance = TIE_TOLERANCE.get(target.dtype, 1e-5) * max(1.0, float(logits[expected[position]].abs()))
            found.append(dict(batch=index, row=row, position=position, plain_token=int(expected[position]),
                              token=int(got[position]), logit_margin=margin, tie=abs(margin) <= tolerance))
    return found


def _step_costs(methods: list[Method], target) -> dict:
    """c and the verify cost of every (draft model, γ) whose rows use the speed-up formula."""
    costs = {}
    for method in methods:
        key = (id(method.draft_model), method.num_draft_tokens)
        if method.has_formula and key not in costs:
            costs[key] = measure_step_costs(target, method.draft_model, num_verify_tokens=method.num_draft_tokens + 1)
    return costs


def _drafter_costs(costs: dict, model) -> dict:
    for (model_id, gamma), cost in sorted(costs.items(), key=lambda item: item[0][1]):
        if model_id == id(model):
            return dict(draft_step_seconds=cost["draft_step_seconds"], cost_ratio=cost["cost_ratio"],
                        verify_cost_ratio={str(g): c["verify_cost_ratio"] for (m, g), c in costs.items()
                                           if m == model_id})
    return {}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _sum_dicts(dicts) -> dict:
    total: dict = {}
    for values in dicts:
        for key, count in values.items():
            total[key] = total.get(key, 0) + count
    return total


def _parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _pair_name(pair: Pair) -> str:
    return f"synthetic {pair.description['agreement']}" if pair.description["pair"] == "synthetic" else "pair"
