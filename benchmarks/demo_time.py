"""How long the README's first command takes: the demo (``configs/demo.yaml``) run N times, each from a fresh run
folder in a fresh process, with each run's wall time split into its phases.

    python benchmarks/demo_time.py --runs 4                  # the README's figure: run it on idle cores
    python benchmarks/demo_time.py --runs 1 --config configs/demo.yaml --json times.json

Per run it prints the process's wall time (start of Python to exit: imports, model build, data, training, both
evaluations, the table), the training time (first training batch to last, with its steps/s) and the evaluation
time (the sum of the safety callback's evaluations, with the prompts and generated tokens per second), then the
minimum, median and maximum of each over the runs. SmolLM2 is converted to ``~/.cache/mllm_safety`` once, by the
first run ever (``MLLM_SAFETY_CACHE``); run the demo once before timing it, as the README's figures assume.

The CPU time of each phase (all threads of the process) is printed too: on a machine shared with other jobs it
moves far less than the wall time, so two configs timed there can be compared by it.

Phases are taken by wrapping the safety callback's ``evaluate``, the generation call and two Lightning hooks inside
the timed process (``--one``), so the figures are those of the real command, not of a copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: str, run_dir: Path) -> None:
    """Runs ``python -m mllm_safety.fit --config CONFIG`` in this process, into ``run_dir``, and writes its phase
    times to ``run_dir/phases.json``."""
    start = time.perf_counter()
    from mllm_safety import fit
    from mllm_safety.evaluation import callback, generation

    phases: dict[str, float] = {
        "evaluation_s": 0.0, "evaluation_cpu_s": 0.0, "generated_tokens": 0, "generate_calls": 0, "prompts": 0
    }  # fmt: skip
    evaluations: list[dict[str, float]] = []
    train: dict[str, float] = {}

    evaluate = callback.SafetyEvalCallback.evaluate

    def timed_evaluate(self, trainer, pl_module, label):
        began, began_cpu = time.perf_counter(), time.process_time()
        metrics = evaluate(self, trainer, pl_module, label)
        spent = time.perf_counter() - began
        phases["evaluation_s"] += spent
        phases["evaluation_cpu_s"] += time.process_time() - began_cpu
        phases["prompts"] += sum(len(s.prompts) for s in self.sets)
        evaluations.append({"label": label, "seconds": spent})
        return metrics

    generate_replies = generation.generate_replies

    def counted_generate(module, samples, settings, keys):
        replies = generate_replies(module, samples, settings, keys)
        stops = set(module.processor.stop_token_ids) | {module.processor.tokenizer.pad_token_id}
        for reply in replies:
            phases["generated_tokens"] += next(
                (i + 1 for i, t in enumerate(reply.tokens) if t in stops), len(reply.tokens)
            )
        phases["generate_calls"] += 1
        return replies

    def batch_start(self, trainer, pl_module, batch, batch_idx):
        train.setdefault("first_batch", time.perf_counter())
        train.setdefault("first_batch_cpu", time.process_time())

    def batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        train["last_batch"] = time.perf_counter()
        train["last_batch_cpu"] = time.process_time()
        train["steps"] = trainer.global_step

    callback.SafetyEvalCallback.evaluate = timed_evaluate
    generation.generate_replies = counted_generate
    callback.SafetyEvalCallback.on_train_batch_start = batch_start
    on_train_batch_end = callback.SafetyEvalCallback.on_train_batch_end

    def chained_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        batch_end(self, trainer, pl_module, outputs, batch, batch_idx)
        on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)

    callback.SafetyEvalCallback.on_train_batch_end = chained_batch_end
    fit.main(
        [
            "--config", config,
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir),
        ]
    )  # fmt: skip
    training = train["last_batch"] - train["first_batch"] if train else 0.0
    phases |= {
        "process_s": time.perf_counter() - start,
        "training_s": training,
        "training_cpu_s": train["last_batch_cpu"] - train["first_batch_cpu"] if train else 0.0,
        "process_cpu_s": time.process_time(),
        "steps": train.get("steps", 0),
        "evaluations": evaluations,
    }
    (run_dir / "phases.json").write_text(json.dumps(phases, indent=1))


def _row(name: str, wall: float, p: dict) -> str:
    steps_per_s = p["steps"] / p["training_s"] if p["training_s"] else float("nan")
    tokens_per_s = p["generated_tokens"] / p["evaluation_s"] if p["evaluation_s"] else float("nan")
    each = ", ".join(f"{e['label']} {e['seconds']:.1f}s" for e in p["evaluations"])
    return (
        f"{name}: wall {wall:6.1f}s  training {p['training_s']:6.1f}s ({p['steps']} steps, {steps_per_s:.2f}/s)  "
        f"evaluation {p['evaluation_s']:6.1f}s ({each}; {p['prompts']} prompts, {p['generated_tokens']} tokens, "
        f"{tokens_per_s:.0f} tokens/s)  CPU time: process {p['process_cpu_s']:.0f}s, "
        f"training {p['training_cpu_s']:.0f}s, evaluation {p['evaluation_cpu_s']:.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="Demo runs, each from a fresh run folder.")
    parser.add_argument("--config", default="configs/demo.yaml", help="The fit config timed.")
    parser.add_argument("--json", help="Also write every run's phases to this file.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: the timed process, writing into this folder
    args = parser.parse_args()
    if args.one:
        run_one(args.config, Path(args.one))
        return
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    results = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    for number in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="demo-time-") as folder:
            run_dir = Path(folder) / "demo"
            began = time.perf_counter()
            command = [sys.executable, __file__, "--config", args.config, "--one", str(run_dir)]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - began
            if done.returncode != 0:
                sys.exit(f"run {number} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            phases = json.loads((run_dir / "phases.json").read_text()) | {"wall_s": wall}
        if number == 1:  # the table the demo ends with: what the README shows
            print(done.stdout[done.stdout.rfind("evaluation ") :].rstrip(), flush=True)
        results.append(phases)
        print(_row(f"run {number}", wall, phases), flush=True)
    for key, label in (("wall_s", "wall"), ("training_s", "training"), ("evaluation_s", "evaluation")):
        values = [r[key] for r in results]
        print(
            f"{label:>10}: min {min(values):6.1f}s  median {statistics.median(values):6.1f}s  max {max(values):6.1f}s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
