"""The world driver: stages chained through their weights, finished stages reused, changed ones rerun, the table."""

import json
import re
import shutil
from datetime import date
from pathlib import Path

import pytest
import torch
from docs_check import entry_parser

from mllm_safety.data.rejection import PAPER_REJECTION
from mllm_safety.model.trainable import save_trainable
from mllm_safety.world.driver import main
from mllm_safety.world.report import COLUMNS

CONFIGS = Path(__file__).parents[1] / "configs" / "world"


class FakeLauncher:
    """Stands in for the subprocess: records each command and writes what a finished stage leaves behind."""

    def __init__(self, fail: str | None = None) -> None:
        self.commands: list[list[str]] = []
        self.fail = fail

    def __call__(self, command: list[str], folder: Path) -> int:
        self.commands.append(command)
        if self.fail and self.fail in str(folder):
            return 1
        # weights that differ per run, so a rerun stage changes the input of the stages after it
        save_trainable(
            folder / "trainable.safetensors", {"projector.weight": torch.full((2,), 1.0 * len(self.commands))}
        )
        ratio = next((float(a.split("=")[1]) for a in command if a.startswith("--data.rejection_ratio=")), 0.0)
        seed = next((int(a.split("=")[1]) for a in command if a.startswith("--seed_everything=")), 0)
        figures = {metric: 0.5 - ratio + 0.01 * seed for metric in COLUMNS.values()}
        evaluations = {"epoch 0": figures}
        if folder.name == "stage0":
            evaluations["before"] = {metric: 0.9 for metric in COLUMNS.values()}
        if "mllm_safety.fit" in command:
            (folder / "evaluations.json").write_text(json.dumps(evaluations))
        else:  # a separate evaluation (mllm_safety.evaluate): its report
            described = 0.7 if "description" in folder.name else 0.0
            report = {"judges": {"xstest": {"figures": {}}}, "utility": {"world_description": {"described": described}}}
            (folder / "report.json").write_text(json.dumps(report))
        return 0


@pytest.fixture(autouse=True)
def shipped(tmp_path, monkeypatch):
    """Stand-ins for the shipped tower and stage-2 weights."""
    tower, stage2 = tmp_path / "shipped-tower.safetensors", tmp_path / "shipped-stage2.safetensors"
    save_trainable(tower, {"vision.weight": torch.ones(2)})
    save_trainable(stage2, {"projector.weight": torch.zeros(2)})
    monkeypatch.setattr("mllm_safety.world.driver.SHIPPED_TOWER", tower)
    monkeypatch.setattr("mllm_safety.world.driver.SHIPPED_STAGE2", stage2)
    return tower, stage2


def fits(launcher):
    return [c for c in launcher.commands if "mllm_safety.fit" in c]


def stages_run(launcher):
    return [Path(c[c.index("--trainer.default_root_dir") + 1]).name for c in fits(launcher)]


def evaluated(launcher):
    """The separate evaluations run, as <stage folder>/<evaluation>."""
    outputs = [Path(c[c.index("--output") + 1]) for c in launcher.commands if "mllm_safety.evaluate" in c]
    return ["/".join(p.parts[-2:]) for p in outputs]


def init_of(command):
    return next(a for a in command if a.startswith("--model.init_weights="))


def test_stages_chain_through_their_weights_and_finished_ones_are_reused(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    args = ["--output", str(tmp_path / "world"), "--configs", str(configs), "--ratios", "0", "0.3", "--seeds", "0", "1"]
    launcher = FakeLauncher()
    rows = main(args, launch=launcher)
    assert stages_run(launcher) == ["stage0", "stage2_align", "stage2"] + ["r0_s0", "r0_s1", "r0.3_s0", "r0.3_s1"]
    assert evaluated(launcher) == ["stage0/description", "stage2/description"]
    launcher.commands = fits(launcher)
    out = tmp_path / "world"
    assert init_of(launcher.commands[1]) == f"--model.init_weights=[{out / 'stage0' / 'trainable.safetensors'}]"
    assert init_of(launcher.commands[3]) == f"--model.init_weights=[{out / 'stage2' / 'trainable.safetensors'}]"
    assert "--data.rejection_ratio=0.3" in launcher.commands[5] and "--seed_everything=0" in launcher.commands[5]
    # each seed draws its own samples of the stage-2 tasks, not only another order of the same ones
    assert "--data.world.seed=1" in launcher.commands[5] and "--data.world.seed=2" in launcher.commands[6]
    assert [row["condition"] for row in rows] == ["base model", "stage 0", "stage 2"] + ["stage 3, r=0"] * 2 + [
        "stage 3, r=0.3"
    ] * 2
    table = (out / "results.md").read_text()
    assert (
        "| stage 2 | 1 | 50.0 |" in table
        and "| stage 3, r=0.3 | 2 | 20.5 [20.0, 21.0] |" in table
        and (out / "world.png").stat().st_size > 0
    )
    assert "results.csv" in {p.name for p in out.iterdir()}
    # the table says how it was made: the command as typed, the machine, the day
    made = table.splitlines()[0]
    assert made.startswith(
        f"The table, `results.csv` and `world.png` were made by `python -m mllm_safety.world --output {out} "
    )
    assert "--ratios 0 0.3 --seeds 0 1` on " in made and "CPU cores" in made and date.today().isoformat() in made
    check = json.loads((out / "stage2" / "check.json").read_text())  # rebuilt stage 2 compared with the shipped
    assert check["same_names"] == 1.0 and check["max_abs"] == 3.0

    again = FakeLauncher()
    main(args, launch=again)
    assert again.commands == []  # everything reused

    # a changed stage-2 config reruns stage 2 and every stage-3 run after it, not stages 0 and 2a
    (configs / "stage2.yaml").write_text((configs / "stage2.yaml").read_text() + "\n# changed\n")
    changed = FakeLauncher()
    main(args, launch=changed)
    assert stages_run(changed) == ["stage2", "r0_s0", "r0_s1", "r0.3_s0", "r0.3_s1"]


def test_a_failed_stage_stops_the_build_and_names_its_log(tmp_path):
    launcher = FakeLauncher(fail="stage2_align")
    with pytest.raises(RuntimeError, match=r"stage2_align failed.*run.log"):
        main(["--output", str(tmp_path), "--configs", str(CONFIGS), "--ratios", "0", "--seeds", "0"], launch=launcher)
    assert stages_run(launcher) == ["stage0", "stage2_align"]
    assert not (tmp_path / "stage2_align" / "done.json").exists()


def test_from_shipped_runs_only_stage_3_from_the_shipped_weights(tmp_path, shipped):
    shipped = shipped[1]
    launcher = FakeLauncher()
    args = [
        "--output",
        str(tmp_path / "w"),
        "--configs",
        str(CONFIGS),
        "--from_shipped",
        "--ratios",
        "0.1",
        "--seeds",
        "0",
    ]
    main(args, launch=launcher)
    assert stages_run(launcher) == ["r0.1_s0"] and init_of(launcher.commands[0]) == f"--model.init_weights=[{shipped}]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratios", "1.5"], r"--ratios must be in \[0, 1\], got \[1.5\]"),
        (["--configs", "{tmp}/none"], r"--configs .*/none: no such folder"),
        (["--safebench", "{tmp}/safebench.csv"], r"--safebench .*/safebench.csv: no such file"),
    ],
)
def test_bad_arguments_are_refused_by_name(tmp_path, monkeypatch, capsys, args, message):
    """Each bad argument stops the driver with its own message before any stage starts, whatever the working
    directory (the default --configs is relative: from elsewhere it alone would stop every call)."""
    monkeypatch.chdir(tmp_path)
    launcher = FakeLauncher()
    argv = ["--output", str(tmp_path / "w"), "--configs", str(CONFIGS), *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as stopped:
        main(argv, launch=launcher)
    assert stopped.value.code == 2 and launcher.commands == []
    errors = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"python -m mllm_safety.world: error: {message}", errors[-1]), errors[-1]


def option(command, name):
    return next((a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")), None)


def test_the_comparison_runs_every_arm_at_equal_refusals_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "w"
    arms = ["curated", "curated_no_twins", "curated_fixed_reply", "curated_other_image"]
    common = ["--output", str(out), "--configs", str(CONFIGS), "--ratios", "0", "0.05", "--seeds", "0", "1"]
    common += ["--condition_ratios", "0.05", "--stage2_ratios", "0.01"]
    launcher = FakeLauncher()
    main([*common, "--conditions", "swap", *arms, "stage2_rejection"], launch=launcher)
    by_folder = {Path(c[c.index("--trainer.default_root_dir") + 1]).name: c for c in fits(launcher)}
    rejection = by_folder["r0.01"]  # stage 2 rebuilt from stage 2a with a share of its replies swapped
    assert init_of(rejection) == f"--model.init_weights=[{out / 'stage2_align' / 'trainable.safetensors'}]"
    assert option(rejection, "data.rejection_ratio") == "0.01" and "stage2.yaml" in " ".join(rejection)
    assert "r0.01/description" in evaluated(launcher)
    for arm in arms:
        for seed in (0, 1):
            command = by_folder[f"{arm}_r0.05_s{seed}"]
            # as many refusals as the swap at r=0.05 of stage 3's 480 samples, nothing swapped, the swap's seeds
            assert option(command, "data.world.curated") == "24" and option(command, "data.rejection_ratio") == "0"
            swap = by_folder[f"r0.05_s{seed}"]
            assert [a for a in command if "seed" in a] == [a for a in swap if "seed" in a]
            assert init_of(command) == init_of(swap)
    assert option(by_folder["curated_r0.05_s0"], "data.world.curated_twins") is None
    assert option(by_folder["curated_no_twins_r0.05_s0"], "data.world.curated_twins") == "false"
    assert option(by_folder["curated_fixed_reply_r0.05_s0"], "data.world.curated_reply") == (
        "I'm sorry, but I cannot assist with your request"  # unquoted: jsonargparse keeps quotes as written
    )
    assert option(by_folder["curated_other_image_r0.05_s0"], "data.world.curated_image") == "other"
    # fit's own parser reads each arm's command as meant (a quoted sentence would keep its quotes)
    parsed = entry_parser("mllm_safety.fit").parse_args(by_folder["curated_fixed_reply_r0.05_s0"][2:])
    assert parsed.data.world.curated_reply == PAPER_REJECTION and parsed.data.world.curated == 24
    assert parsed.data.rejection_ratio == 0 and parsed.data.world.curated_twins is True

    comparison = (out / "comparison.md").read_text()
    conditions = [line.split(" | ")[0].strip("| ") for line in comparison.splitlines() if line.startswith("| stage")]
    assert conditions == [
        "stage 0", "stage 2", "stage 2 + rejection, r=0.01", "stage 3 control, r=0", "stage 3 swap, r=0.05",
        *(f"stage 3 {arm}, r=0.05" for arm in arms),
    ]  # fmt: skip
    # stage 2's description comes from its separate evaluation; the figures differ per seed
    assert "| stage 2 | 1 | 50.0 |" in comparison and comparison.count("70.0") >= 2
    assert "| stage 3 curated, r=0.05 | 2 | 50.5 [50.0, 51.0] |" in comparison  # nothing swapped
    assert (out / "comparison.png").stat().st_size > 0 and (out / "comparison.csv").is_file()
    world = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| stage")]
    assert len(world) == 4 and not any("curated" in line or "+" in line for line in world)  # the swap's table

    # an interrupted grid: --tabulate runs nothing and tables only the runs finished with today's inputs
    (out / "stage3" / "curated_no_twins_r0.05_s1" / "done.json").unlink()
    (out / "stage2_rejection" / "r0.01" / "description" / "done.json").unlink()
    tabulated = FakeLauncher()
    main([*common, "--conditions", "swap", *arms, "stage2_rejection", "--tabulate"], launch=tabulated)
    assert tabulated.commands == []
    table = (out / "comparison.md").read_text()
    assert "| stage 3 curated_no_twins, r=0.05 | 1 | 50.0 |" in table and "| stage 3 curated, r=0.05 | 2 |" in table
    assert re.search(r"\| stage 2 \+ rejection, r=0.01 \| 1 \|.* 49.0 \|\n", table)  # description not current
    empty = FakeLauncher()
    main(["--output", str(tmp_path / "none"), "--configs", str(CONFIGS), "--tabulate"], launch=empty)
    assert empty.commands == [] and not (tmp_path / "none" / "results.md").exists()
    main([*common, "--conditions", "swap", *arms, "stage2_rejection"], launch=FakeLauncher())  # finish the grid

    subset = FakeLauncher()  # a subset of the conditions reuses every finished run
    main([*common, "--conditions", "curated", "curated_no_twins"], launch=subset)
    assert subset.commands == []
    assert "curated_fixed_reply" not in (out / "comparison.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--condition_ratios", "2"], r"--condition_ratios must be in \[0, 1\], got \[2.0\]"),
        (["--from_shipped", "--conditions", "stage2_rejection"], "stage2_rejection rebuilds stage 2 from stage 2a"),
        (["--conditions", "vlguard"], "argument --conditions: invalid choice: 'vlguard'"),
    ],
)
def test_bad_conditions_are_refused_by_name(tmp_path, capsys, args, message):
    launcher = FakeLauncher()
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--configs", str(CONFIGS), *args], launch=launcher)
    assert launcher.commands == [] and re.search(message, capsys.readouterr().err)
