"""The layers import downwards only: a data change never has to know the model, evaluation never the trainer."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mllm_safety"

WORLD_RUNS = ("mllm_safety.world.driver", "mllm_safety.world.report", "mllm_safety.world.tower")
"""The world's modules that train and evaluate; its data modules (bank, typography, samples) sit beside ``data``."""
FORBIDDEN = {
    "constants": ("mllm_safety.",),
    "data": ("mllm_safety.model", "mllm_safety.train", "mllm_safety.evaluation", *WORLD_RUNS),
    "evaluation": ("mllm_safety.model", "mllm_safety.train", *WORLD_RUNS),
    "model": ("mllm_safety.train", "mllm_safety.evaluation", "mllm_safety.world"),
    "world/bank.py": ("mllm_safety.model", "mllm_safety.train", "mllm_safety.evaluation", *WORLD_RUNS),
    "world/typography.py": ("mllm_safety.",),
    "world/samples.py": ("mllm_safety.model", "mllm_safety.train", "mllm_safety.evaluation", *WORLD_RUNS),
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
    if layer == "constants" or layer.endswith(".py"):
        files = [PACKAGE / (f"{layer}.py" if layer == "constants" else layer)]
    else:
        files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN[layer])
    ]
    assert not offending, offending


LIGHTNING_OBJECTS = ("trainer", "fit_loop", "strategy", "lightning_module", "epoch_loop", "checkpoint_connector")


def private_lightning_uses(path: Path) -> list[str]:
    """Private names imported from Lightning, and private attributes read off Lightning's objects."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("lightning", "pytorch_lightning")):
            uses += [f"imports {alias.name}" for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if any(name in owner.split(".")[-1] for name in LIGHTNING_OBJECTS):
                uses.append(f"reads {owner}.{node.attr}")
    return uses


def test_private_lightning_attributes_are_used_in_the_compatibility_module_only():
    compat = PACKAGE / "train" / "lightning_compat.py"
    offending = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != compat and (uses := private_lightning_uses(path))
    }
    assert not offending, offending
    assert private_lightning_uses(compat), "the compatibility module is where they are"


def test_the_compatibility_module_refuses_lightning_versions_it_was_not_checked_for(monkeypatch):
    import importlib

    import lightning

    from mllm_safety.train import lightning_compat

    monkeypatch.setattr(lightning, "__version__", "2.99.0")
    with pytest.raises(ImportError, match="checked for lightning>=2.4,<2.7.*lightning 2.99.0 is installed"):
        importlib.reload(lightning_compat)
    monkeypatch.undo()
    importlib.reload(lightning_compat)
