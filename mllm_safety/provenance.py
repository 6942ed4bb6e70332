"""How a figure was made, written on it and beside it: the command, the machine and the date.

A plot copied into the docs outlives the code that drew it; its caption says which command drew it, on what, and
when, so a stale one can be told from a fresh one and remade.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line as a user types it: ``python -m MODULE ARGS`` (``argv``: this process's by default)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
    """The hardware that computed the figures: the GPUs when torch sees any, else the CPU cores."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"{count} x {torch.cuda.get_device_name(0)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({platform.machine()}), no GPU"


def caption(module: str, argv: list[str] | None = None, date: datetime.date | None = None) -> str:
    """``made by `python -m ...` on MACHINE, DATE``: one line for a figure's subtitle and its Markdown caption."""
    day = (date or datetime.date.today()).isoformat()
    return f"made by `{command(module, argv)}` on {machine()}, {day}"
