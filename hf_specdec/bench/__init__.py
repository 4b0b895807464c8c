"""The benchmark suite (`hf-specdec bench`): plain, transformers-assisted and hf_specdec decoding side by side.

    from hf_specdec.bench import SuiteConfig, run_suite, format_suite_report
    report = run_suite(SuiteConfig(prompts=("code", "rag"), experiments=("plain", "chain", "tree")))
    print(format_suite_report(report))

Prompt sets by category (`prompts.py`), experiments by name (`experiments.py`), pairs (`pairs.py`), timing and
the speed-up formula (`measure.py`), the run (`suite.py`), tables (`report.py`) and plots (`plots.py`).
Performance is measured here, never asserted: see docs/benchmark.md.
"""

from .experiments import EXPERIMENTS, FULL_EXPERIMENTS, HEADLINE_EXPERIMENTS
from .measure import expected_tokens_per_round, measure_step_costs, per_token_acceptance, theoretical_speedup
from .plots import write_plots
from .prompts import BUILTIN_CATEGORIES, load_prompts
from .report import format_suite_report, write_markdown_report
from .suite import SuiteConfig, run_suite

__all__ = [
    "BUILTIN_CATEGORIES",
    "EXPERIMENTS",
    "FULL_EXPERIMENTS",
    "HEADLINE_EXPERIMENTS",
    "SuiteConfig",
    "expected_tokens_per_round",
    "format_suite_report",
    "load_prompts",
    "measure_step_costs",
    "per_token_acceptance",
    "run_suite",
    "theoretical_speedup",
    "write_markdown_report",
    "write_plots",
]
