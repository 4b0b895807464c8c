"""Tables of a suite report: printed, Markdown, and a Markdown report file that embeds the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MAIN_COLUMNS = ("method", "batch", "decoding", "tok/s", "speedup", "spread", "÷ assisted", "α", "τ", "p50 s", "p95 s",
                "=greedy", "loop eff", "ops/round", "syncs/round", "theory", "w/ verify")


def _speedup_cell(value, uncertain) -> str:
    """A speed-up whose spread over the repeats includes the value it is compared with is marked '~'."""
    return "-" if value is None else f"{'~' if uncertain else ''}{value:.2f}x"


def _spread_cell(spread) -> str:
    return "-" if not spread else f"{spread[0]:.2f}-{spread[1]:.2f}"


def _number(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _equal_cell(row: dict) -> str:
    equal = row["overall"]["equal_to_plain"]
    if row["experiment"] == "plain":
        return "ref"
    if equal is None:
        return "n/a" if row["decoding"] == "sample" else "-"
    if equal:
        return "yes"
    mismatches = row.get("greedy_mismatches", [])
    if mismatches and all(mismatch["tie"] for mismatch in mismatches):
        return f"tie ×{len(mismatches)}"  # float rounding at a near-exact tie of the top two logits, not a bug
    return "NO"


def main_row(row: dict) -> tuple[str, ...]:
    stats = row["overall"]
    versus = row.get("versus_assisted") or {}
    return (
        row["name"], str(row["batch_size"]), row["decoding"], _number(stats["tokens_per_second"], "{:.1f}"),
        _speedup_cell(stats["speedup"], stats.get("speedup_uncertain")), _spread_cell(stats.get("speedup_spread")),
        _speedup_cell(versus.get("wall_ratio"), versus.get("uncertain")).rstrip("x"),
        _number(stats["acceptance_rate"], "{:.2f}"),
        _number(stats["mean_accepted_length"], "{:.2f}"), _number(stats["latency_p50"], "{:.2f}"),
        _number(stats["latency_p95"], "{:.2f}"), _equal_cell(row), _number(stats["loop_efficiency"], "{:.2f}"),
        _number(stats.get("ops_per_round"), "{:.0f}"), _number(stats.get("syncs_per_round"), "{:.1f}"),
        _number(stats["theoretical_speedup"], "{:.2f}x"), _number(stats["theoretical_speedup_with_verify_cost"],
                                                                   "{:.2f}x"),
    )


def category_rows(rows: Sequence[dict], categories: Sequence[str], key: str, pattern: str):
    """(header, rows) of one metric per category for the batch-1 speculative rows, plus 'overall'."""
    header = ("method", "decoding", *categories, "overall")
    table = []
    for row in rows:
        if row["batch_size"] != 1 or row["experiment"] == "plain":
            continue
        cells = [_number(row["categories"].get(category, {}).get(key), pattern) for category in categories]
        table.append((row["name"], row["decoding"], *cells, _number(row["overall"][key], pattern)))
    return header, table


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, text_columns: int = 3) -> str:
    rows = [tuple(header)] + [tuple(row) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    aligned = ["  ".join(cell.ljust(w) if i < text_columns else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(aligned[:1] + ["-" * len(aligned[0])] + aligned[1:])


def pair_heading(pair: dict, config: dict) -> str:
    name = f"synthetic pair, agreement {pair['agreement']}" if pair["pair"] == "synthetic" else pair["pair"]
    drafters = "; ".join(
        f"{name} ({info['kind']}, {info['parameters'] / 1e6:.3g}M"
        + (f", c = {info['cost_ratio']:.3f}" if info.get("cost_ratio") is not None else "") + ")"
        for name, info in pair["drafters"].items()
    )
    step = pair.get("target_step_seconds")
    return (
        f"{name}: target {pair['target_parameters'] / 1e6:.3g}M params"
        + (f", step {step * 1e3:.1f} ms" if step else "") + f"; drafters: {drafters or 'none'}. "
        f"γ = {config['num_draft_tokens']}, tree (depth, top_k, max_nodes) = {tuple(config['tree'])}, "
        f"{config['max_new_tokens']} new tokens, temperature {config['temperature']} when sampling, median of "
        f"{config['repeats']} after {config['warmup']} warm-up"
    )


def format_suite_report(report: dict, markdown: bool = False) -> str:
    blocks = []
    categories = report["categories"]
    for pair in report["pairs"]:
        blocks.append(pair_heading(pair, report["config"]))
        blocks.append(format_table(MAIN_COLUMNS, [main_row(row) for row in pair["rows"]], markdown))
        if len(categories) > 1:
            blocks.append("speed-up vs plain by category:\n\n" + format_table(
                *category_rows(pair["rows"], categories, "speedup", "{:.2f}x"), markdown, text_columns=2))
            blocks.append("τ (tokens per target forward) by category:\n\n" + format_table(
                *category_rows(pair["rows"], categories, "mean_accepted_length", "{:.2f}"), markdown, text_columns=2))
        exits = [f"{row['name']} ({row['decoding']}): {row['exit_counts']}" for row in pair["rows"] if row.get("exit_counts")]
        if exits:
            blocks.append("drafted tokens per exit layer — " + "; ".join(exits))
    blocks.append(f"total wall time {report['wall_seconds']:.0f} s")
    return "\n\n".join(blocks)


def write_markdown_report(report: dict, path: Path, plots: Sequence[Path] = ()) -> Path:
    """A self-contained Markdown page: set-up, machine, every table, the plots next to it."""
    machine = report["machine"]
    lines = [
        "# hf_specdec benchmark suite", "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f"; load average {machine['load_average_start']} → {machine.get('load_average_end')}.",
        "",
        (f"Prompts: {len(report['prompts'])} in {len(report['categories'])} categories "
        f"({', '.join(report['categories'])}). Total wall time {report['wall_seconds']:.0f} s."),
        "",
        ("Columns: tok/s = generated tokens / median wall time; speedup = vs plain `generate` at the same decoding "
        "and batch size; α = accepted / drafted; τ = tokens per target forward; p50/p95 = per-request latency; "
        "=greedy = token-for-token equal to plain greedy; theory = (1 − α^(γ+1)) / ((1 − α)(γc + 1)) from the "
        "α that matches the measured τ and the measured c; w/ verify = the same with the measured cost of a "
        "γ+1-token verify forward instead of 1."),
        "",
        format_suite_report(report, markdown=True),
    ]
    for plot in plots:
        lines += ["", f"![{plot.stem}]({plot.relative_to(path.parent) if plot.is_relative_to(path.parent) else plot})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
