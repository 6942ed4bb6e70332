"""The comparison table: one row per experiment, one column per figure of its ``report.json``, with the judge
named; written as ``comparison.csv`` (raw values), ``comparison.md`` (percentages) and ``comparison.png``."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from mllm_safety.evaluation.report import format_figure
from mllm_safety.experiments.grid import Column, Grid

FINISHED, FAILED, NOT_RUN = "finished", "failed", "not run"


def column_title(column: Column) -> str:
    return f"{column.label} [{column.judge}]"


def read_figure(report: dict, column: Column) -> float | None:
    """The column's figure in a ``report.json`` (``None`` when the report lacks it: a set not evaluated)."""
    if column.figure.startswith("utility/"):
        _, set_name, metric = column.figure.split("/")
        return (report.get("utility") or {}).get(set_name, {}).get(metric)
    judge = (report.get("judges") or {}).get(column.judge)
    if judge is None:
        return None
    return judge["figures"].get(column.figure)


@dataclass
class Row:
    experiment: str
    description: str
    status: str
    figures: list[float | None]


def read_row(name: str, grid: Grid, report_path: Path, status: str) -> Row:
    """One experiment's row; its figures are empty unless it finished (a failed rerun's old report is not shown)."""
    figures: list[float | None] = [None] * len(grid.columns)
    if status == FINISHED:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        figures = [read_figure(report, column) for column in grid.columns]
    return Row(name, grid.experiments[name].description, status, figures)


def write_comparison(rows: list[Row], grid: Grid, output: Path) -> list[Path]:
    """``comparison.{csv,md,png}`` in ``output``."""
    titles = [column_title(c) for c in grid.columns]
    csv_path, md_path, png_path = (output / f"comparison.{ext}" for ext in ("csv", "md", "png"))
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "status", *titles, "description"])
        for row in rows:
            figures = ["" if value is None else f"{value:.6g}" for value in row.figures]
            writer.writerow([row.experiment, row.status, *figures, row.description])
    lines = [
        "| experiment | " + " | ".join(titles) + " | what it tests |",
        "| --- | " + " | ".join("---:" for _ in titles) + " | --- |",
    ]
    for row in rows:
        cells = [format_figure(c.figure, v) if v is not None else "–" for c, v in zip(grid.columns, row.figures)]
        name = row.experiment if row.status == FINISHED else f"{row.experiment} ({row.status})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.description} |")
    lines += [
        "",
        "Columns: figure [judge or scorer]; ASR and over-refusal on the judge named, read from each "
        "experiment's `eval/report.json`. – : not measured (experiment not finished, or set not evaluated).",
    ]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_comparison(rows, grid, png_path)
    return [csv_path, md_path, png_path]


def plot_comparison(rows: list[Row], grid: Grid, path: Path) -> None:
    """One panel per column, one horizontal bar per experiment (in %; MME-style scores as they are)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(grid.columns)
    width = min(count, 4)
    height = -(-count // width)
    fig, axes = plt.subplots(
        height, width, figsize=(4 * width, 0.6 + 0.32 * len(rows) * height + 0.8 * height), dpi=120, squeeze=False
    )
    names = [row.experiment for row in rows]
    for number, (ax, column) in enumerate(zip(axes.flat, grid.columns)):
        share = "score" not in column.figure
        values = [row.figures[number] for row in rows]
        shown = [0.0 if v is None else (100 * v if share else v) for v in values]
        bars = ax.barh(range(len(rows)), shown, color=[f"C{number % 10}" if v is not None else "0.85" for v in values])
        ax.bar_label(bars, labels=["–" if v is None else f"{s:.1f}" for v, s in zip(values, shown)], fontsize=7)
        ax.set_yticks(range(len(rows)), names if number % width == 0 else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(column_title(column), fontsize=8)
        if share:
            ax.set_xlim(0, 110)
            ax.set_xlabel("%", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
