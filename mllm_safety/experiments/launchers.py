"""Launching a grid elsewhere than in turn here: a SLURM array (one task per experiment, then a job that writes the
table) or a W&B sweep over the experiments' names. Each task or sweep run is this same command for one experiment
(``--experiments NAME --launcher local --table false``), so it skips what is finished and resumes what is not."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

OWN_OPTIONS = ("--experiments", "--launcher", "--table", "--submit")
"""The grid command's options that a launched task sets itself."""

ARRAY_SCRIPT = "grid_array.sbatch"
TABLE_SCRIPT = "grid_table.sbatch"
WANDB_SWEEP = "wandb_sweep.yaml"


def without_options(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """``args`` without the options ``names`` (as ``--name value`` or ``--name=value``)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


def slurm_scripts(args: Sequence[str], names: list[str], output: Path) -> tuple[Path, Path]:
    """``grid_array.sbatch`` (task i runs experiment i of ``names``, on one node, Lightning starting one process
    per GPU as in ``scripts/slurm/sweep_agent.sbatch``) and ``grid_table.sbatch`` (writes the table), in ``output``.
    They ``cd`` to this directory, so relative paths in ``args`` keep their meaning."""
    output.mkdir(parents=True, exist_ok=True)
    common = without_options(args, OWN_OPTIONS)
    header = [
        "#!/bin/bash",
        "# Written by python -m mllm_safety.experiments --launcher slurm. Edit the #SBATCH lines for your cluster;",
        '# PYTHON overrides the interpreter (e.g. "apptainer exec --nv mllm-safety.sif python").',
    ]
    run = f"${{PYTHON:-{shlex.quote(sys.executable)}}}"
    array = [
        *header,
        "#SBATCH --job-name=mllm-safety-grid",
        f"#SBATCH --array=0-{len(names) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --time=24:00:00",
        f"#SBATCH --output={output.resolve()}/slurm-%x-%A_%a.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"EXPERIMENTS=({' '.join(shlex.quote(name) for name in names)})",
        "NAME=${EXPERIMENTS[$SLURM_ARRAY_TASK_ID]}",
        '# Lightning\'s documented switch for "SLURM allocated the node, Lightning launches the processes".',
        "export SLURM_JOB_NAME=interactive",
        "# shellcheck disable=SC2086  # PYTHON is a word list on purpose",
        f'exec {run} -m mllm_safety.experiments {shlex.join(common)} --experiments "$NAME" --launcher local '
        "--table false",
    ]
    table = [
        *header,
        "#SBATCH --job-name=mllm-safety-grid-table",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --time=00:30:00",
        f"#SBATCH --output={output.resolve()}/slurm-%x-%j.out",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "# shellcheck disable=SC2086",
        f"exec {run} -m mllm_safety.experiments {shlex.join(common)} "
        f"--experiments {shlex.quote(','.join(names))} --launcher collect",
    ]
    paths = output / ARRAY_SCRIPT, output / TABLE_SCRIPT
    for path, lines in zip(paths, (array, table)):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o755)
    return paths


def submit(array_script: Path, table_script: Path) -> tuple[str, str]:
    """Submit the array, then the table job to run after every task has ended; their job ids."""

    def sbatch(*options: str) -> str:
        try:
            done = subprocess.run(["sbatch", "--parsable", *options], capture_output=True, text=True, check=True)
        except FileNotFoundError as error:
            raise RuntimeError("sbatch not found: run on a SLURM login node, or pass --submit false") from error
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"sbatch {' '.join(options)} failed: {error.stderr.strip()}") from error
        return done.stdout.strip().split(";")[0]

    array_id = sbatch(str(array_script))
    return array_id, sbatch(f"--dependency=afterany:{array_id}", str(table_script))


def wandb_sweep_config(args: Sequence[str], names: list[str], output: Path) -> Path:
    """``wandb_sweep.yaml``: a grid over the categorical parameter ``experiments`` (one name per run), each run
    the grid command for that experiment (the agent appends ``--experiments=NAME``)."""
    output.mkdir(parents=True, exist_ok=True)
    common = without_options(args, OWN_OPTIONS)
    config = {
        "name": "paper-grid",
        "method": "grid",
        "parameters": {"experiments": {"values": names}},
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "mllm_safety.experiments",
            *common,
            "--launcher",
            "local",
            "--table",
            "false",
            "${args}",
        ],
    }
    path = output / WANDB_SWEEP
    path.write_text(
        "# Written by python -m mllm_safety.experiments --launcher wandb. Run from the directory it was written in:\n"
        f"#   wandb sweep {path}    # prints ENTITY/PROJECT/SWEEP_ID\n"
        f"#   wandb agent ENTITY/PROJECT/SWEEP_ID   (or sbatch --array=1-{len(names)} "
        "scripts/slurm/sweep_agent.sbatch ENTITY/PROJECT/SWEEP_ID)\n"
        f"# then the table: python -m mllm_safety.experiments {shlex.join(common)} --launcher collect\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    return path
