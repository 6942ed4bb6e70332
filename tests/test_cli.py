"""One command line: every entry point reads --config through fit's parser, prints it, and spells options alike."""

from pathlib import Path

import pytest
import yaml

from mllm_safety import evaluate, export, fit, sweep
from mllm_safety.data import convert

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
ENTRY_POINTS = {"fit": fit.main, "evaluate": evaluate.main, "export": export.main, "sweep": sweep.main}


def printed_config(main, args, capsys) -> dict:
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_run_entry_point_reads_the_fit_config_with_fits_parser(name, capsys):
    printed = printed_config(ENTRY_POINTS[name], ["--config", CONFIG, "--trainer.devices=3"], capsys)
    assert printed["model"]["llm"]["name"] == "smollm2-135m-instruct" and printed["data"]["rejection_ratio"] == 0.3
    assert printed["trainer"]["devices"] in (3, "3"), "fit's options, in fit's spelling"
    assert printed["seed_everything"] == 0
    assert "ckpt_path" in printed
    if name != "fit":
        assert "output" in printed, "the folder an entry point writes is --output everywhere"
    with pytest.raises(SystemExit):
        ENTRY_POINTS[name](["--config", CONFIG, "--data.rejection_ratioo=0.1"])
    assert "rejection_ratioo" in capsys.readouterr().err, "a wrong key is named"


def test_convert_has_the_same_config_print_config_and_output(tmp_path, capsys):
    options = tmp_path / "convert.yaml"
    options.write_text(yaml.safe_dump({"json": "data.json", "output": "shards", "shard_size": 7}))
    printed = printed_config(convert.main, ["--config", str(options)], capsys)
    assert printed["output"] == "shards" and printed["shard_size"] == 7


def test_export_and_evaluate_check_the_command_before_building_the_model(tmp_path, capsys, monkeypatch):
    def build_model(self):
        raise AssertionError("the model was built before the command was checked")

    monkeypatch.setattr(export.ExportCLI, "build_model", build_model)
    monkeypatch.setattr(evaluate.EvaluateCLI, "build_model", build_model)
    with pytest.raises(SystemExit):
        export.main(["--config", CONFIG, "--model.projector=linear", "--ckpt_path", "last", "--output", str(tmp_path)])
    assert "llava-hf folder, whose projector is mlp2x_gelu; this run's is 'linear'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["--config", CONFIG, "--model.llava.path", str(tmp_path), "--ckpt_path", "last"])
    assert "--output is required" in capsys.readouterr().err
    llava = ["--config", CONFIG, "--model.llava.path", str(tmp_path), "--output", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*typo.ckpt does not exist"):
        export.main([*llava, "--ckpt_path", str(tmp_path / "typo.ckpt")])
    with pytest.raises(ValueError, match="newest checkpoint in the run's own folder"):
        export.main([*llava, "--ckpt_path", "last"])  # tiny.yaml has no run folder
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export.main([*llava, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(["--config", CONFIG])
    assert "--output is required" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="typo.ckpt does not exist"):
        evaluate.main(["--config", CONFIG, "--output", str(tmp_path), "--ckpt_path", str(tmp_path / "typo.ckpt")])
