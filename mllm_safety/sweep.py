"""``python -m mllm_safety.sweep --config CONFIG --sweep.ratios '[0, 0.05, 0.1, 0.2, 0.4]' --sweep.seeds '[0, 1, 2]'``:
the paper's key curve.

Runs ``mllm_safety.fit`` once per (rejection ratio, seed), one after the other, without a W&B server; collects each
run's final safety and utility figures into ``results.csv`` and plots the trade-off against the ratio (mean over seeds,
with the range of the seeds as a band) into ``rejection_ratio.png``: attack success per harmful set and over-refusal per
benign set on the left, the utility sets' accuracy on the right; the plot says under it how it was made (command,
machine, date), and ``rejection_ratio.md`` beside it gives that caption and every run's figures. CONFIG and every option
of the fit config (``--trainer.max_epochs 2`` ...) are read and checked by fit's own parser before the first run starts,
and each run trains on that resolved config (``--output``/<run>/fit_config.yaml). A run whose metrics already exist is
not run again, and an interrupted run continues from its newest checkpoint, so an interrupted sweep continues. The seed
is ``seed_everything`` (initialisation of the adapters and projector, dropout), as in the W&B sweep
(``configs/sweeps/rejection_ratio.yaml``). Which samples are swapped (``data.rejection.seed``) stays fixed, so that a
smaller ratio's swapped set is part of a larger one's.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from mllm_safety.cli import RunCLI
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.provenance import caption

ASR_METRIC = "safety/asr/mean"
"""The mean attack success over the harmful eval sets, as ``SafetyEvalCallback`` logs it (and the W&B sweep's metric
in ``configs/sweeps/rejection_ratio.yaml``)."""
OVER_REFUSAL_METRIC = "safety/over_refusal/mean"
"""The share of benign prompts refused."""
METRICS_FILE = "final_metrics.json"


class WriteFinalMetrics(L.Callback):
    """Writes the run's final logged metrics (safety evaluation included) as JSON, on rank 0."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: The JSON file to write.
        """
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            # A run resumed with nothing left to train (killed after its last checkpoint, before this hook) logs
            # nothing; its last evaluation is in the history the safety callback restored from the checkpoint.
            last = [c.history[-1][1] for c in trainer.callbacks if isinstance(c, SafetyEvalCallback) and c.history]
            logged = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
            metrics = {name: value for figures in last for name, value in figures.items()} | logged
            Path(self.path).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def run_name(ratio: float, seed: int) -> str:
    return f"ratio-{ratio:g}_seed-{seed}"


def run_fit(fit_config: str, run_dir: Path, args: Sequence[str] = (), require: str | None = ASR_METRIC) -> dict:
    """One training run of ``fit_config`` (plus ``args``) in a subprocess (a clean process per run, as on a cluster),
    in ``run_dir``; its final metrics. A run whose metrics exist is not run again; an interrupted one resumes its
    newest checkpoint. ``require``: a figure the metrics must hold (the sweep's ASR)."""
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    command = [
        sys.executable,
        "-m",
        "mllm_safety.fit",
        "--config",
        fit_config,
        *args,
        "--trainer.default_root_dir",
        str(run_dir),
        "--ckpt_path",
        "last",
        "--trainer.callbacks+=mllm_safety.sweep.WriteFinalMetrics",
        f"--trainer.callbacks.path={metrics_path}",
    ]
    with open(run_dir / "fit.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"{run_dir.name} failed (exit {result.returncode}); see {run_dir / 'fit.log'}")
    metrics = json.loads(metrics_path.read_text())
    if require is not None and require not in metrics:
        raise RuntimeError(f"{run_dir.name} ended without a safety evaluation ({require}); see {run_dir}/fit.log")
    return metrics


def write_run_config(cli: RunCLI, config: Namespace, path: Path, drop: Sequence[str]) -> str:
    """``config`` (parsed by ``cli``'s parser) without the entry point's own keys ``drop``, written as the fit config
    file a run reads."""
    config = config.clone()
    for key in (*drop, "ckpt_path", "config"):
        config.pop(key, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cli.parser.dump(config, skip_check=True), encoding="utf-8")
    return str(path)


def write_csv(rows: list[dict[str, float]], path: Path) -> None:
    columns = ["ratio", "seed"] + sorted({key for row in rows for key in row} - {"ratio", "seed"})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict[str, float]], metric: str) -> list[tuple[float, float, float, float]]:
    """``(ratio, mean, min, max)`` of ``metric`` over the seeds, by ratio."""
    by_ratio: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        if metric in row:
            by_ratio[row["ratio"]].append(row[metric])
    return [(r, statistics.fmean(v), min(v), max(v)) for r, v in sorted(by_ratio.items())]


def figure_names(rows: list[dict[str, float]], prefix: str, suffix: str = "") -> list[str]:
    """The headline figures ``<prefix><set><suffix>`` present in the rows (``safety/asr/`` ..., means included,
    no per-category figures), in first-seen order."""
    names = dict.fromkeys(
        key for row in rows for key in row if key.startswith(prefix) and key.endswith(suffix) and key.count("/") == 2
    )
    return list(names)


def plot(rows: list[dict[str, float]], path: Path, title: str, subtitle: str | None = None) -> None:
    """The trade-off against the ratio (in %): ASR of each harmful set and over-refusal of each benign set, and the
    accuracy of each utility set; mean line, seed range band, one dot per run. ``subtitle``: how it was made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("safety", figure_names(rows, "safety/asr/") + figure_names(rows, "safety/over_refusal/")),
        ("utility (accuracy)", figure_names(rows, "utility/", "/accuracy")),
    ]
    panels = [(name, metrics) for name, metrics in panels if metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=150, squeeze=False)
    for ax, (panel, metrics) in zip(axes[0], panels):
        for number, metric in enumerate(metrics):
            summary = summarize(rows, metric)
            ratios, means, lows, highs = (list(column) for column in zip(*summary))
            color = f"C{number % 10}"
            style = "--" if "/over_refusal/" in metric else "-"
            label = metric.split("/", 1)[1]
            ax.plot(ratios, [100 * m for m in means], style, marker="o", color=color, label=label)
            ax.fill_between(ratios, [100 * v for v in lows], [100 * v for v in highs], color=color, alpha=0.12)
            points = [(row["ratio"], 100 * row[metric]) for row in rows if metric in row]
            ax.scatter(*zip(*points), color=color, s=10, alpha=0.6)
        ax.set_xlabel("rejection ratio r (share of replies swapped for a refusal)")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = len({row["seed"] for row in rows})
    fig.suptitle(f"{title} ({seeds} seed{'s' if seeds != 1 else ''}: mean, range)")
    if subtitle:
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if subtitle else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_summary(rows: list[dict[str, float]], path: Path, title: str, made: str) -> None:
    """The plot's caption beside it (``<plot>.md``): how it was made, then each run's headline figures in %."""
    metrics = [
        *figure_names(rows, "safety/asr/"),
        *figure_names(rows, "safety/over_refusal/"),
        *figure_names(rows, "utility/", "/accuracy"),
    ]
    lines = [
        f"# {title}: the rejection-ratio sweep",
        "",
        f"![{title}: ASR, over-refusal and utility against the rejection ratio](rejection_ratio.png)",
        "",
        f"The plot and `results.csv` were {made}.",
        "",
        "| ratio | seed | " + " | ".join(m.split("/", 1)[1] for m in metrics) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in metrics) + " |",
    ]
    for row in rows:
        values = [f"{100 * row[m]:.1f}" if m in row else "" for m in metrics]
        lines.append(f"| {row['ratio']:g} | {row['seed']} | " + " | ".join(values) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class SweepSettings:
    """The grid of a local rejection-ratio sweep."""

    ratios: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.4])
    """Rejection ratios, each in [0, 1]."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of each ratio (``seed_everything``: adapter and projector initialisation, dropout)."""
    asr_metric: str = ASR_METRIC
    """Logged figure printed after each run."""

    def __post_init__(self) -> None:
        if not self.ratios or not self.seeds:
            raise ValueError("sweep.ratios and sweep.seeds must each name at least one value")
        if bad := [r for r in self.ratios if not 0.0 <= r <= 1.0]:
            raise ValueError(f"sweep.ratios must be in [0, 1], got {bad}")


class SweepCLI(RunCLI):
    """``sweep``: the fit config, ``--sweep`` (the grid) and ``--output``; builds nothing, each run is a fit."""

    ckpt_path_help = "Not used: each run of the sweep resumes its own newest checkpoint."

    def add_entry_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(SweepSettings, "sweep", help="The grid of ratios and seeds.")
        parser.add_argument("--output", type=Path, default=Path("runs/sweep"), help="Folder of the runs, CSV and plot.")

    def instantiate_classes(self) -> None:
        self.settings = SweepSettings(**self.config.sweep.as_dict())  # the runs build the model, not the sweep

    def write_fit_config(self, run_dir: Path) -> str:
        """The resolved fit config (without the sweep's own options) for one run, as the file its fit reads."""
        return write_run_config(self, self.config, run_dir / "fit_config.yaml", ("sweep", "output"))


def main(args: list[str] | None = None) -> list[dict[str, float]]:
    cli = SweepCLI(args)
    settings, output = cli.settings, cli.config.output
    rows, failures = [], []
    for ratio in settings.ratios:
        for seed in settings.seeds:
            name = run_name(ratio, seed)
            print(f"[sweep] {name}", flush=True)
            try:
                grid_point = ["--data.rejection_ratio", str(ratio), "--seed_everything", str(seed)]
                metrics = run_fit(cli.write_fit_config(output / name), output / name, grid_point)
            except RuntimeError as error:
                failures.append(str(error))
                print(f"[sweep] {error}", flush=True)
                continue
            rows.append({"ratio": ratio, "seed": seed, **metrics})
            value = metrics.get(settings.asr_metric, float("nan"))
            print(f"[sweep] {name}: {settings.asr_metric}={value:.3f}", flush=True)
    if rows:
        write_csv(rows, output / "results.csv")
        title = Path(cli.config.config[0]).stem if cli.config.get("config") else "sweep"
        made = caption("mllm_safety.sweep", args)
        plot(rows, output / "rejection_ratio.png", title, made.replace("`", ""))
        write_summary(rows, output / "rejection_ratio.md", title, made)
        print(f"[sweep] wrote {output / 'results.csv'}, {output / 'rejection_ratio.png'} and its caption")
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))
    return rows


if __name__ == "__main__":
    main()
