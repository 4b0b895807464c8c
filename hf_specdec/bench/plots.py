"""PNG plots of a suite report (matplotlib, `pip install "hf-specdec[bench]"`). Each plot is drawn only when the
report has the rows it needs; one figure per pair when several pairs were run."""

from __future__ import annotations

from pathlib import Path


def write_plots(report: dict, directory: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('Plots need matplotlib: pip install "hf-specdec[bench]".') from error
    matplotlib.use("Agg")  # files only, no display
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, pair in enumerate(report["pairs"]):
        suffix = "" if len(report["pairs"]) == 1 else f"_{index}"
        for name, draw in (("speedup_by_category", _speedup_by_category), ("tau_vs_draft_length", _tau_vs_gamma),
                           ("throughput_vs_batch_size", _throughput_vs_batch), ("acceptance_histogram", _histogram)):
            path = directory / f"{name}{suffix}.png"
            if draw(pair, report, path):
                written.append(path)
    return written


def _title(pair: dict) -> str:
    return f"synthetic pair, agreement {pair['agreement']}" if pair["pair"] == "synthetic" else pair["pair"]


def _save(figure, path: Path) -> bool:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return True


def _speedup_by_category(pair: dict, report: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    decodings = [d for d in ("greedy", "sample") if any(_category_rows(pair, d))]
    if not decodings:
        return False
    groups = [*report["categories"], "overall"]
    figure, panels = plt.subplots(len(decodings), 1, figsize=(max(9, 1.4 * len(groups)), 4 * len(decodings)),
                                  squeeze=False)
    for axes, decoding in zip(panels[:, 0], decodings):
        rows = _category_rows(pair, decoding)
        width = 0.8 / len(rows)
        for offset, row in enumerate(rows):
            stats = [row["overall"] if group == "overall" else row["categories"].get(group, {}) for group in groups]
            axes.bar([g + offset * width for g in range(len(groups))], [s.get("speedup") or 0 for s in stats], width,
                     label=row["name"])
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        axes.set_ylabel("speed-up vs plain generate")
        axes.set_title(f"{decoding} decoding")
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(f"Speed-up by category — {_title(pair)}")
    return _save(figure, path)


def _category_rows(pair: dict, decoding: str) -> list[dict]:
    return [row for row in pair["rows"] if row["batch_size"] == 1 and row["decoding"] == decoding
            and row["experiment"] not in ("plain", "gamma-sweep")]


def _tau_vs_gamma(pair: dict, report: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    for decoding in ("greedy", "sample"):
        rows = sorted((row for row in pair["rows"] if row["experiment"] == "gamma-sweep" and row["decoding"] == decoding),
                      key=lambda row: row["num_draft_tokens"])
        if rows:
            break
    else:
        return False
    gammas = [row["num_draft_tokens"] for row in rows]
    figure, (tau_axes, speed_axes) = plt.subplots(1, 2, figsize=(10, 4))
    tau_axes.plot(gammas, [row["overall"]["mean_accepted_length"] for row in rows], "o-", label="measured τ")
    tau_axes.plot(gammas, [g + 1 for g in gammas], ":", color="grey", label="γ + 1 (all accepted)")
    tau_axes.set_xlabel("draft length γ")
    tau_axes.set_ylabel("τ, tokens per target forward")
    tau_axes.legend()
    speed_axes.plot(gammas, [row["overall"]["speedup"] for row in rows], "o-", label="measured")
    for key, label in (("theoretical_speedup", "theory"), ("theoretical_speedup_with_verify_cost", "theory w/ verify")):
        values = [row["overall"][key] for row in rows]
        if all(value is not None for value in values):
            speed_axes.plot(gammas, values, "--", label=label)
    speed_axes.axhline(1.0, color="black", linewidth=0.8)
    speed_axes.set_xlabel("draft length γ")
    speed_axes.set_ylabel("speed-up vs plain")
    speed_axes.legend()
    figure.suptitle(f"Draft length sweep ({rows[0]['drafter']}, {decoding}) — {_title(pair)}")
    return _save(figure, path)


def _throughput_vs_batch(pair: dict, report: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    series = {}
    for row in pair["rows"]:
        if row["decoding"] == "greedy" and (row["experiment"] == "plain" or
                                            (row["experiment"] == "chain" and row["drafter"] == _batched_drafter(pair))):
            series.setdefault(row["name"], []).append((row["batch_size"], row["overall"]["tokens_per_second"]))
    if not any(len(points) > 1 for points in series.values()):
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    axes.set_xlabel("batch size")
    axes.set_ylabel("tokens / s")
    axes.set_title(f"Throughput vs batch size — {_title(pair)}")
    axes.legend()
    return _save(figure, path)


def _batched_drafter(pair: dict) -> str | None:
    return next((row["drafter"] for row in pair["rows"] if row["experiment"] == "chain" and row["batch_size"] > 1),
                None)


def _histogram(pair: dict, report: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [row for row in pair["rows"] if row["batch_size"] == 1 and row["experiment"] in ("chain", "ngram", "sorted")
            and sum(row["accepted_length_counts"])]
    if not rows:
        return False
    figure, axes = plt.subplots(figsize=(8, 4))
    longest = max(len(row["accepted_length_counts"]) for row in rows)
    width = 0.8 / len(rows)
    for offset, row in enumerate(rows):
        counts = row["accepted_length_counts"] + [0] * (longest - len(row["accepted_length_counts"]))
        total = sum(counts)
        axes.bar([k + offset * width for k in range(longest)], [c / total for c in counts], width,
                 label=f"{row['name']} ({row['decoding']})")
    axes.set_xticks([k + 0.4 - width / 2 for k in range(longest)], [str(k) for k in range(longest)])
    axes.set_xlabel("draft tokens accepted in a round")
    axes.set_ylabel("share of rounds")
    axes.set_title(f"Acceptance histogram — {_title(pair)}")
    axes.legend(fontsize=7)
    return _save(figure, path)
