"""The local rejection-ratio sweep and the W&B sweep config."""

import csv
import functools
import json
from datetime import date
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image

from mllm_safety import sweep
from mllm_safety.fit import main as fit_main
from mllm_safety.train.module import SafetyAlignModule

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_sweep_runs_the_grid_collects_metrics_and_plots(tmp_path, monkeypatch, planted_weights):
    argv = ["--config", TINY, "--sweep.ratios", "[0, 0.5]", "--output", str(tmp_path), "--trainer.max_steps", "2"]
    argv += ["--model.init_weights", json.dumps([planted_weights])]  # figures that differ from set to set
    rows = sweep.main([*argv, "--trainer.logger", "false"])
    assert [(row["ratio"], row["seed"]) for row in rows] == [(0.0, 0), (0.5, 0)]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(row["ratio"]) for row in table] == [0.0, 0.5]
    for row in table:
        assert 0.0 <= float(row[sweep.ASR_METRIC]) <= 1.0 and 0.0 <= float(row[sweep.OVER_REFUSAL_METRIC]) <= 1.0
        assert 0.0 <= float(row["utility/demo_shapes/accuracy"]) <= 1.0, "utility figures per ratio"
        assert "safety/over_refusal/demo_typographic_benign" in row
    # each run trained at its own ratio: swapped replies are one short sentence, so fewer reply tokens
    assert float(table[1]["train/reply_tokens"]) < float(table[0]["train/reply_tokens"])
    with Image.open(tmp_path / "rejection_ratio.png") as image:
        assert image.format == "PNG" and image.width > 300
    # its caption beside it: how it was made (the command as typed, the machine, the day) and each run's figures
    caption = (tmp_path / "rejection_ratio.md").read_text()
    assert f"made by `python -m mllm_safety.sweep --config {TINY} --sweep.ratios '[0, 0.5]' --output" in caption
    assert "CPU cores" in caption and date.today().isoformat() in caption
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in caption.splitlines() if line[:1] == "|"]
    column = table[0].index("asr/demo_typographic")
    assert table[0][:2] == ["ratio", "seed"] and [row[:2] for row in table[2:]] == [["0", "0"], ["0.5", "0"]]
    assert table[3][column] == f"{100 * rows[1]['safety/asr/demo_typographic']:.1f}"

    # a finished run is not run again: the sweep can be interrupted and restarted
    assert len(list(tmp_path.glob("*/final_metrics.json"))) == 2

    def refuse(command, **kwargs):
        raise AssertionError(f"a finished run was started again: {command}")

    monkeypatch.setattr(sweep.subprocess, "run", refuse)
    assert sweep.main([*argv, "--trainer.logger", "false"]) == rows

    # a run killed after its last checkpoint, before it wrote its metrics: resumed, it trains nothing and reports the
    # evaluation its checkpoint holds (the planted model's figures differ from set to set)
    monkeypatch.undo()
    assert len({v for k, v in rows[1].items() if k.startswith("safety/")}) > 2
    (tmp_path / sweep.run_name(0.5, 0) / sweep.METRICS_FILE).unlink()
    again = sweep.main([*argv, "--trainer.logger", "false"])
    assert {k: v for k, v in again[1].items() if k.startswith(("safety/", "utility/"))} == {
        k: v for k, v in rows[1].items() if k.startswith(("safety/", "utility/"))
    }
    assert sweep.ASR_METRIC in again[1] and "train/loss" not in again[1], "resumed, nothing trained again"


def test_summary_is_mean_and_range_over_seeds(tmp_path):
    rows = [
        {"ratio": 0.0, "seed": 0, "safety/asr/mean": 0.9, "safety/over_refusal/mean": 0.0},
        {"ratio": 0.0, "seed": 1, "safety/asr/mean": 0.7, "safety/over_refusal/mean": 0.1},
        {"ratio": 0.2, "seed": 0, "safety/asr/mean": 0.2, "safety/over_refusal/mean": 0.1},
        {"ratio": 0.2, "seed": 1, "safety/asr/mean": 0.1, "safety/over_refusal/mean": 0.3},
    ]
    summary = sweep.summarize(rows, "safety/asr/mean")
    assert [pytest.approx(row) for row in [(0.0, 0.8, 0.7, 0.9), (0.2, 0.15, 0.1, 0.2)]] == summary
    sweep.plot(rows, tmp_path / "plot.png", "demo")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert sweep.figure_names(rows, "safety/asr/") == ["safety/asr/mean"]


def test_the_plot_shows_asr_per_set_and_utility_against_the_ratio(tmp_path, monkeypatch):
    """What is drawn: a safety panel with one line per set (over-refusal dashed) and a utility panel, each line the
    mean over seeds in % against the ratio, the seeds' range as a band, one dot per run."""
    rows = [
        {
            "ratio": r,
            "seed": seed,
            "safety/asr/demo_text": 1 - r - seed / 10,
            "safety/asr/demo_text/fraud": 0.5,
            "safety/over_refusal/demo_benign": r / 2,
            "utility/demo_shapes/accuracy": 0.5 - r / 4,
            "utility/demo_shapes/accuracy/colour": 0.1,
        }
        for r in (0.0, 0.5)
        for seed in (0, 1)
    ]
    assert sweep.figure_names(rows, "safety/asr/") == ["safety/asr/demo_text"], "no per-category lines"
    assert sweep.figure_names(rows, "utility/", "/accuracy") == ["utility/demo_shapes/accuracy"]
    saved, savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    sweep.plot(rows, tmp_path / "plot.png", "demo")
    sweep.plot(rows, tmp_path / "plot.png", "demo", "made by python -m mllm_safety.sweep on 2 CPU cores, 2026-12-04")
    assert (tmp_path / "plot.png").stat().st_size > 0
    figure, captioned = saved
    assert figure.get_suptitle() == "demo (2 seeds: mean, range)"
    written = [text.get_text() for text in captioned.texts]
    assert written == [
        *(text.get_text() for text in figure.texts),
        "made by python -m mllm_safety.sweep on 2 CPU cores, 2026-12-04",
    ]
    safety, utility = figure.axes
    lines = {
        ax.get_title(): {
            line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist(), line.get_linestyle())
            for line in ax.get_lines()
        }
        for ax in figure.axes
    }
    assert lines == {
        "safety": {
            "asr/demo_text": ([0.0, 0.5], [pytest.approx(95.0), pytest.approx(45.0)], "-"),
            "over_refusal/demo_benign": ([0.0, 0.5], [0.0, 25.0], "--"),
        },
        "utility (accuracy)": {"demo_shapes/accuracy": ([0.0, 0.5], [50.0, 37.5], "-")},
    }
    for ax in (safety, utility):
        assert ax.get_xlabel().startswith("rejection ratio") and ax.get_ylabel() == "%"
        assert ax.get_ylim() == (-3, 103)
        assert len(ax.collections) == 2 * len(ax.get_lines()), "a band and the runs' dots per line"
    asr_dots = safety.collections[1].get_offsets().tolist()
    assert sorted(map(tuple, asr_dots)) == [(0.0, 90.0), (0.0, 100.0), (0.5, 40.0), (0.5, 50.0)]
    band = safety.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(40.0) and band[:, 1].max() == pytest.approx(100.0)


def test_bad_ratios_and_bad_fit_options_stop_before_any_run(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"sweep.ratios must be in \[0, 1\], got \[1.5\]"):
        sweep.main(["--config", TINY, "--sweep.ratios", "[0.1, 1.5]", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):  # fit's own parser reads every option of every run up front
        sweep.main(["--config", TINY, "--sweep.ratios", "[0.1]", "--output", str(tmp_path), "--trainer.max_stepz=2"])
    assert "max_stepz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing ran"


def test_the_sweep_process_builds_no_model(monkeypatch):
    """Each run builds its model in its own process; the sweep's would hold a second copy (28 GB for a 7B model)."""

    @functools.wraps(SafetyAlignModule.__init__)  # the parser still reads the model's options from its signature
    def build(*args, **kwargs):
        raise AssertionError("the sweep built a model")

    monkeypatch.setattr(SafetyAlignModule, "__init__", build)
    cli = sweep.SweepCLI(["--config", TINY, "--sweep.ratios", "[0, 0.1]", "--sweep.seeds", "[3]"])
    assert cli.settings.ratios == [0.0, 0.1] and cli.settings.seeds == [3]


def test_wandb_sweep_config_targets_the_cli_and_the_logged_metric(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the agent runs the command from the repository root
    config = yaml.safe_load((ROOT / "configs" / "sweeps" / "rejection_ratio.yaml").read_text())
    assert config["method"] == "grid" and config["metric"] == {"name": sweep.ASR_METRIC, "goal": "minimize"}
    assert config["parameters"]["data.rejection_ratio"]["values"] == [0.0, 0.05, 0.1, 0.2, 0.4]
    assert config["command"][2:4] == ["-m", "mllm_safety.fit"] and config["command"][-1] == "${args}"
    # the agent's arguments for one grid point (W&B passes --name=value) are understood by the CLI
    fit_args = config["command"][4:-1]
    with pytest.raises(SystemExit) as done:
        fit_main([*fit_args, "--data.rejection_ratio=0.05", "--seed_everything=2", "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["rejection_ratio"] == 0.05 and printed["seed_everything"] == 2
