"""The model card an export writes: the Hub's front matter, the recipe of the run's config, the figures of the
checkpoint's evaluation report with their judge, protocol and generation settings, or plainly none."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safety_fixtures import write_figstep
from test_trainable import LORA, finetuned

from mllm_safety.evaluate import main as evaluate_main
from mllm_safety.export import main as export_main
from mllm_safety.model.trainable import save_trainable, trainable_state_dict
from mllm_safety.model_card import base_license, read_evaluation

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
RECIPE = ["--data.rejection_ratio=0.17", "--data.rejection.sentence=No, not that.", "--trainer.max_epochs=5"]
RECIPE += ["--seed_everything=7", "--model.lora.dropout=0.25", "--data.mixture={llava: 50, med: 20}"]
"""Recipe values none of which is tiny.yaml's or a default, so the card can only have them from the config."""


def run_args(path: str, checkpoint: Path) -> list[str]:
    """A run of tiny.yaml started from the llava-hf folder ``path``, and the checkpoint it wrote."""
    llava = ["--model.llm=null", "--model.vision=null", "--model.projector=null", f"--model.llava.path={path}"]
    return ["--config", CONFIG, *llava, "--model.llava.chat_template=llava_v1", f"--ckpt_path={checkpoint}"]


@pytest.fixture
def checkpoint(tiny_llava_path, tmp_path) -> Path:
    """A checkpoint of a run of the tiny llava-hf folder: LoRA and projector moved, as after training."""
    model = finetuned(tiny_llava_path)
    file = tmp_path / "trainable.safetensors"
    save_trainable(file, trainable_state_dict(model), lora=LORA)
    return file


@pytest.fixture
def trained(tiny_llava_path, checkpoint) -> list[str]:
    return run_args(tiny_llava_path, checkpoint)


def read_card(folder: Path) -> tuple[dict, str]:
    """The card's front matter (parsed with PyYAML, not the writer's library) and its body."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Hub reads front matter only at the very start"
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def table(body: str, header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header row is ``header``."""
    lines = body.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def distinct_figures(report_path: Path) -> dict:
    """Give every figure of the report its own value, so a figure shown for another set, judge or metric shows."""
    report = json.loads(report_path.read_text())
    values = iter(range(1, 1000))
    for judge in report["judges"].values():
        judge["figures"] = {key: next(values) / 997 for key in judge["figures"]}
    report["utility"] = {s: {m: next(values) / 997 for m in metrics} for s, metrics in report["utility"].items()}
    report_path.write_text(json.dumps(report))
    return report


def generation_words(settings: dict) -> tuple[str, ...]:
    words = (f"at most {settings['max_new_tokens']} new tokens",)
    return words + ((f"temperature {settings['temperature']}",) if settings["do_sample"] else ("greedy",))


def test_the_card_gives_front_matter_recipe_and_the_evaluations_figures(trained, tmp_path, capsys):
    figstep, images = write_figstep(tmp_path / "figstep")
    benchmarks = [
        {"name": "demo", "modes": ["text", "benign", "shapes"], "limit": 2},
        {"name": "figstep", "path": str(figstep), "images": str(images), "protocol": "paper", "limit": 2},
    ]
    evaluation = tmp_path / "eval"
    evaluate_args = [f"--output={evaluation}", f"--eval.benchmarks={json.dumps(benchmarks)}"]
    evaluate_main([*trained, *evaluate_args, "--eval.judges=[xstest, gcg]", "--eval.generation.max_new_tokens=3"])
    report = distinct_figures(evaluation / "report.json")
    assert report["sets"]["figstep_image"]["protocol"]["name"] == "paper", "a set under a protocol is shown"

    out = tmp_path / "exported"
    args = [*trained, *RECIPE, f"--output={out}", f"--evaluation={evaluation}", "--base_model=llava-hf/llava-1.5-7b-hf"]
    capsys.readouterr()  # the evaluation's summary
    with pytest.raises(SystemExit):
        export_main([*args, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    export_main(args)
    meta, body = read_card(out)

    assert meta["base_model"] == "llava-hf/llava-1.5-7b-hf" and meta["license"] == "llama2"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"mllm-safety", "safety", "llava", "lora"} <= set(meta["tags"]), "llava: the exported config's model_type"

    data, rejection, lora = config["data"], config["data"]["rejection"], config["model"]["lora"]
    recipe = {line.split("**")[1]: line for line in body.splitlines() if line.startswith("- **")}
    assert f"ratio {data['rejection_ratio']} of" in recipe["Rejection swap"] and data["rejection_ratio"] == 0.17
    assert f'always "{rejection["sentence"]}"' in recipe["Rejection swap"] and rejection["sentence"] == "No, not that."
    assert "mixture: 50 of `llava`, 20 of `med`" in recipe["Data"]
    assert f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}," in recipe["LoRA"]
    assert lora["dropout"] == 0.25 and f"; {config['trainer']['max_epochs']} epoch(s);" in recipe["Optimisation"]
    assert f"`seed_everything` {config['seed_everything']}," in recipe["Seeds"] and config["seed_everything"] == 7

    assert f"`{evaluation}`" in body and "report.json" in body, "the card names the figures' source"
    shown = {(r[0], r[1], r[3]): r for r in table(body, "| set | figure | value | judge | protocol | generation |")}
    expected = {}
    for name, entry in report["sets"].items():
        if entry["utility"]:
            continue
        judges = [entry["protocol"]["judge"]] if entry["protocol"] else list(report["judges"])
        for judge in judges:
            for key, value in report["judges"][judge]["figures"].items():
                figure, _, rest = key.partition("/")
                if rest == name:
                    expected[(name, figure, judge)] = (
                        f"{value:+.3f}" if figure == "refusal_gap" else f"{100 * value:.1f}%"
                    )
    assert {key: row[2] for key, row in shown.items()} == expected
    assert ("figstep_image", "asr", "paper") in shown and ("figstep_image", "asr", "xstest") not in shown
    assert ("demo_benign", "refusal_gap", "gcg") in shown and ("demo_text", "asr", "xstest") in shown
    for (name, _, _), row in shown.items():
        protocol = report["sets"][name]["protocol"]
        assert row[4] == (protocol["name"] if protocol else "none")
        assert all(word in row[5] for word in generation_words(report["sets"][name]["generation"])), row
    assert "at most 512 new tokens" in shown[("figstep_image", "asr", "paper")][5], "the paper's protocol settings"

    utility = table(body, "| set | metric | value | scored by | protocol | generation |")
    figures = {(s, m): f"{100 * v:.1f}%" for s, metrics in report["utility"].items() for m, v in metrics.items()}
    assert {(r[0], r[1]): r[2] for r in utility} == figures and figures
    assert all("greedy, at most 3 new tokens" == r[5] for r in utility)


def test_a_card_without_evaluation_says_so_and_takes_the_base_folders_license(checkpoint, tiny_llava_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llava_path, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# A base model\n")
    args = [*run_args(str(base), checkpoint), f"--output={tmp_path / 'out'}"]
    export_main(args)
    meta, body = read_card(tmp_path / "out")
    assert "base_model" not in meta, "a local folder is no Hub id"
    assert f"Finetuned from the local folder `{base}` with" in body
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert "no safety or utility figure of this model is known" in body
    assert "| set | figure |" not in body


def test_a_report_of_another_checkpoint_or_no_report_is_refused_before_the_model_is_built(trained, tmp_path):
    other = tmp_path / "eval"
    other.mkdir()
    (other / "report.json").write_text(
        json.dumps({"checkpoint": str(tmp_path / "other.ckpt"), "sets": {}, "judges": {}})
    )
    with pytest.raises(ValueError, match=r"evaluated checkpoint .*other\.ckpt, not the exported .*trainable"):
        export_main([*trained, f"--output={tmp_path / 'out'}", f"--evaluation={other}"])
    with pytest.raises(FileNotFoundError, match="--evaluation .*nowhere: no report.json"):
        read_evaluation(str(tmp_path / "nowhere"), "x")
    (other / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not a report of mllm_safety.evaluate"):
        read_evaluation(str(other), "x")
    assert not (tmp_path / "out").exists()


def test_the_license_of_a_known_base_and_of_an_unknown_one(tmp_path):
    assert base_license("llava-hf/llava-1.5-13b-hf") == "llama2"
    assert base_license(str(tmp_path)) is None and base_license("someone/unknown-vlm") is None
