"""The grid file: named experiments (fit config files applied over a base config), how each is evaluated, and the
columns of the comparison table. ``configs/paper/grid.yaml`` is the paper's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ArgumentParser


@dataclass
class Experiment:
    """One row of the comparison: a fit of the base config with ``configs`` applied over it, then its evaluation."""

    description: str
    """What the row tests, shown in the table."""
    configs: list[str] = field(default_factory=list)
    """Fit config files applied, in order, over the command's ``--config`` files (relative paths: to the grid
    file's folder). Each holds only what the experiment changes (usually ``data``)."""
    train: bool = True
    """``false``: evaluate the base model as configured, without training (the "no finetuning" row)."""


@dataclass
class Column:
    """One figure of the table, read from the experiment's ``report.json``."""

    label: str
    """Column title, e.g. ``FigStep ASR``."""
    figure: str
    """``<figure>/<set>`` of a judge (``asr/figstep_image``, ``over_refusal/xstest_safe``), or
    ``utility/<set>/<metric>`` (``utility/scienceqa_test/img_accuracy``)."""
    judge: str
    """The judge whose figure it is (``paper``, ``xstest`` ...); for a utility figure, the scorer's name as the
    table shows it (utility figures have one scorer)."""


@dataclass
class Grid:
    """A named list of experiments and the table that compares them."""

    experiments: dict[str, Experiment]
    """Experiments by name (the name is the run's folder and the table's row)."""
    columns: list[Column]
    """The table's figures, in order."""
    evaluation: list[str] = field(default_factory=list)
    """Config files for ``mllm_safety.evaluate`` (its ``eval`` section: benchmarks, judges, generation) applied over
    each experiment's fit config (relative paths: to the grid file's folder). None: the benchmarks of the fit
    config's SafetyEvalCallback."""

    def __post_init__(self) -> None:
        if not self.experiments:
            raise ValueError("grid.experiments is empty: name at least one experiment")
        if not self.columns:
            raise ValueError("grid.columns is empty: name at least one figure")
        if bad := [name for name in self.experiments if not name or "/" in name or "," in name or name.strip() != name]:
            raise ValueError(f"experiment names {bad} cannot be folder names (no '/', ',' or surrounding spaces)")
        if bad := [c.figure for c in self.columns if c.figure.startswith("utility/") and c.figure.count("/") != 2]:
            raise ValueError(f"utility columns {bad} must read utility/<set>/<metric>")

    def select(self, names: str | None) -> list[str]:
        """The experiments named in a comma-separated list (``None``: all, in the grid's order)."""
        if names is None:
            return list(self.experiments)
        chosen = [name.strip() for name in names.split(",") if name.strip()]
        if unknown := [name for name in chosen if name not in self.experiments]:
            raise ValueError(f"--experiments names {unknown}, which the grid lacks; it has {list(self.experiments)}")
        if not chosen:
            raise ValueError("--experiments names no experiment")
        return list(dict.fromkeys(chosen))


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; config paths in it become paths relative to the working directory's view of the
    grid's folder, so the grid works from any directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--grid {path} does not exist")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--grid", type=Grid)
    try:
        grid: Grid = parser.instantiate(parser.parse_args(["--grid", str(path)])).grid
    except Exception as error:  # jsonargparse names the bad key; say which file it is in
        raise ValueError(f"--grid {path}: {error}") from error
    folder = path.parent
    grid.evaluation = [_beside(folder, p, f"{path}: evaluation") for p in grid.evaluation]
    for name, experiment in grid.experiments.items():
        experiment.configs = [_beside(folder, p, f"{path}: experiment {name}") for p in experiment.configs]
    return grid


def _beside(folder: Path, relative: str, where: str) -> str:
    resolved = folder / relative
    if not resolved.is_file():
        raise FileNotFoundError(f"{where} names {relative}, which is not a file (looked for {resolved})")
    return str(resolved)
