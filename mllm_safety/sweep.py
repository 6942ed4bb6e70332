"""``python -m mllm_safety.sweep --config CONFIG --ratios 0 0.05 0.1 0.2 0.4 --seeds 0 1 2``: the paper's key curve.

Runs ``mllm_safety.fit`` once per (rejection ratio, seed), one after the other, without a W&B server; collects each
run's final safety and utility figures into ``results.csv`` and plots the trade-off against the ratio (mean over
seeds, with the range of the seeds as a band) into ``rejection_ratio.png``: attack success per harmful set and
over-refusal per benign set on the left, the utility sets' accuracy on the right. Arguments it does not know go to
every fit (``--trainer.max_epochs 2``). A run whose metrics already exist is not run again, so an interrupted sweep
continues. The seed is ``seed_everything`` (initialisation of the adapters and projector, dropout), as in the W&B sweep
(``configs/sweeps/rejection_ratio.yaml``). Which samples are swapped (``data.rejection.seed``) stays fixed, so that a
smaller ratio's swapped set is part of a larger one's.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import lightning as L

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
            metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
            Path(self.path).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def run_name(ratio: float, seed: int) -> str:
    return f"ratio-{ratio:g}_seed-{seed}"


def run_fit(config: str, ratio: float, seed: int, run_dir: Path, fit_args: list[str]) -> dict[str, float]:
    """One training run in a subprocess (a clean process per run, as on a cluster); its final metrics."""
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mllm_safety.fit",
        "--config",
        config,
        "--data.rejection_ratio",
        str(ratio),
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.callbacks+=mllm_safety.sweep.WriteFinalMetrics",
        f"--trainer.callbacks.path={metrics_path}",
        *fit_args,
    ]
    with open(run_dir / "fit.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"{run_dir.name} failed (exit {result.returncode}); see {run_dir / 'fit.log'}")
    return json.loads(metrics_path.read_text())


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


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """The trade-off against the ratio (in %): ASR of each harmful set and over-refusal of each benign set, and the
    accuracy of each utility set; mean line, seed range band, one dot per run."""
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other arguments are passed to every mllm_safety.fit run."
    )
    parser.add_argument("--config", required=True, help="The fit config (e.g. configs/demo.yaml).")
    parser.add_argument("--ratios", type=float, nargs="+", required=True, help="Rejection ratios, each in [0, 1].")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds of each ratio (default: 0).")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="Folder of the runs, CSV and plot.")
    parser.add_argument(
        "--asr_metric", default=ASR_METRIC, help=f"Logged ASR scalar printed per run (default: {ASR_METRIC})."
    )
    args, fit_args = parser.parse_known_args(argv)
    if bad := [r for r in args.ratios if not 0.0 <= r <= 1.0]:
        parser.error(f"--ratios must be in [0, 1], got {bad}")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    return args, fit_args


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args, fit_args = parse_args(argv)
    rows, failures = [], []
    for ratio in args.ratios:
        for seed in args.seeds:
            name = run_name(ratio, seed)
            print(f"[sweep] {name}", flush=True)
            try:
                metrics = run_fit(args.config, ratio, seed, args.out / name, fit_args)
            except RuntimeError as error:
                failures.append(str(error))
                print(f"[sweep] {error}", flush=True)
                continue
            rows.append({"ratio": ratio, "seed": seed, **metrics})
            print(f"[sweep] {name}: {args.asr_metric}={metrics.get(args.asr_metric, float('nan')):.3f}", flush=True)
    if rows:
        write_csv(rows, args.out / "results.csv")
        plot(rows, args.out / "rejection_ratio.png", Path(args.config).stem)
        print(f"[sweep] wrote {args.out / 'results.csv'} and {args.out / 'rejection_ratio.png'}")
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))
    return rows


if __name__ == "__main__":
    main()
