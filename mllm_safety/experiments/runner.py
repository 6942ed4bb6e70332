"""``python -m mllm_safety.experiments --grid configs/paper/grid.yaml --config BASE [--experiments a,b] --output DIR
[--launcher local|slurm|wandb|collect]``: runs a named list of experiments and compares them in one table.

Each experiment is a fit of the base config (the command's ``--config`` files) with the experiment's config files
applied over it, then every other option of the command line (``--model.llava.path ...``, ``--model other.yaml``,
``--data.train_shards ...``), then ``mllm_safety.evaluate`` of its checkpoint with the grid's evaluation configs.
Every experiment's config is read and checked by fit's parser before anything runs, and written as
``DIR/<experiment>/fit_config.yaml``. The figures of each ``eval/report.json`` go into ``DIR/comparison.{csv,md,png}``.
A finished experiment (``DIR/<experiment>/finished.json``) is not run again, a finished fit is not trained again,
and an interrupted one resumes its newest checkpoint (``mllm_safety.sweep.run_fit``), so rerunning the command
continues the grid.

Launchers: ``local`` runs the experiments in turn here; ``slurm`` writes a SLURM array script (one task per
experiment) and a table job, and submits them (``--submit false``: only writes them); ``wandb`` writes a W&B sweep
config over the experiments' names; ``collect`` runs nothing and writes the table of what is finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from mllm_safety.cli import RunCLI, sweep_run_folder
from mllm_safety.experiments.comparison import (
    FAILED,
    FINISHED,
    NOT_RUN,
    Row,
    column_title,
    read_row,
    write_comparison,
)
from mllm_safety.experiments.grid import Grid, load_grid
from mllm_safety.experiments.launchers import slurm_scripts, submit, wandb_sweep_config
from mllm_safety.sweep import run_fit, write_run_config

Launcher = Literal["local", "slurm", "wandb", "collect"]
GRID_OPTIONS = ("grid", "experiments", "output", "launcher", "table", "submit")
FINISHED_FILE = "finished.json"
CONFIG_OPTIONS = ("--config", "-c")


class ExperimentsCLI(RunCLI):
    """The fit config (the base every experiment starts from) plus the grid's options; builds nothing."""

    ckpt_path_help = "Not used: each experiment resumes its own newest checkpoint."

    def __init__(self, args: list[str] | None = None) -> None:
        self.command_args = list(sys.argv[1:] if args is None else args)
        super().__init__(self.command_args)

    def add_entry_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--grid", type=str, default="configs/paper/grid.yaml", help="The grid file.")
        parser.add_argument(
            "--experiments",
            type=str | None,
            default=None,
            help="Comma-separated experiments of the grid (default: all).",
        )
        parser.add_argument("--output", type=Path, default=Path("runs/paper"), help="Folder of the runs and table.")
        parser.add_argument(
            "--launcher",
            type=Launcher,
            default="local",
            help="local: in turn here; slurm: an array job; wandb: a W&B sweep config; collect: only the table.",
        )
        parser.add_argument("--table", type=bool, default=True, help="Write comparison.{csv,md,png} at the end.")
        parser.add_argument("--submit", type=bool, default=True, help="slurm: submit the scripts it writes.")

    def instantiate_classes(self) -> None:
        """Read the grid and every chosen experiment's config (a typo stops the command before any run)."""
        self.grid: Grid = load_grid(self.config.grid)
        self.names = self.grid.select(self.config.experiments)
        self.experiment_configs = {name: self.experiment_config(name) for name in self.names}

    def experiment_config(self, name: str) -> Namespace:
        """The command's ``--config`` files, the experiment's configs, then the command's other options."""
        base, rest = split_config_args(self.command_args)
        layers = [arg for path in self.grid.experiments[name].configs for arg in ("--config", path)]
        config = self.parser.parse_args([*base, *layers, *rest])
        config.trainer.default_root_dir = str(self.config.output / name)
        return config

    def write_fit_config(self, name: str) -> str:
        run_dir = self.config.output / name
        return write_run_config(self, self.experiment_configs[name], run_dir / "fit_config.yaml", GRID_OPTIONS)


def split_config_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(--config files, every other argument)`` of a command line, each in its order."""
    configs, rest, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg in CONFIG_OPTIONS and index + 1 < len(args):
            configs += [arg, args[index + 1]]
            index += 2
            continue
        (configs if arg.startswith(tuple(f"{o}=" for o in CONFIG_OPTIONS)) else rest).append(arg)
        index += 1
    return configs, rest


def run_experiment(cli: ExperimentsCLI, name: str) -> None:
    """Fit (unless the experiment trains nothing), then evaluate; marks the experiment finished."""
    run_dir = cli.config.output / name
    experiment = cli.grid.experiments[name]
    fit_config = cli.write_fit_config(name)
    if experiment.train:
        run_fit(fit_config, run_dir, require=None)
    evaluation = [arg for path in cli.grid.evaluation for arg in ("--config", path)]
    command = [sys.executable, "-m", "mllm_safety.evaluate", "--config", fit_config, *evaluation]
    command += ["--output", str(run_dir / "eval")]
    if experiment.train:  # the run's newest checkpoint, where fit wrote it (its own folder under a W&B agent)
        command += ["--trainer.default_root_dir", str(sweep_run_folder(run_dir)), "--ckpt_path", "last"]
    with open(run_dir / "evaluate.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    report = run_dir / "eval" / "report.json"
    if result.returncode != 0 or not report.is_file():
        raise RuntimeError(f"{name}: evaluation failed (exit {result.returncode}); see {run_dir / 'evaluate.log'}")
    checkpoint = json.loads(report.read_text(encoding="utf-8")).get("checkpoint")
    if experiment.train and not checkpoint:
        raise RuntimeError(f"{name}: the evaluation found no checkpoint of the fit in {run_dir}")
    finished = {"report": str(report), "checkpoint": checkpoint}
    (run_dir / FINISHED_FILE).write_text(json.dumps(finished, indent=1) + "\n", encoding="utf-8")


def is_finished(output: Path, name: str) -> bool:
    return (output / name / FINISHED_FILE).is_file()


def log_to_wandb_sweep(row: Row, grid: Grid) -> None:
    """Under a W&B sweep agent, the experiment's figures go into the sweep run's summary."""
    import wandb

    run = wandb.init(resume="allow")
    run.summary.update({column_title(c): v for c, v in zip(grid.columns, row.figures) if v is not None})
    run.finish()


def main(args: list[str] | None = None) -> list[Row]:
    cli = ExperimentsCLI(args)
    output, launcher, names = cli.config.output, cli.config.launcher, cli.names
    if launcher == "slurm":
        array, table = slurm_scripts(cli.command_args, names, output)
        print(f"[experiments] wrote {array} and {table}")
        if cli.config.submit:
            array_id, table_id = submit(array, table)
            print(f"[experiments] submitted array job {array_id} ({len(names)} tasks) and table job {table_id}")
        return []
    if launcher == "wandb":
        path = wandb_sweep_config(cli.command_args, names, output)
        print(f"[experiments] wrote {path}; start it with: wandb sweep {path}")
        return []
    status: dict[str, str] = {}
    for name in names:
        if is_finished(output, name) or launcher == "collect":
            status[name] = FINISHED if is_finished(output, name) else NOT_RUN
            continue
        print(f"[experiments] {name}: {cli.grid.experiments[name].description}", flush=True)
        try:
            run_experiment(cli, name)
            status[name] = FINISHED
        except RuntimeError as error:
            status[name] = FAILED
            print(f"[experiments] {error}", flush=True)
    rows = [read_row(name, cli.grid, output / name / "eval" / "report.json", status[name]) for name in names]
    if launcher == "local" and os.environ.get("WANDB_SWEEP_ID"):
        for row in rows:
            log_to_wandb_sweep(row, cli.grid)
    if cli.config.table:
        paths = write_comparison(rows, cli.grid, output)
        print(f"[experiments] wrote {', '.join(map(str, paths))}")
        print(paths[1].read_text(encoding="utf-8"))
    if failed := [name for name, state in status.items() if state == FAILED]:
        raise SystemExit(f"{len(failed)} experiment(s) failed: {', '.join(failed)}")
    return rows
