"""The paper's grid in one command: named experiments run, compared in one table, skipped once finished; launched
as a SLURM array or a W&B sweep."""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import wandb
import yaml
from data_helpers import write_source
from PIL import Image
from safety_fixtures import write_vlguard_train

from mllm_safety import sweep
from mllm_safety.data.convert import convert
from mllm_safety.experiments import launchers, runner
from mllm_safety.experiments.grid import load_grid

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "configs" / "paper"
TINY = str(ROOT / "configs" / "tiny.yaml")
CHOSEN = ["no_finetuning", "vlguard_image_blank", "med_swap"]
COLUMNS = [
    {"label": "text ASR", "figure": "asr/demo_text", "judge": "xstest"},
    {"label": "over-refusal", "figure": "over_refusal/demo_benign", "judge": "xstest"},
    {"label": "shapes", "figure": "utility/demo_shapes/accuracy", "judge": "exact match"},
]
ONLY_CHECKPOINTS = '[{"class_path": "mllm_safety.train.checkpoints.TrainableWeightsCheckpoint"}]'
"""The fits evaluate nothing themselves (the grid's evaluation does), which keeps the test cheap."""


@pytest.fixture
def shards(tmp_path):
    """VLGuard's training layout (with bad records), LLaVA JSON for mix665k and for LLaVA-Med, in one folder."""
    train = write_vlguard_train(tmp_path / "vlguard")
    data = tmp_path / "shards"
    convert(train, data, image_root=train.parent / "train", source="vlguard", format="vlguard", shard_size=4)
    write_source(data, "llava", [6])
    write_source(data, "med", [4])
    return data


def small_grid(tmp_path: Path) -> Path:
    """The paper's grid and its experiment configs, each experiment's mixture cut to all of the fixture's samples of
    the same sources, evaluated on the demo set."""
    paper = yaml.safe_load((PAPER / "grid.yaml").read_text())
    experiments = {}
    for name in CHOSEN:
        experiment = paper["experiments"][name]
        configs = [str(PAPER / path) for path in experiment.get("configs", [])]
        mixture = {}
        for path in configs:
            mixture = (yaml.safe_load(Path(path).read_text()).get("data") or {}).get("mixture") or mixture
        small = tmp_path / f"{name}-small.yaml"
        small.write_text(yaml.safe_dump({"data": {"mixture": dict.fromkeys(mixture)}}))
        experiments[name] = experiment | {"configs": [*configs, str(small)] if configs else []}
    evaluation = tmp_path / "eval.yaml"
    demo = {"benchmarks": [{"name": "demo"}], "limit": 6, "generation": {"max_new_tokens": 6, "batch_size": 8}}
    evaluation.write_text(yaml.safe_dump({"eval": demo}))
    grid = tmp_path / "grid.yaml"
    spec = {"experiments": experiments, "columns": COLUMNS, "evaluation": [str(evaluation)]}
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    return grid


def test_the_grid_runs_each_experiment_writes_one_row_each_and_skips_finished_ones(
    tmp_path, shards, planted_weights, monkeypatch
):
    output = tmp_path / "runs"
    argv = ["--grid", str(small_grid(tmp_path)), "--config", TINY, "--output", str(output)]
    argv += ["--data.train_shards", str(shards / "*.tar"), "--trainer.max_epochs", "4", "--trainer.logger", "false"]
    argv += ["--model.init_weights", json.dumps([planted_weights]), "--trainer.callbacks", ONLY_CHECKPOINTS]
    rows = runner.main(argv)
    assert [row.experiment for row in rows] == CHOSEN and {row.status for row in rows} == {"finished"}

    # each experiment trained on its own data, as its configs say
    configs = {name: yaml.safe_load((output / name / "fit_config.yaml").read_text())["data"] for name in CHOSEN}
    assert configs["vlguard_image_blank"]["mixture"] == {"vlguard": None, "llava": None}
    assert configs["vlguard_image_blank"]["curated"]["image"] == "blank"
    assert configs["vlguard_image_blank"]["curated"]["turns"] == "random"
    assert configs["med_swap"]["rejection"]["sources"] == ["med"] and configs["med_swap"]["rejection_ratio"] == 1.0
    assert configs["med_swap"]["train_shards"] == str(shards / "*.tar"), "the command line wins over the configs"
    fits = {name: output / name / sweep.METRICS_FILE for name in CHOSEN}
    assert not fits["no_finetuning"].exists(), "no finetuning: evaluated, never trained"
    assert all(fits[name].is_file() for name in CHOSEN[1:])
    metrics = {name: json.loads(fits[name].read_text()) for name in CHOSEN[1:]}
    trained = {name: (m["data/seen"], m["train/loss"]) for name, m in metrics.items()}
    assert trained["med_swap"] != trained["vlguard_image_blank"], "different data: other samples seen, another loss"
    for name in CHOSEN:
        report = json.loads((output / name / "eval" / "report.json").read_text())
        assert (report["checkpoint"] is None) == (name == "no_finetuning"), "trained experiments load their weights"

    with open(output / "comparison.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["experiment"] for row in table] == CHOSEN, "one row per experiment"
    titles = [f"{c['label']} [{c['judge']}]" for c in COLUMNS]
    assert list(table[0]) == ["experiment", "status", *titles, "description"], "each figure names its judge"
    for title in titles:
        assert all(0.0 <= float(row[title]) <= 1.0 for row in table)
    figures = {tuple(row[title] for title in titles) for row in table}
    assert len(figures) > 1, "the experiments' figures differ"
    assert len({row[titles[0]] for row in table}) > 1 or len({row[titles[1]] for row in table}) > 1, "safety too"
    markdown = (output / "comparison.md").read_text()
    assert markdown.count("\n| ") == 1 + len(CHOSEN) and "text ASR [xstest]" in markdown
    assert f"{100 * float(table[0][titles[0]]):.1f}%" in markdown.splitlines()[2]
    with Image.open(output / "comparison.png") as image:
        assert image.format == "PNG" and image.width > 300

    # a rerun trains and evaluates nothing, and writes the same table
    def refuse(command, **kwargs):
        raise AssertionError(f"a finished experiment was run again: {command}")

    monkeypatch.setattr(subprocess, "run", refuse)
    again = runner.main(argv)
    assert again == rows
    with open(output / "comparison.csv") as handle:
        assert list(csv.DictReader(handle)) == table

    # under a W&B sweep agent (one experiment per run), the row's figures go into the sweep run's summary
    class SweepRun:
        def __init__(self):
            self.summary = {}

        def finish(self):
            logged.append(self.summary)

    logged = []
    monkeypatch.setenv("WANDB_SWEEP_ID", "grid1")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: SweepRun())
    runner.main([*argv, "--experiments=med_swap", "--table", "false"])
    assert len(logged) == 1 and logged[0] == pytest.approx({t: float(table[2][t]) for t in titles}, abs=1e-5)

    # an experiment trained but not evaluated (killed in between) is evaluated again, not trained again
    monkeypatch.undo()
    (output / "med_swap" / runner.FINISHED_FILE).unlink()
    (output / "med_swap" / "eval" / "report.json").unlink()
    started = []
    real_run = subprocess.run

    def record(command, **kwargs):
        started.append(command[2])
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", record)
    assert runner.main([*argv, "--experiments", "med_swap,no_finetuning", "--table", "false"]) == [rows[2], rows[0]]
    assert started == ["mllm_safety.evaluate"]


def test_unknown_experiments_and_bad_grids_stop_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--experiments names \['vlguard_typo'\], which the grid lacks"):
        runner.main(["--config", TINY, "--experiments", "vlguard,vlguard_typo", "--output", str(tmp_path)])
    bad = tmp_path / "grid.yaml"
    bad.write_text(
        yaml.safe_dump({"experiments": {"a": {"description": "x", "configs": ["nope.yaml"]}}, "columns": COLUMNS})
    )
    with pytest.raises(FileNotFoundError, match="experiment a names nope.yaml"):
        runner.main(["--config", TINY, "--grid", str(bad), "--output", str(tmp_path)])
    with pytest.raises(SystemExit):  # every experiment's config is read by fit's parser first
        runner.main(["--config", TINY, "--output", str(tmp_path), "--data.rejection_ratoi", "0.1"])
    assert "rejection_ratoi" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/fit_config.yaml")), "nothing ran"


def test_every_paper_experiment_reads_as_a_fit_config_over_any_model(tmp_path):
    grid = load_grid(PAPER / "grid.yaml")
    assert {"no_finetuning", "mix665k", "vlguard", "med_swap"} <= set(grid.experiments)
    base = ["--config", str(ROOT / "configs" / "llava15_7b_lora.yaml")]
    cli = runner.ExperimentsCLI(base)
    data = {name: config.data for name, config in cli.experiment_configs.items()}
    assert data["vlguard"].mixture == {"vlguard": None, "llava": 5000} and data["vlguard"].curated.turns == "random"
    assert data["med_swap"].mixture == {"med": 2000, "llava": 5000} and data["med_swap"].rejection_ratio == 1.0
    assert data["med_swap"].rejection.kept_turn == "random" and data["mix665k"].rejection_ratio == 0.0
    ablations = {name: data[name].curated for name in grid.experiments if name.startswith("vlguard_")}
    assert {c.image for c in ablations.values()} == {"keep", "blank", "noise", "other", "drop"}
    assert {c.reply for c in ablations.values()} == {"keep", "fixed"}
    assert {c.contrast for c in ablations.values()} == {"keep", "unsafe_only", "no_safe_images"}
    assert {c.refusal_share for c in ablations.values()} == {None, 1.0}
    assert sorted(data[n].rejection_ratio for n in grid.experiments if n.startswith("med_swap")) == [
        0.1,
        0.25,
        0.5,
        1.0,
    ]
    assert all(config.model.llava.path == "llava-hf/llava-1.5-7b-hf" for config in cli.experiment_configs.values())
    model = tmp_path / "model.yaml"  # another model for every experiment: a model-only config file
    model.write_text(yaml.safe_dump({"llava": {"path": "/models/llava-1.5-13b-hf"}, "max_length": 1024}))
    other = runner.ExperimentsCLI([*base, "--model", str(model)])
    assert {c.model.llava.path for c in other.experiment_configs.values()} == {"/models/llava-1.5-13b-hf"}
    assert {c.model.lora.r for c in other.experiment_configs.values()} == {128}, "the rest of the base recipe stays"


def test_slurm_array_runs_one_experiment_per_task_then_the_table(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$SLURM_JOB_NAME $*" >> {calls}\n')  # one line per call
    python.chmod(0o755)
    output = tmp_path / "runs"
    argv = ["--config", TINY, "--experiments", "vlguard,med_swap", "--output", str(output), "--launcher", "slurm"]
    assert runner.main([*argv, "--submit", "false", "--trainer.max_steps", "2"]) == []
    array, table = output / launchers.ARRAY_SCRIPT, output / launchers.TABLE_SCRIPT
    assert "#SBATCH --array=0-1" in array.read_text()
    env = os.environ | {"PYTHON": str(python), "SLURM_JOB_NAME": "grid"}
    for task in (0, 1):
        subprocess.run(["bash", str(array)], env=env | {"SLURM_ARRAY_TASK_ID": str(task)}, check=True)
    subprocess.run(["bash", str(table)], env=env, check=True)
    common = f"-m mllm_safety.experiments --config {TINY} --output {output} --trainer.max_steps 2"
    # each task: one experiment, no table, Lightning starting the processes (as scripts/slurm/sweep_agent.sbatch)
    assert calls.read_text().splitlines() == [
        f"interactive {common} --experiments vlguard --launcher local --table false",
        f"interactive {common} --experiments med_swap --launcher local --table false",
        f"grid {common} --experiments vlguard,med_swap --launcher collect",
    ]

    # submitted: the array, then the table job after it (a fake sbatch records both)
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path / "sbatch_calls"}\necho 41\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    runner.main(argv)
    assert (tmp_path / "sbatch_calls").read_text().splitlines() == [
        f"--parsable {array}",
        f"--parsable --dependency=afterany:41 {table}",
    ]


def test_wandb_sweep_over_named_experiments_runs_the_grid_command(tmp_path, monkeypatch):
    output = tmp_path / "runs"
    argv = ["--config", TINY, "--experiments", "mix665k,vlguard", "--output", str(output)]
    runner.main([*argv, "--launcher", "wandb"])
    config = yaml.safe_load((output / launchers.WANDB_SWEEP).read_text())
    assert config["method"] == "grid" and config["parameters"] == {"experiments": {"values": ["mix665k", "vlguard"]}}
    command = config["command"]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "mllm_safety.experiments"] and command[-1] == "${args}"
    # one agent's run: the command with W&B's --experiments=NAME is the grid command for that experiment alone
    cli = runner.ExperimentsCLI([*command[4:-1], "--experiments=vlguard"])
    assert cli.names == ["vlguard"] and cli.config.launcher == "local" and cli.config.table is False
    assert cli.config.output == output
