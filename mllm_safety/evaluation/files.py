"""Reading benchmark files from their published layouts: a missing file or another layout is an error naming it."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def existing(path: str | Path, what: str, folder: bool = False) -> Path:
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise FileNotFoundError(f"{what}: {path} does not exist{' or is not a folder' if folder else ''}")
    return path


def read_csv(path: str | Path, what: str, columns: Sequence[str]) -> list[dict[str, str]]:
    path = existing(path, what)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(
                f"{path}: not a {what} file: missing column(s) {', '.join(missing)} "
                f"(expected {', '.join(columns)}; found {', '.join(found) or 'no header'})"
            )
        return list(reader)


def read_json(path: str | Path, what: str) -> Any:
    path = existing(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def set_name(benchmark: str, mode: str) -> str:
    """The name of a benchmark's set in figures and reports: ``<benchmark>_<mode>``."""
    return f"{benchmark}_{mode}"
