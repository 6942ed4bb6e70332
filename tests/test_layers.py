"""The layers import downwards only: a data change never has to know the model, evaluation never the trainer."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mllm_safety"

FORBIDDEN = {
    "constants": ("mllm_safety.",),
    "data": ("mllm_safety.model", "mllm_safety.train", "mllm_safety.evaluation"),
    "evaluation": ("mllm_safety.model", "mllm_safety.train"),
    "model": ("mllm_safety.train", "mllm_safety.evaluation"),
}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_lower_layers(layer):
    files = [PACKAGE / "constants.py"] if layer == "constants" else sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert not offending, offending
