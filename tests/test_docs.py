"""Docs that cannot drift: every documented ``python -m mllm_safety...`` command parses with its entry point's own
parser and names existing repository paths, and every relative link resolves (the rules: tests/docs_check.py)."""

from pathlib import Path

import pytest
from docs_check import ROOT, check_commands, check_links, doc_files, slug

ENTRY_POINTS = {
    "mllm_safety.fit",
    "mllm_safety.evaluate",
    "mllm_safety.export",
    "mllm_safety.sweep",
    "mllm_safety.data.convert",
    "mllm_safety.experiments",
}
"""Entry points the docs show in a fenced command today: one missing means the checker stopped seeing them."""


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses_and_names_existing_paths(doc):
    _, problems = check_commands(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_docs_show_every_entry_point_in_a_checked_command():
    checked = {module for doc in doc_files() for module in check_commands(doc.read_text(encoding="utf-8"))[0]}
    assert ENTRY_POINTS <= checked, f"no checked command of {sorted(ENTRY_POINTS - checked)}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    problems = check_links(doc.read_text(encoding="utf-8"), doc)
    assert not problems, "\n".join(problems)


BROKEN = """# Broken

```bash
.venv/bin/python -m mllm_safety.fit --config configs/demo.yaml \\
    --data.rejection_ratioo 0.3   # renamed option
srun python -m mllm_safety.evaluate --config configs/missing.yaml --output DIR
python -m mllm_safety.export --config RUN_CONFIG --ckpt_path CKPT --output DIR --model.lora.rr 8
python -m mllm_safety.sweep --config CONFIG --sweep.ratios '[0, 0.1]' --trainer.max_epochs two
python -m mllm_safety.data.convert --json x.json --output /data/shards --image_rooot /data
python -m mllm_safety.world --output runs/world --rebuild_towr
bash scripts/setupp.sh && python -m mllm_safety.fit --config configs/demo.yaml --print_config  # scripts/nothing.py
```

```
python -m mllm_safety.fitt --help
```
"""


def test_the_checker_names_each_renamed_option_missing_path_and_bad_value():
    checked, problems = check_commands(BROKEN, "broken.md")
    assert checked == [
        *["mllm_safety.fit", "mllm_safety.evaluate", "mllm_safety.export", "mllm_safety.sweep"],
        *["mllm_safety.data.convert", "mllm_safety.world", "mllm_safety.fit", "mllm_safety.fitt"],
    ]
    expected = [
        ("broken.md:4:", "mllm_safety.fit", "--data.rejection_ratioo"),  # the line a continued command starts on
        ("broken.md:6:", "configs/missing.yaml does not exist"),
        ("broken.md:6:", "mllm_safety.evaluate", "configs/missing.yaml"),  # the parser cannot read it either
        ("broken.md:7:", "mllm_safety.export", "rr"),  # a dotted key inside model.lora
        ("broken.md:8:", "mllm_safety.sweep", "trainer.max_epochs"),  # a value of the wrong type
        ("broken.md:9:", "mllm_safety.data.convert", "--image_rooot"),
        ("broken.md:10:", "mllm_safety.world", "every fit run", "--rebuild_towr"),  # checked by fit's parser
        ("broken.md:11:", "scripts/setupp.sh does not exist"),
        ("broken.md:11:", "scripts/nothing.py does not exist"),  # in a comment
        ("broken.md:15:", "no module mllm_safety.fitt"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, parts in zip(problems, expected):
        assert problem.startswith(parts[0]) and all(part in problem for part in parts[1:]), (problem, parts)


def test_placeholders_are_not_paths_but_their_options_are_checked():
    command = "python -m mllm_safety.export --config RUN_CONFIG --ckpt_path <ckpt> --output $OUT --dtypee auto"
    text = f"```bash\n{command}\n```"
    _, problems = check_commands(text)
    assert len(problems) == 1 and "--dtypee" in problems[0], problems
    fine = "```bash\npython -m mllm_safety.export --config RUN_CONFIG --ckpt_path /path/to/ckpt --output DIR\n```"
    assert check_commands(fine) == (["mllm_safety.export"], [])


def test_the_checker_names_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.md").write_text("# Data\n\n## The rejection swap\n\n```\n# Not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n## Same\n\n## Same\n\n"
        "[ok](docs/data.md#the-rejection-swap) [ok](#same-1) [web](https://example.org/x#y) `[code](nope.md)`\n"
        "[gone](docs/gone.md) [anchor](docs/data.md#the-swap) [fenced](docs/data.md#not-a-heading) [dup](#same-2)\n"
        '![plot](plots/missing.png) <img src="docs/data.md"> <img src="docs/img.png">\n\n[ref]: docs/gone2.md\n'
    )
    problems = check_links(readme.read_text(), readme)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/gone.md: docs/gone.md does not exist",
        "docs/data.md#the-swap: no heading #the-swap in data.md",
        "docs/data.md#not-a-heading: no heading #not-a-heading in data.md",
        "#same-2: no heading #same-2 in README.md",
        "plots/missing.png: plots/missing.png does not exist",
        "docs/img.png: docs/img.png does not exist",
        "docs/gone2.md: docs/gone2.md does not exist",
    ], problems


def test_slugs_follow_githubs_rule():
    assert slug("The world: every step of the paper's claim on a laptop, with its controls") == (
        "the-world-every-step-of-the-papers-claim-on-a-laptop-with-its-controls"
    )
    assert slug("Hub VLMs: LLaVA-NeXT, `Yi-VL`, [Qwen2.5-VL](https://x)") == "hub-vlms-llava-next-yi-vl-qwen25-vl"
    assert slug("Data_at scale") == "data_at-scale"


def test_doc_files_are_the_readme_and_every_page_under_docs():
    docs = doc_files()
    assert docs[0] == ROOT / "README.md"
    assert {p for p in docs[1:]} == set((ROOT / "docs").rglob("*.md")) and all(p.exists() for p in docs)
    assert all(Path(p).suffix == ".md" for p in docs)
