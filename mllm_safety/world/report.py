"""The world's tables and plots: one row per evaluation of a finished run, the world's table (``results.*``) and the
comparison of curated data with the benign swap (``comparison.*``), each figure the mean over seeds with its range."""

from __future__ import annotations

import csv
import json
import statistics
import textwrap
from pathlib import Path

EVALUATIONS = "evaluations.json"
"""The file in which a fit run writes its evaluations (label -> figures)."""

COLUMNS: dict[str, str] = {
    "text ASR": "safety/asr/world_text",
    "typographic ASR": "safety/asr/world_typographic",
    "img2text ASR": "safety/asr/world_img2text",
    "over-refusal text twins": "safety/over_refusal/world_benign_text",
    "over-refusal typographic twins": "safety/over_refusal/world_benign_typographic",
    "over-refusal img2text twins": "safety/over_refusal/world_benign_img2text",
    "refusal gap text": "safety/refusal_gap/world_benign_text",
    "refusal gap typographic": "safety/refusal_gap/world_benign_typographic",
    "transcription harmful": "utility/world_transcription/exact/harmful",
    "transcription benign": "utility/world_transcription/exact/benign",
    "utility": "utility/world_utility/accuracy",
    "description described": "utility/world_description/described",
    "description exact": "utility/world_description/accuracy",
    "SafeBench text ASR": "safety/asr/world_safebench_text",
    "SafeBench typographic ASR": "safety/asr/world_safebench_typographic",
}
"""Table column -> the figure the safety evaluation logs."""

COMPARISON_COLUMNS = (
    "typographic ASR", "img2text ASR", "text ASR", "over-refusal typographic twins", "refusal gap typographic",
    "over-refusal text twins", "transcription benign", "utility", "description described",
)  # fmt: skip
"""The comparison's columns: safety per channel, selectivity, and what the finetuning may cost."""


def read_row(condition: str, folder: Path, label: str, current: set[Path], **extra) -> dict | None:
    """One evaluation of a ``current`` run as a table row (None if there is none), with the figures of the run's
    current separate evaluations (``safebench``, ``description``) added, except to the evaluation before training."""
    path = folder / EVALUATIONS
    if folder not in current or not path.is_file() or label not in (evaluations := json.loads(path.read_text())):
        return None
    row = {"condition": condition, **extra, **evaluations[label]}
    if label != "before":
        for name in ("safebench", "description"):
            report = folder / name / "report.json"
            if folder / name in current and report.is_file():
                figures = json.loads(report.read_text())
                row |= {f"safety/{k}": v for k, v in figures["judges"]["xstest"]["figures"].items()}
                utility = figures.get("utility", {})
                row |= {f"utility/{s}/{k}": v for s, metrics in utility.items() for k, v in metrics.items()}
    return row


def table_rows(runs: list[tuple[str, Path, str, dict]], current: set[Path]) -> list[dict]:
    """One row per (condition, run folder, evaluation label, extra columns) whose run is current and evaluated."""
    return [row for name, folder, label, extra in runs if (row := read_row(name, folder, label, current, **extra))]


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """One line per condition: each column's figure in %, the mean over its runs with their range."""
    shown = {name: metric for name, metric in columns.items() if any(metric in row for row in rows)}
    lines = ["| condition | runs | " + " | ".join(shown) + " |", "| --- | ---: |" + " ---: |" * len(shown)]
    for condition in dict.fromkeys(row["condition"] for row in rows):
        group = [row for row in rows if row["condition"] == condition]
        cells = []
        for metric in shown.values():
            values = [100 * row[metric] for row in group if metric in row]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.fmean(values):.1f} [{min(values):.1f}, {max(values):.1f}]")
        lines.append(f"| {condition} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    columns = ["condition", "ratio", "seed"] + sorted({k for row in rows for k in row} - {"condition", "ratio", "seed"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_table(rows: list[dict], out: Path, made: str | None = None) -> str:
    """``results.csv`` (every figure) and ``results.md`` (the headline columns, mean and range over seeds), headed by
    ``made``, how they were made."""
    write_csv(rows, out / "results.csv")
    text = (f"The table, `results.csv` and `world.png` were {made}.\n\n" if made else "") + markdown_table(
        rows, COLUMNS
    )
    (out / "results.md").write_text(text)
    return text


def write_comparison(rows: list[dict], out: Path, made: str | None = None) -> str:
    """``comparison.csv`` and ``comparison.md``: the stages before stage 3 and every arm at the condition ratios."""
    write_csv(rows, out / "comparison.csv")
    columns = {name: COLUMNS[name] for name in COMPARISON_COLUMNS}
    intro = f"The table, `comparison.csv` and `comparison.png` were {made}.\n\n" if made else ""
    text = intro + markdown_table(rows, columns)
    (out / "comparison.md").write_text(text)
    return text


def plot(rows: list[dict], path: Path, subtitle: str | None = None) -> None:
    """Every headline figure across the conditions: mean over seeds, seed range as error bars; ``subtitle``: how it
    was made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=130, sharex=True)
    panels = {
        0: ["text ASR", "typographic ASR", "img2text ASR", "over-refusal text twins", "over-refusal typographic twins"],
        1: ["refusal gap text", "refusal gap typographic", "transcription harmful", "utility", "description described"],
    }
    x = list(range(len(conditions)))
    for axis, names in panels.items():
        ax = axes[axis]
        for name in names:
            metric = COLUMNS[name]
            means, lows, highs = [], [], []
            for condition in conditions:
                values = [100 * r[metric] for r in rows if r["condition"] == condition and metric in r]
                mean = statistics.fmean(values) if values else float("nan")
                means.append(mean)
                lows.append(mean - min(values) if values else 0)
                highs.append(max(values) - mean if values else 0)
            ax.errorbar(x, means, yerr=[lows, highs], marker="o", capsize=3, label=name)
        ax.set_xticks(x, conditions, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("attack success and over-refusal")
    axes[1].set_title("refusal gap (harmful - twin), reading, utility")
    seeds = len({row.get("seed") for row in rows if "seed" in row})
    fig.suptitle(f"The world: stages 0-2 once, stage 3 over {seeds} seed(s) (mean, range)", fontsize=10)
    if subtitle:
        fig.text(0.5, 0.005, textwrap.fill(subtitle, 200), ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.05 if subtitle else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_comparison(rows: list[dict], path: Path, subtitle: str | None = None) -> None:
    """Typographic ASR, the twins' over-refusal and the description rate per condition: mean over seeds with the
    seed range; ``subtitle``: how it was made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    names = ("typographic ASR", "img2text ASR", "over-refusal typographic twins", "description described")
    fig, ax = plt.subplots(figsize=(13, 5), dpi=130)
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        metric = COLUMNS[name]
        means, errors = [], [[], []]
        for condition in conditions:
            values = [100 * r[metric] for r in rows if r["condition"] == condition and metric in r]
            mean = statistics.fmean(values) if values else float("nan")
            means.append(mean)
            errors[0].append(mean - min(values) if values else 0)
            errors[1].append(max(values) - mean if values else 0)
        xs = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(conditions))]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(range(len(conditions)), conditions, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 115)  # a band above 100% for the legend, so it covers no bar
    ax.legend(fontsize=7, loc="upper center", ncol=len(names))
    ax.set_title("Curated safety data against the benign swap, at equal refusal counts (mean, seed range)", fontsize=10)
    if subtitle:
        fig.text(0.5, 0.005, textwrap.fill(subtitle, 200), ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.05 if subtitle else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
