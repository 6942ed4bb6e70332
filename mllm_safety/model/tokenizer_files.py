"""Why a checkpoint folder's tokenizer cannot be read, in terms of its files.

transformers reports a folder without a usable tokenizer by the last reader it tried (``tiktoken is required`` for
a folder holding only a sentencepiece ``tokenizer.model``), which sends a user after the wrong package or file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A fast tokenizer, a sentencepiece model, a BPE vocabulary (with ``merges.txt``): one of them is needed."""


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def missing_tokenizer_files(path: str | Path) -> str | None:
    """What a local checkpoint folder lacks to build its tokenizer, naming the files; ``None`` when the files are
    there (or ``path`` is a hub name, whose files are not known here)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    present = {name for name in TOKENIZER_FILES if (folder / name).is_file()}
    if not present:
        return (
            f"{str(path)!r} holds no tokenizer files: none of {', '.join(TOKENIZER_FILES)} (with merges.txt). Copy "
            "them from the checkpoint the model was made from"
        )
    if present == {"tokenizer.model"} and not _importable("sentencepiece"):
        return (
            f"{str(path)!r} holds its tokenizer only as tokenizer.model, a sentencepiece model (no tokenizer.json), "
            "and the sentencepiece package is not installed: pip install sentencepiece"
        )
    if present == {"vocab.json"} and not (folder / "merges.txt").is_file():
        return f"{str(path)!r} holds vocab.json without merges.txt, and no tokenizer.json: the BPE merges are missing"
    return None
