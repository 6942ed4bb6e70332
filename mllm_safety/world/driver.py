"""``python -m mllm_safety.world``: build the world stage by stage, run the paper's method on it, write the table.

Stages (``configs/world/``), each an ordinary run of ``mllm_safety.fit`` (stage 1: ``mllm_safety.world.tower``) in
its own folder under ``--output``, started from the previous stage's trainable weights (``model.init_weights``):

1. ``stage1``: the reading tower (shipped as ``mllm_safety/world/weights/stage1.safetensors``; ``--rebuild_tower``
   trains it again);
2. ``stage0``: the aligned LLM (evaluated before, the base model, and after);
3. ``stage2_align``, ``stage2``: projector alignment, then benign visual instruction tuning (compliance bias);
4. ``stage3``: the paper's swap, once per (ratio, seed), from the stage-2 weights. A seed draws its own samples of
   the stage-2 tasks (``data.world.seed`` = seed + 1), its own swapped subset, order and dropout.

``--conditions`` adds the paper's comparison (issue 20), each stage-3 arm once per (``--condition_ratios`` ratio,
seed), with as many refusals as the swap at that ratio (ratio x the stage-3 samples) and the same steps:

- ``curated``: VLGuard-shaped curated data in the stage-2 mix, nothing swapped: held-in harmful requests on boards,
  refused in varied words, each with its benign twin on a board, answered (``data.world.curated``);
- ``curated_no_twins``, ``curated_fixed_reply`` (every refusal the paper's sentence), ``curated_other_image`` (the
  boards replaced by boards of other benign text): the paper's ablations of its curated data;
- ``stage2_rejection``: stage 2 rebuilt from the stage-2a weights with a fraction (``--stage2_ratios``) of its
  replies swapped, evaluated after stage 2 with no stage 3 (needs stages 0-2, so not with ``--from_shipped``).

The scene descriptions (``world`` mode ``description``) are part of stage 3's evaluation; for stages 0 and 2 (whose
configs predate them) the driver evaluates them apart, in ``<stage>/description``.

A stage whose folder holds a finished run with the same inputs (config text, arguments, and the bytes of the weights
it starts from) is reused, so an interrupted build continues and a changed stage reruns with everything after it.
The rebuilt stage-2 weights are compared with the shipped ones (``weights/stage2.safetensors``, where
``stage3.yaml`` starts by default): ``stage2/check.json``. ``--from_shipped`` skips stages 0-2 and starts stage 3 from
the shipped weights. ``--tabulate`` runs nothing and writes the tables from the runs already finished.

``--safebench safebench.csv`` adds FigStep's SafeBench as an extra held-out check: its questions (the legitimate-
advice categories left out, and those longer than a board) as text and written on the world's boards, evaluated
with ``mllm_safety.evaluate`` after stages 0 and 2 and for the first seed of every stage-3 ratio.

Writes ``results.csv`` (every figure of every evaluation), ``results.md`` (the table: stage-3 figures are the mean
over seeds with their range) and ``world.png``; with conditions beyond the swap, also ``comparison.{csv,md,png}``
(every arm beside the swap at each of the condition ratios).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import yaml
from safetensors import safe_open

from mllm_safety.data.rejection import PAPER_REJECTION
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.files import read_csv
from mllm_safety.evaluation.tasks.figstep import FIGSTEP_ADVICE_CATEGORIES
from mllm_safety.model.llm import LLMConfig, load_tokenizer
from mllm_safety.provenance import caption
from mllm_safety.world.report import (
    EVALUATIONS,
    plot,
    plot_comparison,
    table_rows,
    write_comparison,
    write_table,
)
from mllm_safety.world.samples import ANSWER_PROMPT, pieces

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED_TOWER = WEIGHTS / "stage1.safetensors"
SHIPPED_STAGE2 = WEIGHTS / "stage2.safetensors"
DONE = "done.json"

CURATED_ARMS: dict[str, list[str]] = {
    "curated": [],
    "curated_no_twins": ["--data.world.curated_twins=false"],
    "curated_fixed_reply": [f"--data.world.curated_reply={PAPER_REJECTION}"],  # taken as written, no quotes
    "curated_other_image": ["--data.world.curated_image=other"],
}
"""Curated stage-3 arm -> its options beside ``data.world.curated`` (the ablations of the paper's section 4)."""
CONDITIONS = ("swap", *CURATED_ARMS, "stage2_rejection")
DESCRIPTION_ONLY = "[{name: world, modes: [description]}]"


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
    """Runs stages in subprocesses, each in its own folder, reusing finished ones with the same inputs; with
    ``tabulate``, runs nothing and only tells which are finished."""

    def __init__(
        self, out: Path, configs: Path, fit_args: list[str], launch: Callable[[list[str], Path], int],
        tabulate: bool = False,
    ):  # fmt: skip
        self.out, self.configs, self.fit_args, self.launch, self.tabulate = out, configs, fit_args, launch, tabulate
        self.timings: dict[str, float] = {}
        self.current: set[Path] = set()
        """Folders holding a finished run of today's command and inputs: the only ones the tables read."""

    def stage(self, name: str, command: list[str], inputs: list[Path], folder: Path) -> bool:
        """Run ``command`` in ``folder`` unless a finished run with the same inputs is there; True if it ran."""
        if self.tabulate and not all(p.is_file() for p in inputs):
            print(f"[world] {name}: not run (an input is not built)", flush=True)
            return False
        fingerprint = {"command": command, "inputs": {str(p): sha256(p) for p in inputs}}
        done = folder / DONE
        if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
            print(f"[world] {name}: reusing {folder}", flush=True)
            self.current.add(folder)
            return False
        if self.tabulate:
            print(f"[world] {name}: not run (--tabulate)", flush=True)
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
        self.current.add(folder)
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

    def evaluate(self, name: str, config: str, weights: Path, benchmarks: str, inputs: list[Path] = ()) -> None:
        """Evaluate a stage's weights with ``mllm_safety.evaluate`` on ``benchmarks`` (in ``<stage>/<name>``), with
        the generation settings of the stages' own evaluations."""
        config_path = self.configs / config
        folder = weights.parent / name
        command = [
            "-m", "mllm_safety.evaluate", "--config", str(config_path), f"--model.init_weights=[{weights}]",
            f"--eval.benchmarks={benchmarks}", "--eval.judges=[xstest]",
            "--eval.generation.max_new_tokens=24", "--eval.generation.batch_size=40", "--output", str(folder),
        ]  # fmt: skip
        self.stage(f"{weights.parent.name} {name}", command, [config_path, weights, *inputs], folder)

    def safebench(self, config: str, weights: Path, questions: Path, limit: int) -> None:
        """Evaluate a stage's weights on the SafeBench file (in ``<stage>/safebench``)."""
        benchmarks = f"[{{name: world, path: {questions}, limit: {limit}}}]"
        self.evaluate("safebench", config, weights, benchmarks, [questions])


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


def stage3_samples(config: Path) -> int:
    """The stage-3 config's sample count, which turns a condition ratio into a number of curated refusals."""
    samples = (((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("world") or {}).get("samples")
    if not isinstance(samples, int):
        raise ValueError(f"{config}: data.world.samples must be set to turn a condition ratio into a refusal count")
    return samples


def seed_args(seed: int) -> list[str]:
    """A stage-3 seed: its own samples of the stage-2 tasks, swapped subset, order and dropout."""
    return [
        f"--seed_everything={seed}", f"--data.seed={seed}", f"--data.rejection.seed={seed}",
        f"--data.world.seed={seed + 1}",
    ]  # fmt: skip


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
    parser.add_argument(
        "--conditions", nargs="+", choices=CONDITIONS, default=["swap"], metavar="CONDITION",
        help=f"What to run beside stages 0-2: any of {', '.join(CONDITIONS)} (see above).",
    )  # fmt: skip
    parser.add_argument(
        "--condition_ratios", type=float, nargs="+", default=[0.05, 0.1],
        help="Refusal shares of the curated arms (refusals = share x stage-3 samples, as the swap at that ratio).",
    )  # fmt: skip
    parser.add_argument(
        "--stage2_ratios", type=float, nargs="+", default=[0.01, 0.05],
        help="Swap ratios of stage2_rejection (0.01 of stage 2's 2400 samples: as many refusals as stage 3 at 0.05).",
    )  # fmt: skip
    parser.add_argument(
        "--tabulate", action="store_true",
        help="Run nothing: write the tables from the runs already finished (an interrupted grid's partial results).",
    )  # fmt: skip
    parser.add_argument("--tower_args", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    args, fit_args = parser.parse_known_args(argv)
    for option in ("ratios", "condition_ratios", "stage2_ratios"):
        if bad := [r for r in getattr(args, option) if not 0.0 <= r <= 1.0]:
            parser.error(f"--{option} must be in [0, 1], got {bad}")
    if args.from_shipped and "stage2_rejection" in args.conditions:
        parser.error("--conditions stage2_rejection rebuilds stage 2 from stage 2a: it cannot run --from_shipped")
    if not args.configs.is_dir():
        parser.error(f"--configs {args.configs}: no such folder")
    if args.safebench is not None and not args.safebench.is_file():
        parser.error(f"--safebench {args.safebench}: no such file")
    return args, fit_args


def main(argv: list[str] | None = None, launch: Callable[[list[str], Path], int] = launch_subprocess) -> list[dict]:
    args, fit_args = parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, args.configs, fit_args, launch, args.tabulate)
    questions = safebench_file(args.safebench, out) if args.safebench else None
    world: list[tuple[str, Path, str, dict]] = []  # (condition, folder, evaluation label, extra columns)
    compared: list[tuple[str, Path, str, dict]] = []
    if args.from_shipped:
        stage2 = SHIPPED_STAGE2
    else:
        tower = SHIPPED_TOWER
        if args.rebuild_tower:
            folder = out / "stage1"
            tower = folder / "trainable.safetensors"
            config = args.configs / "stage1.yaml"
            command = ["-m", "mllm_safety.world.tower", "--config", str(config), "--output", str(tower)]
            runner.stage("stage1", command + args.tower_args, [config], folder)
        stage0 = runner.fit("stage0", "stage0.yaml", tower, out / "stage0")
        aligned = runner.fit("stage2_align", "stage2_align.yaml", stage0, out / "stage2_align")
        stage2 = runner.fit("stage2", "stage2.yaml", aligned, out / "stage2")
        stages = [("stage 0", out / "stage0", "epoch 0", {}), ("stage 2", out / "stage2", "epoch 0", {})]
        world += [("base model", out / "stage0", "before", {}), *stages]
        compared += stages
        if questions is not None:
            runner.safebench("stage0.yaml", stage0, questions, args.safebench_limit)
            runner.safebench("stage2.yaml", stage2, questions, args.safebench_limit)
        runner.evaluate("description", "stage0.yaml", stage0, DESCRIPTION_ONLY)
        runner.evaluate("description", "stage2.yaml", stage2, DESCRIPTION_ONLY)
        if SHIPPED_STAGE2.is_file() and stage2.is_file():
            check = compare_weights(stage2, SHIPPED_STAGE2)
            (out / "stage2" / "check.json").write_text(json.dumps(check, indent=1))
            print(f"[world] rebuilt stage 2 vs shipped {SHIPPED_STAGE2.name}: {check}", flush=True)
        if "stage2_rejection" in args.conditions:
            for ratio in args.stage2_ratios:
                folder = out / "stage2_rejection" / f"r{ratio:g}"
                name = f"stage2 rejection r={ratio:g}"
                weights = runner.fit(name, "stage2.yaml", aligned, folder, [f"--data.rejection_ratio={ratio}"])
                runner.evaluate("description", "stage2.yaml", weights, DESCRIPTION_ONLY)
                compared.append((f"stage 2 + rejection, r={ratio:g}", folder, "epoch 0", {"ratio": ratio}))
    if "swap" in args.conditions:
        for ratio in args.ratios:
            for seed in args.seeds:
                folder = out / "stage3" / f"r{ratio:g}_s{seed}"
                name = f"stage3 r={ratio:g} seed={seed}"
                weights = runner.fit(
                    name, "stage3.yaml", stage2, folder, [f"--data.rejection_ratio={ratio}", *seed_args(seed)]
                )
                if questions is not None and seed == args.seeds[0]:
                    runner.safebench("stage3.yaml", weights, questions, args.safebench_limit)
                columns = {"ratio": ratio, "seed": seed}
                world.append((f"stage 3, r={ratio:g}", folder, "epoch 0", columns))
                if ratio in args.condition_ratios or ratio == 0:  # r = 0: every arm's control, nothing refused
                    label = f"stage 3 swap, r={ratio:g}" if ratio else "stage 3 control, r=0"
                    compared.append((label, folder, "epoch 0", columns))
    arms = [arm for arm in CURATED_ARMS if arm in args.conditions]
    if arms:
        samples = stage3_samples(args.configs / "stage3.yaml")
        for ratio in args.condition_ratios:
            refusals = round(ratio * samples)
            for arm in arms:
                for seed in args.seeds:
                    folder = out / "stage3" / f"{arm}_r{ratio:g}_s{seed}"
                    extra = ["--data.rejection_ratio=0", f"--data.world.curated={refusals}", *CURATED_ARMS[arm]]
                    runner.fit(
                        f"stage3 {arm} r={ratio:g} seed={seed}", "stage3.yaml", stage2, folder, extra + seed_args(seed)
                    )
                    columns = {"ratio": ratio, "seed": seed, "refusals": refusals}
                    compared.append((f"stage 3 {arm}, r={ratio:g}", folder, "epoch 0", columns))
    made = caption("mllm_safety.world", argv)
    rows = table_rows(world, runner.current)
    if rows:
        print(write_table(rows, out, made))
        plot(rows, out / "world.png", made.replace("`", ""))
        print(f"[world] wrote {out / 'results.csv'}, {out / 'results.md'} and {out / 'world.png'}")
    if arms or "stage2_rejection" in args.conditions:
        # the stages before stage 3 first, then each condition ratio's arms together
        ordered = sorted(compared, key=lambda run: run[0].startswith("stage 3") and run[3]["ratio"])
        if comparison := table_rows(ordered, runner.current):
            print(write_comparison(comparison, out, made))
            plot_comparison(comparison, out / "comparison.png", made.replace("`", ""))
            print(f"[world] wrote {out / 'comparison.csv'}, {out / 'comparison.md'} and {out / 'comparison.png'}")
    if runner.timings:  # seconds per stage, over every invocation on this folder
        timings = out / "timings.json"
        earlier = json.loads(timings.read_text()) if timings.is_file() else {}
        timings.write_text(json.dumps(earlier | runner.timings, indent=1))
    return rows
