"""The Dockerfile cannot be built here (no engine); check what can go stale without a build."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_dockerfile_copies_existing_paths_and_runs_the_cli():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and all((ROOT / src).exists() for src in sources), sources
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entrypoint == ["python", "-m", "mllm_safety.fit"]
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+$", text, re.M)
