"""Experiments by name: each expands into methods (rows of the report) for one pair.

    plain        target.generate, the baseline of every speed-up (one row per decoding and batch size used)
    plain-compiled  target.generate with transformers' static cache and torch.compile (compile_config)
    assisted     transformers' own assisted generation with the first plain-model drafter (batch 1), drafting
                 the same constant γ as our chains (no confidence stop)
    assisted-default  the same at transformers' own defaults: up to 20 draft tokens per round, stopped early where
                 the draft's confidence falls under 0.4 (a threshold transformers tunes within each call from the
                 drafts' outcomes where scikit-learn is installed)
    chain, tree  every drafter of the pair, chains of γ tokens / dynamic trees (batch 1; sampled trees draw their
                 children from the drafter and verify them by recursive rejection)
    tree-top-k   sampling only: every drafter's trees with deterministic top-k children (TreeConfig(sampling=
                 "top_k"), the sampled trees before 0.3), for comparison with `tree`
    compiled     the first drafter's chains with captured forwards (compile_config; batch 1)
    auto         the first drafter with schedule="auto" (draft length from measured costs, up to
                 `auto_max_draft_tokens`; batch 1)
    ngram        prompt-lookup drafting (batch 1)
    gamma-sweep  the first drafter's chains at each of `draft_lengths` (batch 1, τ vs γ)
    batch-sweep  plain and the first drafter's chains at each of `batch_sizes` (greedy; throughput vs batch)
    sorted       SD2 self-speculation on the target's own first layers (`sorted_exits`): each exit, adaptive,
                 chain and tree
    specialized_drafts  each drafter of `routing` (every drafter without it) on every prompt category (chains,
                 batch 1; read the by-category tables)
    adaptive_routing  a RoutedDrafter over `routing`'s drafters (a `recipes/route.py` output): its offline router,
                 router + online policy, the online policy alone, and the oracle (each prompt's best single drafter,
                 by τ, from the specialized_drafts rows; batch 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CompileConfig

from ..drafters import NGramDrafter, RoutedDrafter, SortedDrafter
from ..drafters.routed import ngram_arm, read_routing
from ..routing.policy import OnlinePolicy
from .pairs import Pair

EXPERIMENTS = ("plain", "plain-compiled", "assisted", "assisted-default", "chain", "compiled", "auto", "tree", "tree-top-k", "ngram",
               "gamma-sweep", "batch-sweep", "sorted", "specialized_drafts", "adaptive_routing")
# `hf-specdec bench` without flags: the headline rows, about 5 minutes on a 2-core CPU
HEADLINE_EXPERIMENTS = ("plain", "assisted", "chain", "auto")
# `--full`: every experiment but the sorted drafters (those need --sorted-exits) and routing (needs --routing)
FULL_EXPERIMENTS = tuple(name for name in EXPERIMENTS if name not in ("sorted", "specialized_drafts",
                                                                        "adaptive_routing"))
ORACLE_LABEL = "oracle (best τ per prompt)"


@dataclass
class Method:
    """One row: how to generate one batch, and what the row is compared with."""

    experiment: str
    decoding: str  # "greedy" or "sample"
    generate: Callable[[dict, int], tuple[torch.Tensor, object]]  # (batch, max_new_tokens) -> (sequences, stats)
    drafter: str | None = None
    batch_size: int = 1
    num_draft_tokens: int | None = None
    tree: tuple[int, int, int] | None = None
    label: str | None = None  # shown in tables; defaults to experiment[drafter]
    draft_model: torch.nn.Module | None = None  # a separate draft model: c is measurable, the formula applies
    meter_draft: bool = False  # transformers' assisted generation reports no stats: count forwards with hooks
    # compiled and auto rows warm up on every batch (captured shapes; auto measures plain steps, then calibrates)
    warmup_runs: int = 1
    warmup_every_batch: bool = False

    @property
    def key(self) -> tuple:
        return (self.experiment, self.drafter, self.batch_size, self.decoding, self.num_draft_tokens, self.label)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        name = self.experiment if self.drafter is None else f"{self.experiment}[{self.drafter}]"
        return f"{name} γ={self.num_draft_tokens}" if self.experiment == "gamma-sweep" else name

    @property
    def has_formula(self) -> bool:
        return self.draft_model is not None and self.num_draft_tokens is not None and self.tree is None


def build_methods(config, pair: Pair) -> list[Method]:
    """Every row the config's experiments give for this pair, plain baselines first."""
    unknown = set(config.experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"Unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}.")
    target, gamma, tree = pair.target, config.num_draft_tokens, config.tree_config
    wanted = set(config.experiments)

    def sampling_kwargs(decoding: str) -> dict:
        if decoding == "greedy":
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=config.temperature, top_p=config.top_p)

    def plain(decoding):
        def run(batch, max_new_tokens):
            return target.generate(**batch, max_new_tokens=max_new_tokens, **sampling_kwargs(decoding)), None

        return run

    def speculative(make_drafter, decoding, **options):
        def run(batch, max_new_tokens):
            # phase timing (loop efficiency) synchronises around every phase: free on a CPU, not on a GPU
            out = target.generate(**batch, assistant_model=make_drafter(), max_new_tokens=max_new_tokens,
                                  return_dict_in_generate=True, time_phases=target.device.type == "cpu",
                                  **sampling_kwargs(decoding), **options)
            return out.sequences, out.spec_stats

        return run

    def plain_compiled(decoding):
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked this way

        def run(batch, max_new_tokens):
            return target.generate(**batch, max_new_tokens=max_new_tokens, cache_implementation="static",
                                   compile_config=compile_config, **sampling_kwargs(decoding)), None

        return run

    def assisted(draft_model, decoding):
        def run(batch, max_new_tokens):
            # transformers reads these from the assistant's generation_config, not from generate() kwargs
            draft_model.generation_config.num_assistant_tokens = gamma
            draft_model.generation_config.num_assistant_tokens_schedule = "constant"
            draft_model.generation_config.assistant_confidence_threshold = 0.0
            sequences = target.generate(**batch, assistant_model=draft_model, max_new_tokens=max_new_tokens,
                                        **sampling_kwargs(decoding))
            return sequences, None

        return run

    def assisted_default(draft_model, decoding):
        def run(batch, max_new_tokens):
            # transformers' defaults; it tunes the confidence threshold within a call where scikit-learn is installed
            settings = draft_model.generation_config
            settings.num_assistant_tokens, settings.num_assistant_tokens_schedule = 20, "constant"
            settings.assistant_confidence_threshold = 0.4
            sequences = target.generate(**batch, assistant_model=draft_model, max_new_tokens=max_new_tokens,
                                        **sampling_kwargs(decoding))
            return sequences, None

        return run

    def drafter_method(experiment, spec, decoding, num_draft_tokens=gamma, tree_config=None, batch_size=1):
        separate = spec.kind != "sorted"  # a sorted drafter's cost depends on the exits it takes
        return Method(experiment, decoding, speculative(lambda: spec.make(num_draft_tokens, tree_config), decoding),
                      drafter=spec.name, batch_size=batch_size, num_draft_tokens=num_draft_tokens,
                      tree=None if tree_config is None else tuple(config.tree),
                      draft_model=spec.model if separate else None)

    methods: list[Method] = []
    primary = pair.drafters[0] if pair.drafters else None
    plain_models = [spec for spec in pair.drafters if spec.kind == "model"]
    for decoding in config.decodings:
        methods.append(Method("plain", decoding, plain(decoding)))
        if "plain-compiled" in wanted:
            methods.append(Method("plain-compiled", decoding, plain_compiled(decoding), warmup_every_batch=True))
        if "assisted" in wanted and plain_models:
            methods.append(Method("assisted", decoding, assisted(plain_models[0].model, decoding),
                                  drafter=plain_models[0].name, num_draft_tokens=gamma,
                                  draft_model=plain_models[0].model, meter_draft=True))
        if "assisted-default" in wanted and plain_models:
            methods.append(Method("assisted-default", decoding, assisted_default(plain_models[0].model, decoding),
                                  drafter=plain_models[0].name, draft_model=plain_models[0].model,
                                  meter_draft=True))
        for spec in pair.drafters:
            if "chain" in wanted:
                methods.append(drafter_method("chain", spec, decoding))
            if "compiled" in wanted and spec is primary:
                method = drafter_method("compiled", spec, decoding)
                method.generate = speculative(lambda: spec.make(gamma, None), decoding, compile_config=CompileConfig())
                method.warmup_every_batch = True
                methods.append(method)
            if "auto" in wanted and spec is primary:
                # one drafter: its cost model outlives a call; num_draft_tokens is the longest draft it may choose
                auto = spec.make(config.auto_max_draft_tokens, None, schedule="auto")
                methods.append(Method("auto", decoding, speculative(lambda: auto, decoding), drafter=spec.name,
                                      num_draft_tokens=config.auto_max_draft_tokens, warmup_runs=3,
                                      warmup_every_batch=True))
            if "tree" in wanted:
                methods.append(drafter_method("tree", spec, decoding, tree_config=tree))
            if "tree-top-k" in wanted and decoding == "sample":
                top_k_tree = dataclasses.replace(tree, sampling="top_k")
                methods.append(drafter_method("tree-top-k", spec, decoding, tree_config=top_k_tree))
        if "ngram" in wanted:
            methods.append(Method("ngram", decoding, speculative(
                lambda: NGramDrafter(max_ngram=config.ngram_size, num_draft_tokens=gamma), decoding)))
        if "gamma-sweep" in wanted and primary is not None:
            methods += [drafter_method("gamma-sweep", primary, decoding, num_draft_tokens=length)
                        for length in config.draft_lengths]
        if "sorted" in wanted and config.sorted_exits:
            methods += sorted_methods(config, target, speculative, decoding)
        if wanted & {"specialized_drafts", "adaptive_routing"}:
            methods += routing_methods(config, pair, speculative, drafter_method, decoding)
    if "batch-sweep" in wanted:
        for size in config.batch_sizes:
            if size > 1:
                methods.append(Method("plain", "greedy", plain("greedy"), batch_size=size))
                if primary is not None:
                    methods.append(drafter_method("chain", primary, "greedy", batch_size=size))
    return methods


def routing_methods(config, pair: Pair, speculative, drafter_method, decoding: str) -> list[Method]:
    """specialized_drafts rows (each routed drafter alone) and, for adaptive_routing, the routed rows."""
    gamma = config.num_draft_tokens
    routing = read_routing(config.routing) if config.routing else None
    specs = {spec.name: spec for spec in pair.drafters}
    entries = routing["drafters"] if routing else {name: {"kind": "checkpoint"} for name in specs}
    if missing := [name for name, entry in entries.items() if entry["kind"] != "ngram" and name not in specs]:
        raise ValueError(f"{config.routing} routes among {missing}, which the benchmark's pair does not have: pass "
                         "the lab (or --drafter NAME=PATH) that holds them.")

    def arms() -> dict:
        return {name: ngram_arm(entry, gamma) if entry["kind"] == "ngram" else specs[name].make(gamma)
                for name, entry in entries.items()}

    rows = []
    for name, entry in entries.items():
        if entry["kind"] == "ngram":
            make = speculative(lambda entry=entry: ngram_arm(entry, gamma), decoding)
            rows.append(Method("specialized_drafts", decoding, make, drafter=name, num_draft_tokens=gamma))
        else:
            rows.append(drafter_method("specialized_drafts", specs[name], decoding))
    if "adaptive_routing" not in config.experiments:
        return rows
    if routing is None or routing["router"] is None:
        raise ValueError("adaptive_routing needs a trained router: pass --routing DIR (a recipes/route.py output).")
    router = routing["router"]
    for label, make in (
        ("routed (offline router)", lambda: RoutedDrafter(arms(), router=router)),
        ("routed (router + online policy)", lambda: RoutedDrafter(arms(), router=router, policy=OnlinePolicy())),
        ("routed (online policy alone)", lambda: RoutedDrafter(arms(), policy=OnlinePolicy())),
    ):
        rows.append(Method("adaptive_routing", decoding, speculative(make, decoding), num_draft_tokens=gamma,
                           label=label))
    return rows


def add_oracle_rows(methods: list[Method], runs: dict) -> None:
    """adaptive_routing's oracle: for every prompt (batch 1) the specialized_drafts run with the highest τ, as if a
    perfect router had picked that drafter. Its runs are those runs, so wall times and outputs are real."""
    if not any(method.experiment == "adaptive_routing" for method in methods):
        return
    for decoding in list(dict.fromkeys(method.decoding for method in methods)):
        singles = [m for m in methods if m.experiment == "specialized_drafts" and m.decoding == decoding]
        if not singles:
            continue
        first = [runs[m.key][0] for m in singles]
        best = [max(range(len(singles)), key=lambda k: _tau(first[k][i])) for i in range(len(first[0]))]
        repeats = min(len(runs[m.key]) for m in singles)
        oracle = Method("adaptive_routing", decoding, generate=None, num_draft_tokens=singles[0].num_draft_tokens,
                        label=ORACLE_LABEL)
        runs[oracle.key] = [[runs[singles[k].key][r][i] for i, k in enumerate(best)] for r in range(repeats)]
        methods.append(oracle)


def _tau(run) -> float:
    return (run.accepted + run.rounds) / max(run.rounds, 1)


def sorted_methods(config, target, speculative, decoding: str) -> list[Method]:
    """SD2 rows: each fixed exit, adaptive exits, chain and tree, drafting with the target's own first layers.
    The formula's c (a separate draft model's cost) does not apply, so these rows have no theory column."""
    exits = list(config.sorted_exits)
    thresholds = list(config.sorted_thresholds) or [0.7] * (len(exits) - 1)
    gamma, tree = config.num_draft_tokens, config.tree_config

    def row(label, tree_config=None, **kwargs):
        def make():
            return SortedDrafter.from_target(target, num_draft_tokens=gamma, tree=tree_config, **kwargs)

        return Method("sorted", decoding, speculative(make, decoding), num_draft_tokens=gamma, label=label,
                      tree=None if tree_config is None else tuple(config.tree))

    rows = [row(f"sorted exit {e}", exits=[e]) for e in exits]
    rows.append(row(f"sorted adaptive {exits}", exits=exits, thresholds=thresholds))
    rows.append(row(f"sorted tree exit {exits[-1]}", tree, exits=[exits[-1]]))
    rows.append(row(f"sorted tree adaptive {exits}", tree, exits=exits, thresholds=thresholds))
    return rows
