"""``python -m mllm_safety.world``: build the world stage by stage, run the paper's method on it, write the table.

Stages (``configs/world/``), each an ordinary run of ``mllm_safety.fit`` (stage 1: ``mllm_safety.world.tower``) in
its own folder under ``--output``, started from the previous stage's trainable weights (``model.init_weights``):

1. ``stage1``: the reading tower (shipped as ``mllm_safety/world/weights/stage1.safetensors``; ``--rebuild_tower``
   trains it again);
2. ``stage0``: the aligned LLM (evaluated before, the base model, and after);
3. ``stage2_align``, ``stage2``: projector alignment, then benign visual instruction tuning (compliance bias);
4. ``stage3``: the paper's swap, once per (ratio, seed), from the stage-2 weights. A seed draws its own samples of
   the stage-2 tasks (``data.world.seed`` = seed + 1), its own swapped subset, order and dropout.

A stage whose folder holds a finished run with the same inputs (config text, arguments, and the bytes of the weights
it starts from) is reused, so an interrupted build continues and a changed stage reruns with everything after it.
The rebuilt stage-2 weights are compared with the shipped ones (``weights/stage2.safetensors``, the demo's start):
``stage2/check.json``. ``--from_shipped`` skips stages 0-2 and starts stage 3 from the shipped weights.

``--safebench safebench.csv`` adds FigStep's SafeBench as an extra held-out check: its questions (the legitimate-
advice categories left out, and those longer than a board) as text and written on the world's boards, evaluated
with ``mllm_safety.evaluate`` after stages 0 and 2 and for the first seed of every stage-3 ratio.

Writes ``results.csv`` (every figure of every evaluation), ``results.md`` (the table: stage-3 figures are the mean
over seeds with their range) and ``world.png``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from safetensors import safe_open

from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.files import read_csv
from mllm_safety.evaluation.tasks.figstep import FIGSTEP_ADVICE_CATEGORIES
from mllm_safety.model.llm import LLMConfig, load_tokenizer
from mllm_safety.provenance import caption
from mllm_safety.world.samples import ANSWER_PROMPT, pieces

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED_TOWER = WEIGHTS / "stage1.safetensors"
SHIPPED_STAGE2 = WEIGHTS / "stage2.safetensors"
EVALUATIONS = "evaluations.json"
DONE = "done.json"

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


class WriteEvaluations(L.Callback):
    """Writes every evaluation of the run's ``SafetyEvalCallback`` (label -> figures) as JSON, on rank 0."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: The JSON file to write.
        """
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            history = [cb.history for cb in trainer.callbacks if isinstance(cb, SafetyEvalCallback)]
            evaluations = {label: metrics for label, metrics in (history[0] if history else [])}
            Path(self.path).write_text(json.dumps(evaluations, indent=1, sort_keys=True))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Runner:
    """Runs stages in subprocesses, each in its own folder, reusing finished ones with the same inputs."""

    def __init__(self, out: Path, configs: Path, fit_args: list[str], launch: Callable[[list[str], Path], int]):
        self.out, self.configs, self.fit_args, self.launch = out, configs, fit_args, launch
        self.timings: dict[str, float] = {}

    def stage(self, name: str, command: list[str], inputs: list[Path], folder: Path) -> bool:
        """Run ``command`` in ``folder`` unless a finished run with the same inputs is there; True if it ran."""
        fingerprint = {"command": command, "inputs": {str(p): sha256(p) for p in inputs}}
        done = folder / DONE
        if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
            print(f"[world] {name}: reusing {folder}", flush=True)
            return False
        folder.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        print(f"[world] {name}: running in {folder}", flush=True)
        start = time.time()
        code = self.launch(command, folder)
        if code != 0:
            raise RuntimeError(f"world {name} failed (exit {code}); see {folder / 'run.log'}")
        self.timings[name] = time.time() - start
        done.write_text(json.dumps({"fingerprint": fingerprint, "seconds": self.timings[name]}, indent=1))
        return True

    def fit(self, name: str, config: str, init: Path, folder: Path, extra: list[str] = ()) -> Path:
        """One ``mllm_safety.fit`` stage started from ``init``; its trainable-weights file."""
        config_path = self.configs / config
        command = [
            "-m", "mllm_safety.fit", "--config", str(config_path),
            "--trainer.default_root_dir", str(folder),
            "--trainer.logger.init_args.save_dir", str(folder),
            f"--model.init_weights=[{init}]",
            "--trainer.callbacks+=mllm_safety.world.driver.WriteEvaluations",
            f"--trainer.callbacks.path={folder / EVALUATIONS}",
            *extra, *self.fit_args,
        ]  # fmt: skip
        self.stage(name, command, [config_path, init], folder)
        return folder / "trainable.safetensors"

    def safebench(self, name: str, config: str, weights: Path, questions: Path, limit: int) -> None:
        """Evaluate a stage's weights on the SafeBench file with ``mllm_safety.evaluate`` (in ``<stage>/safebench``)."""
        config_path = self.configs / config
        folder = weights.parent / "safebench"
        command = [
            "-m", "mllm_safety.evaluate", "--config", str(config_path), f"--model.init_weights=[{weights}]",
            f"--eval.benchmarks=[{{name: world, path: {questions}, limit: {limit}}}]", "--eval.judges=[xstest]",
            "--eval.generation.max_new_tokens=24", "--eval.generation.batch_size=40", "--output", str(folder),
        ]  # fmt: skip
        self.stage(f"{name} SafeBench", command, [config_path, weights, questions], folder)


def safebench_file(csv_path: Path, out: Path) -> Path:
    """SafeBench's questions in the world's evaluation layout (``world_safebench_text`` / ``_typographic``)."""
    tokenizer = load_tokenizer(LLMConfig())
    prompts, too_long = [], 0
    for row in read_csv(
        csv_path, "FigStep SafeBench", ("dataset", "category_id", "task_id", "category_name", "question")
    ):
        if int(row["category_id"]) in FIGSTEP_ADVICE_CATEGORIES:
            continue
        cells = pieces(tokenizer, row["question"])
        if cells is None:
            too_long += 1
            continue
        common = {"id": f"{row['dataset']}_{row['category_id']}_{row['task_id']}", "category": row["category_name"]}
        common |= {"request": row["question"], "target": None}
        prompts.append({**common, "mode": "text", "question": row["question"], "pieces": None})
        prompts.append({**common, "mode": "typographic", "question": ANSWER_PROMPT, "pieces": cells})
    path = out / "safebench_world.json"
    path.write_text(json.dumps({"name": "world_safebench", "prompts": prompts}, indent=1))
    print(f"[world] SafeBench: {len(prompts) // 2} questions on boards, {too_long} longer than a board left out")
    return path


def launch_subprocess(command: list[str], folder: Path) -> int:
    with open(folder / "run.log", "w") as log:
        return subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT).returncode


def compare_weights(rebuilt: Path, shipped: Path) -> dict[str, float]:
    """How far the rebuilt weights are from the shipped ones: the largest absolute difference and the largest
    relative L2 difference over tensors, and whether both files hold the same tensor names."""
    with safe_open(str(rebuilt), "pt") as a, safe_open(str(shipped), "pt") as b:
        names_a, names_b = set(a.keys()), set(b.keys())
        worst_abs = worst_rel = 0.0
        for name in sorted(names_a & names_b):
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
            if x.shape != y.shape:
                return {"same_names": 0.0, "max_abs": float("inf"), "max_rel_l2": float("inf")}
            worst_abs = max(worst_abs, (x - y).abs().max().item())
            worst_rel = max(worst_rel, ((x - y).norm() / y.norm().clamp(min=1e-12)).item())
    return {"same_names": float(names_a == names_b), "max_abs": worst_abs, "max_rel_l2": worst_rel}


def table_rows(out: Path, ratios: list[float], seeds: list[int], stage2_folder: Path | None) -> list[dict]:
    """One row per evaluation: the base model, stage 0, stage 2, and every stage-3 run."""
    rows = []

    def add(condition: str, folder: Path, label: str, **extra) -> None:
        path = folder / EVALUATIONS
        if path.is_file():
            evaluations = json.loads(path.read_text())
            if label in evaluations:
                row = {"condition": condition, **extra, **evaluations[label]}
                report = folder / "safebench" / "report.json"
                if label != "before" and report.is_file():
                    figures = json.loads(report.read_text())["judges"]["xstest"]["figures"]
                    row |= {f"safety/{name}": value for name, value in figures.items()}
                rows.append(row)

    add("base model", out / "stage0", "before")
    add("stage 0", out / "stage0", "epoch 0")
    if stage2_folder is not None:
        add("stage 2", stage2_folder, "epoch 0")
    for ratio in ratios:
        for seed in seeds:
            add(f"stage 3, r={ratio:g}", out / "stage3" / f"r{ratio:g}_s{seed}", "epoch 0", ratio=ratio, seed=seed)
    return rows


def write_table(rows: list[dict], out: Path, made: str | None = None) -> str:
    """``results.csv`` (every figure) and ``results.md`` (the headline columns, mean and range over seeds), headed by
    ``made``, how they were made."""
    columns = ["condition", "ratio", "seed"] + sorted({k for row in rows for k in row} - {"condition", "ratio", "seed"})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    shown = {name: metric for name, metric in COLUMNS.items() if any(metric in row for row in rows)}
    lines = ["| condition | runs | " + " | ".join(shown) + " |", "| --- | ---: |" + " ---: |" * len(shown)]
    for condition in conditions:
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
    text = (f"The table, `results.csv` and `world.png` were {made}.\n\n" if made else "") + "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
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
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if subtitle else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m mllm_safety.world",
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments go to every mllm_safety.fit run (e.g. --trainer.limit_train_batches 2).",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/world"), help="Folder of the stages and results.")
    parser.add_argument("--configs", type=Path, default=Path("configs/world"), help="Folder of the stage configs.")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.3], help="Stage-3 ratios.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Stage-3 seeds.")
    parser.add_argument("--rebuild_tower", action="store_true", help="Train stage 1 again instead of the shipped.")
    parser.add_argument("--from_shipped", action="store_true", help="Skip stages 0-2: stage 3 from shipped weights.")
    parser.add_argument("--safebench", type=Path, help="FigStep's safebench.csv: an extra held-out check.")
    parser.add_argument("--safebench_limit", type=int, default=100, help="SafeBench questions per channel.")
    parser.add_argument("--tower_args", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    args, fit_args = parser.parse_known_args(argv)
    if bad := [r for r in args.ratios if not 0.0 <= r <= 1.0]:
        parser.error(f"--ratios must be in [0, 1], got {bad}")
    if not args.configs.is_dir():
        parser.error(f"--configs {args.configs}: no such folder")
    if args.safebench is not None and not args.safebench.is_file():
        parser.error(f"--safebench {args.safebench}: no such file")
    return args, fit_args


def main(argv: list[str] | None = None, launch: Callable[[list[str], Path], int] = launch_subprocess) -> list[dict]:
    args, fit_args = parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args.configs, fit_args, launch)
    questions = safebench_file(args.safebench, out) if args.safebench else None
    stage2_folder = None
    if args.from_shipped:
        stage2 = SHIPPED_STAGE2
    else:
        tower = SHIPPED_TOWER
        if args.rebuild_tower:
            folder = out / "stage1"
            tower = folder / "trainable.safetensors"
            config = args.configs / "stage1.yaml"
            command = ["-m", "mllm_safety.world.tower", "--config", str(config), "--out", str(tower)]
            runner.stage("stage1", command + args.tower_args, [config], folder)
        stage0 = runner.fit("stage0", "stage0.yaml", tower, out / "stage0")
        aligned = runner.fit("stage2_align", "stage2_align.yaml", stage0, out / "stage2_align")
        stage2_folder = out / "stage2"
        stage2 = runner.fit("stage2", "stage2.yaml", aligned, stage2_folder)
        if questions is not None:
            runner.safebench("stage0", "stage0.yaml", stage0, questions, args.safebench_limit)
            runner.safebench("stage2", "stage2.yaml", stage2, questions, args.safebench_limit)
        if SHIPPED_STAGE2.is_file():
            check = compare_weights(stage2, SHIPPED_STAGE2)
            (stage2_folder / "check.json").write_text(json.dumps(check, indent=1))
            print(f"[world] rebuilt stage 2 vs shipped {SHIPPED_STAGE2.name}: {check}", flush=True)
    for ratio in args.ratios:
        for seed in args.seeds:
            extra = [
                f"--data.rejection_ratio={ratio}", f"--seed_everything={seed}", f"--data.seed={seed}",
                f"--data.rejection.seed={seed}", f"--data.world.seed={seed + 1}",
            ]  # fmt: skip
            folder = out / "stage3" / f"r{ratio:g}_s{seed}"
            name = f"stage3 r={ratio:g} seed={seed}"
            weights = runner.fit(name, "stage3.yaml", stage2, folder, extra)
            if questions is not None and seed == args.seeds[0]:
                runner.safebench(name, "stage3.yaml", weights, questions, args.safebench_limit)
    rows = table_rows(out, args.ratios, args.seeds, stage2_folder)
    if rows:
        made = caption("mllm_safety.world", argv)
        print(write_table(rows, out, made))
        plot(rows, out / "world.png", made.replace("`", ""))
        print(f"[world] wrote {out / 'results.csv'}, {out / 'results.md'} and {out / 'world.png'}")
    if runner.timings:
        (out / "timings.json").write_text(json.dumps(runner.timings, indent=1))
    return rows
