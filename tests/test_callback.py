import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from ddp_safety_fit import SETTINGS, fit_tiny
from lightning.pytorch.loggers import WandbLogger
from planted import planted_module
from safety_fixtures import write_figstep, write_xstest

from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.generation import GenerationSettings
from mllm_safety.evaluation.registry import BenchmarkSpec


def test_logs_figures_under_safety_and_a_table_of_the_first_rows_of_each_set(tmp_path, monkeypatch):
    csv_path, images = write_figstep(tmp_path / "figstep")
    benchmarks = [
        BenchmarkSpec("figstep", str(csv_path), str(images)),
        BenchmarkSpec("xstest", str(write_xstest(tmp_path / "xstest"))),
    ]
    logged, tables = [], []
    monkeypatch.setattr(WandbLogger, "log_metrics", lambda self, metrics, step=None: logged.append(metrics))
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, key, columns, data, step=None: tables.append(data))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)
    generation = GenerationSettings(max_new_tokens=3, batch_size=4)
    callback = SafetyEvalCallback(benchmarks, judge="gcg", generation=generation, table_rows=2)
    module = planted_module()
    callback.setup(trainer, module, "fit")
    metrics = callback.evaluate(trainer, module, "before")

    assert logged == [metrics] and callback.history == [("before", metrics)]
    assert {k for k in metrics if k.count("/") == 2} == {
        "safety/asr/figstep_image",
        "safety/asr/figstep_text",
        "safety/asr/xstest_unsafe",
        "safety/asr/mean",
        "safety/over_refusal/xstest_safe",
        "safety/over_refusal/mean",
        "safety/refusal_gap/xstest_safe",
    }
    assert "safety/asr/figstep_image/advice" in metrics and "safety/asr/figstep_image/Illegal_Activity" in metrics
    assert float(trainer.callback_metrics["safety/asr/mean"]) == pytest.approx(metrics["safety/asr/mean"])
    (rows,) = tables
    assert [(row[0], row[2] is not None) for row in rows] == [
        ("figstep_image", True),
        ("figstep_image", True),
        ("figstep_text", False),
        ("figstep_text", False),
        ("xstest_safe", False),
        ("xstest_safe", False),
        ("xstest_unsafe", False),
    ]
    assert {row[5] for row in rows} <= {"refused", "answered"} and {row[6] for row in rows} == {""}
    assert "safety/asr/figstep_image" in callback.summary()


def test_utility_and_protocol_sets_are_scored_tabled_and_summarised(tmp_path, monkeypatch):
    csv_path, images = write_figstep(tmp_path / "figstep")
    benchmarks = [
        BenchmarkSpec("figstep", str(csv_path), str(images), protocol="paper"),
        BenchmarkSpec("demo", modes=["text", "shapes"], limit=3),
    ]
    tables = []
    monkeypatch.setattr(WandbLogger, "log_metrics", lambda self, metrics, step=None: None)
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, key, columns, data, step=None: tables.append(data))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)
    callback = SafetyEvalCallback(benchmarks, generation=GenerationSettings(max_new_tokens=3), table_rows=1)
    module = planted_module()
    callback.setup(trainer, module, "fit")
    metrics = callback.evaluate(trainer, module, "before")
    assert "safety/partial/figstep_image" in metrics, "the paper protocol's set is judged by the paper's judge"
    assert "safety/partial/demo_text" not in metrics, "the others by the callback's judge"
    assert "safety/asr/figstep_image/advice" not in metrics, "the paper counts every category"
    assert {k for k in metrics if k.startswith("utility/")} >= {"utility/demo_shapes/accuracy"}
    assert "safety/over_refusal/demo_shapes" not in metrics
    (rows,) = tables
    shapes_row = next(row for row in rows if row[0] == "demo_shapes")
    first = callback.sets[-1].prompts[0].target
    assert shapes_row[2] is not None and shapes_row[6] == json.dumps({"kind": "colour", "answer": first.answer})
    summary = callback.summary()
    assert "utility/demo_shapes/accuracy" in summary and "safety/partial/figstep_image" in summary


def test_evaluates_every_n_optimizer_steps_once_per_step_with_gradient_accumulation(tmp_path):
    callback = SafetyEvalCallback(
        [BenchmarkSpec("demo", modes=["text"], limit=2)],
        generation=GenerationSettings(max_new_tokens=2),
        every_n_epochs=None,
        every_n_steps=1,
        baseline=False,
        log_table=False,
    )
    fit_tiny(tmp_path, 1, callback, accumulate=2)
    assert [label for label, _ in callback.history] == ["step 1", "step 2"]


def test_bad_callback_options_are_rejected():
    with pytest.raises(ValueError, match="unknown judge 'llamaguard'"):
        SafetyEvalCallback(judge="llamaguard")
    with pytest.raises(ValueError, match="max_new_tokens and batch_size must be >= 1"):
        SafetyEvalCallback(generation=GenerationSettings(batch_size=0))
    with pytest.raises(ValueError, match="must be >= 1"):
        SafetyEvalCallback(every_n_steps=0)


def test_under_ddp_on_two_processes_the_baseline_equals_the_single_process_one(tmp_path, planted_weights):
    """Lightning DDP on 2 CPU processes: both ranks generate their slices without hanging (before the first step and
    after the epoch), and the figures before the first step (same seed, same weights) equal a single process's."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here.parent}{os.pathsep}{here}", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(here / "ddp_safety_fit.py"), str(tmp_path), "2"]
    done = subprocess.run(command, cwd=here.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = SafetyEvalCallback([BenchmarkSpec("demo", limit=5)], generation=SETTINGS, log_table=False)
    fit_tiny(tmp_path / "single", 1, single)
    histories = {2: json.loads((tmp_path / "history.json").read_text()), 1: json.loads(json.dumps(single.history))}
    assert [label for label, _ in histories[2]] == ["before", "epoch 0", "epoch 1"], "4 steps, 2 per epoch"
    assert [label for label, _ in histories[1]] == ["before", "epoch 0"]
    baseline = {name: value for name, value in histories[1][0][1].items() if name.count("/") == 2}
    assert len(set(baseline.values())) > 2 and any(0 < v < 1 for v in baseline.values()), "figures vary by set"
    assert histories[2][0] == histories[1][0], "same weights before training, same figures"
    assert "safety/over_refusal/demo_benign" in histories[2][0][1]
