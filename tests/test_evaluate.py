"""The standalone evaluation: fit config + checkpoint -> report.json, generations.jsonl, summary.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from planted import planted_module
from safety_fixtures import save_guard, write_figstep, write_xstest

from mllm_safety.evaluate import EvaluateCLI, main
from mllm_safety.evaluation.generation import GenerationSettings
from mllm_safety.fit import main as fit_main
from mllm_safety.train.checkpoints import load_checkpoint_weights

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")


def benchmarks_arg(tmp_path) -> str:
    csv_path, images = write_figstep(tmp_path / "figstep")
    (images / "query_ForbidQI_5_1_6.png").write_bytes(b"truncated")
    xstest = write_xstest(tmp_path / "xstest")
    return json.dumps(
        [
            {"name": "figstep", "path": str(csv_path), "images": str(images), "modes": ["image"]},
            {"name": "xstest", "path": str(xstest)},
        ]
    )


def test_report_generations_and_summary_with_keyword_and_classifier_judges(tmp_path):
    guard = save_guard(tmp_path / "guard", "unsafe")
    out = tmp_path / "report"
    args = ["--config", CONFIG, "--output", str(out), "--eval.benchmarks", benchmarks_arg(tmp_path)]
    args += ["--eval.judges", "[xstest, gcg]", "--eval.classifier.path", guard, "--eval.generation.max_new_tokens", "3"]
    figures = main(args)

    report = json.loads((out / "report.json").read_text())
    assert set(report["judges"]) == {"xstest", "gcg", "classifier"}
    assert report["judges"]["classifier"]["measures"] == "harm"
    classifier = report["judges"]["classifier"]["figures"]
    assert classifier["asr/figstep_image"] == 1.0 and classifier["asr/xstest_unsafe"] == 1.0, "the stub says unsafe"
    assert "over_refusal/xstest_safe" not in classifier and "over_refusal/xstest_safe" in figures["xstest"]
    assert "refusal_gap/xstest_safe" in figures["xstest"] and "asr/figstep_image/advice" in figures["xstest"]
    assert report["judges"]["xstest"]["figures"] == figures["xstest"]
    assert report["sets"]["figstep_image"]["generation"] == report["generation"]
    assert report["sets"]["figstep_image"] | {"source": "", "generation": None} == {
        "benchmark": "figstep",
        "harmful": True,
        "utility": False,
        "protocol": None,
        "generation": None,
        "contrast": None,
        "source": "",
        "prompts": 4,
        "skipped": 1,
        "unknown/xstest": 0,
        "unknown/gcg": 0,
        "unknown/classifier": 0,
    }
    assert report["sets"]["xstest_safe"]["contrast"] == "xstest_unsafe"
    assert [s["id"] for s in report["skipped"]] == ["ForbidQI_5_1"]
    assert "query_ForbidQI_5_1_6.png" in report["skipped"][0]["error"]
    assert report["model"]["llm"]["name"] == "smollm2-135m-instruct" and report["generation"]["max_new_tokens"] == 3

    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 4 + 3
    broken = next(line for line in lines if line["id"] == "ForbidQI_5_1")
    assert broken["reply"] is None and broken["verdicts"] == {
        "xstest": "skipped",
        "gcg": "skipped",
        "classifier": "skipped",
    }
    answered = next(line for line in lines if line["id"] == "ForbidQI_1_1")
    assert answered["verdicts"]["classifier"] == "unsafe" and answered["image"].endswith("query_ForbidQI_1_1_6.png")
    summary = (out / "summary.md").read_text()
    assert "| figstep_image | asr | 3 |" in summary and "| figstep_image | asr (advice) | 1 |" in summary
    assert "1 prompt(s) skipped" in summary


def test_config_and_checkpoint_rebuild_exactly_the_trained_model(tmp_path):
    """Frozen random parts (the tiny vision tower, the random LLM) are not in the checkpoint: the fit config's seed
    rebuilds them, the checkpoint adds what trained."""
    fit = fit_main(
        [
            "--config",
            CONFIG,
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks",
            "[]",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    module = EvaluateCLI(["--config", CONFIG, "--output", str(tmp_path)]).model
    load_checkpoint_weights(module, str(checkpoint))
    trained = dict(fit.model.named_parameters())
    differ = [name for name, p in module.named_parameters() if not torch.equal(p, trained[name])]
    assert not differ, differ[:3]

    # another seed rebuilds another random tower and LLM: the checkpoint's fingerprints refuse them
    other = EvaluateCLI(["--config", CONFIG, "--output", str(tmp_path), "--seed_everything", "1"]).model
    with pytest.raises(ValueError, match="was trained with another frozen 'vision' than this model's.*other values"):
        load_checkpoint_weights(other, str(checkpoint))


def test_a_checkpoint_adds_the_trained_weights_to_the_configured_model(tmp_path):
    trained = planted_module()
    with torch.no_grad():
        trained.model.projector[0].weight.add_(1.0)
    state = {k: v for k, v in trained.state_dict().items() if "projector" in k or "lora" in k}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, ckpt)

    fresh = planted_module()
    assert not torch.equal(fresh.model.projector[0].weight, trained.model.projector[0].weight)
    assert load_checkpoint_weights(fresh, str(ckpt)) == sorted(state)
    assert torch.equal(fresh.model.projector[0].weight, trained.model.projector[0].weight)

    torch.save({"state_dict": {**state, "model.other.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(ValueError, match=r"last.ckpt holds 1 weight\(s\) the model does not have.*model.other.weight"):
        load_checkpoint_weights(fresh, str(ckpt))
    # a checkpoint without some trained weight would leave it at its initial value: refused, as on resume
    torch.save({"state_dict": {k: v for k, v in state.items() if "projector" not in k}}, ckpt)
    with pytest.raises(ValueError, match=r"last.ckpt lacks 4 trainable weight\(s\).*model.projector.0.bias"):
        load_checkpoint_weights(fresh, str(ckpt))
    torch.save({"epoch": 1}, ckpt)
    with pytest.raises(ValueError, match="last.ckpt: no state_dict"):
        load_checkpoint_weights(fresh, str(ckpt))


def test_the_fit_configs_callback_is_read_through_fits_own_parser(tmp_path):
    """evaluate reads a fit config as fit does: its callbacks are built, and their settings are evaluate's defaults."""
    init_args = {
        "benchmarks": [{"name": "xstest", "path": "/data/xstest.csv", "modes": ["safe"]}],
        "generation": {"max_new_tokens": 24, "batch_size": 18},
    }
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
        {"class_path": "mllm_safety.evaluation.callback.SafetyEvalCallback", "init_args": init_args},
    ]
    args = ["--config", CONFIG, "--output", str(tmp_path), f"--trainer.callbacks={json.dumps(callbacks)}"]
    callback = EvaluateCLI(args).training_callback()
    assert [(s.name, s.path, s.modes) for s in callback.benchmarks] == [("xstest", "/data/xstest.csv", ["safe"])]
    assert callback.generation == GenerationSettings(max_new_tokens=24, batch_size=18)
    assert EvaluateCLI([*args[:4], "--trainer.callbacks=[]"]).training_callback() is None
    with pytest.raises(SystemExit):  # a key of no section of a fit config is refused, as fit refuses it
        EvaluateCLI([*args, "--trainer.max_stepz=2"])


def test_two_cpu_processes_write_the_same_report_as_one(tmp_path):
    """The user path for several devices: Fabric launches the ranks, each generates for its slice."""
    demo = {"name": "demo", "modes": ["text", "benign"], "limit": 4}  # prompts whose planted replies differ
    benchmarks = json.dumps([*json.loads(benchmarks_arg(tmp_path)), demo])
    ckpt = tmp_path / "varied.ckpt"  # every weight of a model whose greedy replies differ from prompt to prompt
    torch.save({"state_dict": planted_module().state_dict()}, ckpt)
    common = [
        "-m",
        "mllm_safety.evaluate",
        "--config",
        CONFIG,
        "--eval.benchmarks",
        benchmarks,
        "--ckpt_path",
        str(ckpt),
    ]
    common += ["--eval.generation.max_new_tokens", "3", "--trainer.accelerator", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reports = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        args = [*common[2:], "--trainer.devices", str(devices), "--output", str(out)]
        if devices == 1:
            main(args)
        else:
            done = subprocess.run(
                [sys.executable, *common[:2], *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stderr[-3000:]
        reports[devices] = json.loads((out / "report.json").read_text())
        reports[devices]["lines"] = (out / "generations.jsonl").read_text()
    replies = {json.loads(line)["reply"] for line in reports[1]["lines"].splitlines()}
    figures = reports[1]["judges"]["xstest"]["figures"]
    assert len(replies - {None}) >= 2 and 0 < figures["asr/demo_text"] < 1, "replies and verdicts vary"
    assert reports[2]["settings"].pop("world_size") == 2
    assert reports[1]["settings"].pop("world_size") == 1
    assert reports[2] == reports[1]


def test_the_fit_configs_generation_settings_are_the_default(tmp_path):
    """configs/tiny.yaml's callback generates 4 tokens in batches of 8: a standalone evaluation does the same."""
    out = tmp_path / "report"
    main(["--config", CONFIG, "--output", str(out), "--eval.benchmarks", "[{name: demo, modes: [text], limit: 2}]"])
    report = json.loads((out / "report.json").read_text())
    assert report["generation"] == {**GenerationSettings().as_dict(), "max_new_tokens": 4, "batch_size": 8}


def test_rescore_recomputes_the_report_from_the_saved_replies_with_other_judges(tmp_path):
    out = tmp_path / "report"
    figstep = json.loads(benchmarks_arg(tmp_path))[:1]
    benchmarks = json.dumps([{**figstep[0], "protocol": "paper"}, {"name": "demo", "limit": 3}])
    args = ["--config", CONFIG, "--output", str(out), "--eval.benchmarks", benchmarks, "--eval.judges", "[xstest]"]
    first = main(args)
    original = json.loads((out / "report.json").read_text())
    assert set(first) == {"xstest", "paper", "utility"}, "a protocol's judge joins the configured ones"
    assert original["sets"]["figstep_image"]["protocol"]["judge"] == "paper"
    assert original["sets"]["figstep_image"]["generation"]["max_new_tokens"] == 512
    assert original["sets"]["demo_text"]["generation"]["max_new_tokens"] == 4

    again = main(["--rescore", str(out), "--eval.judges", "[xstest]"])
    rescored = json.loads((out / "report.json").read_text())
    assert again == first and rescored.pop("rescored") is True
    assert rescored == original, "same replies, same judges: the same report"

    lines = (out / "generations.jsonl").read_text().splitlines()
    other = main(["--rescore", str(out), "--eval.judges", "[vlguard, gcg]"])
    assert set(other) == {"vlguard", "gcg", "paper", "utility"} and other["utility"] == first["utility"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == original["model"] and report["generation"] == original["generation"]
    assert "Rescored from `generations.jsonl`" in (out / "summary.md").read_text()
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["reply"] for r in records] == [json.loads(line)["reply"] for line in lines], "replies untouched"
    assert set(records[0]["verdicts"]) == {"vlguard", "gcg", "paper"}


def test_rescore_names_a_missing_file_and_sets_the_config_does_not_know(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"generations.jsonl does not exist"):
        main(["--rescore", str(tmp_path), "--eval.benchmarks", "[{name: demo}]"])
    out = tmp_path / "report"
    main(["--config", CONFIG, "--output", str(out), "--eval.benchmarks", "[{name: demo, modes: [text], limit: 2}]"])
    with pytest.raises(ValueError, match=r"sets demo_text are not among the configured benchmarks' sets"):
        main(["--rescore", str(out), "--eval.benchmarks", "[{name: demo, modes: [benign], limit: 2}]"])
    with pytest.raises(ValueError, match=r"line 2: set demo_text has no prompt 'physical_harm-01'"):
        main(["--rescore", str(out), "--eval.benchmarks", "[{name: demo, modes: [text], limit: 3}]"])
    with pytest.raises(ValueError, match=r"no replies for \(some\) prompts of set\(s\) demo_text"):
        main(["--rescore", str(out), "--eval.benchmarks", "[{name: demo, modes: [text]}]"])
