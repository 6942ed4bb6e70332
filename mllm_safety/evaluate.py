"""``python -m mllm_safety.evaluate --config CONFIG [--ckpt_path CKPT] --output DIR``: a model's evaluation report.

CONFIG is the config the model was trained with: its ``model`` section rebuilds the model (frozen parts from their
sources), and the checkpoint adds the trained weights (LoRA, projector: all a checkpoint of ``mllm_safety.fit``
holds), from a Lightning checkpoint file, the sharded folder an FSDP2 run saves, or ``trainable.safetensors``; frozen
parts rebuilt from the config must match the checkpoint's fingerprints. The benchmarks and generation settings
default to those of the config's ``SafetyEvalCallback``, so the figures are comparable with the training run's.
Writes ``report.json`` (every figure, with the judges, protocols and generation settings), ``generations.jsonl``
(every prompt, reply and verdict) and ``summary.md`` into DIR.

CONFIG is read by the parser of ``mllm_safety.fit`` (a run's saved ``config.yaml`` works as is; ``--print_config``
shows the resolved one), and ``--ckpt_path last`` takes the newest checkpoint in the run's folder. Several devices
(``--trainer.devices 8 --trainer.precision bf16-true``, or a SLURM / torchrun launch) each generate for a slice of
the prompts with the whole model (the trainer's strategy is not used).

``python -m mllm_safety.evaluate --rescore DIR [--eval.judges ...]`` recomputes DIR's report and summary from its
``generations.jsonl`` with the judges and scorers configured now, without a model: compare judges on the same
replies.
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric import Fabric
from lightning.pytorch.cli import LightningArgumentParser

from mllm_safety.cli import RunCLI, rank_device
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.files import read_json
from mllm_safety.evaluation.generation import GenerationSettings, gather_generations, generate_for_rank
from mllm_safety.evaluation.judge import KEYWORD_JUDGES, ClassifierJudge, ClassifierSettings, KeywordJudge
from mllm_safety.evaluation.metrics import judge_and_reduce, score_utility
from mllm_safety.evaluation.registry import BenchmarkSpec, load_sets
from mllm_safety.evaluation.report import read_generations, write_report
from mllm_safety.evaluation.sets import EvalSet
from mllm_safety.train.checkpoints import load_checkpoint_weights
from mllm_safety.train.module import SafetyAlignModule

log = logging.getLogger(__name__)


@dataclass
class EvaluationSettings:
    """What to evaluate and how to judge it."""

    benchmarks: list[BenchmarkSpec] | None = None
    """Benchmarks, each ``{name, path, images, modes, limit}``; default: those of the config's SafetyEvalCallback,
    else the bundled demo set."""
    judges: list[str] = field(default_factory=lambda: list(KEYWORD_JUDGES))
    """Keyword refusal judges: ``paper``, ``xstest``, ``vlguard``, ``gcg`` (a protocol's judge is added when a
    benchmark runs under one)."""
    classifier: ClassifierSettings | None = None
    """A safety classifier judge (a local Llama Guard folder), in addition to the keyword judges."""
    limit: int | None = None
    """Use at most this many prompts per set (a benchmark's own ``limit`` wins)."""
    generation: GenerationSettings | None = None
    """How replies are generated; default: the fit config's SafetyEvalCallback settings (else the defaults), so
    the figures are comparable with the training run's. Given, it replaces them (unset fields: the defaults)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.judges if name not in KEYWORD_JUDGES]
        if unknown:
            raise ValueError(f"unknown judge(s) {unknown}; choose from {', '.join(KEYWORD_JUDGES)} (or set classifier)")
        if not self.judges and self.classifier is None:
            raise ValueError("no judge: list keyword judges or set a classifier")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


class EvaluateCLI(RunCLI):
    """``evaluate``: the fit config, ``--eval`` (what to evaluate, how to judge), ``--output`` and ``--rescore``; builds
    the model only, or nothing for a rescore."""

    ckpt_path_help = (
        "Trained weights of the run: a Lightning checkpoint file, the folder an FSDP2 run saves, "
        "trainable.safetensors, or 'last' (the newest checkpoint in the run's folder); none evaluates the model as "
        "configured."
    )

    def add_entry_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output", type=str | None, default=None, help="Folder for report.json, generations.jsonl and summary.md."
        )
        parser.add_argument(
            "--rescore",
            type=str | None,
            default=None,
            help="Recompute the report in this folder from its generations.jsonl with the judges and scorers "
            "configured now (no model; benchmarks and limit default to those recorded in its report.json).",
        )
        parser.add_class_arguments(EvaluationSettings, "eval", help="What to evaluate and how to judge it.")

    def before_instantiate_classes(self) -> None:
        """Check the command before the model is built (minutes for a 7B model)."""
        if self.config.rescore is None:
            if self.config.output is None:
                self.parser.error("--output is required (the folder for the report), unless --rescore names one")
            self.ckpt_path = self.resolve_ckpt_path(self.checkpoint_folders(), required=False)

    def instantiate_classes(self) -> None:
        """The devices first (``fabric``, one process per device), then the model on this rank's device."""
        if self.config.rescore is None:
            trainer = self.config.trainer
            self.fabric = Fabric(
                accelerator=trainer.accelerator,
                devices=trainer.devices,
                num_nodes=trainer.num_nodes,
                precision=trainer.precision,
            )
            self.fabric.launch()
            self.build_model(rank_device(self.fabric.strategy))

    def training_callback(self) -> SafetyEvalCallback | None:
        """The config's SafetyEvalCallback (built), whose benchmarks and generation settings are the defaults."""
        callbacks = (self._get(self.config_init, "trainer") or {}).get("callbacks") or []
        return next((c for c in callbacks if isinstance(c, SafetyEvalCallback)), None)


def keyword_judges(names: list[str], sets: list[EvalSet]) -> list[KeywordJudge]:
    """The configured keyword judges, plus those of the sets' protocols (a protocol's figures are its judge's)."""
    wanted = list(dict.fromkeys([*names, *(s.protocol.judge for s in sets if s.protocol is not None)]))
    return [KeywordJudge(name) for name in wanted]


def main(args: list[str] | None = None) -> dict[str, Any] | None:
    """Run the evaluation (or a rescore); returns the report's figures on rank 0 (None elsewhere)."""
    cli = EvaluateCLI(args)
    cfg = cli.config
    if cfg.rescore is not None:
        return rescore(cfg)
    ckpt_path = cli.ckpt_path
    fabric = cli.fabric
    settings: EvaluationSettings = cli.config_init.eval
    callback = cli.training_callback()
    specs = settings.benchmarks or (callback.benchmarks if callback else [BenchmarkSpec("demo")])
    generation = settings.generation or (callback.generation if callback else GenerationSettings())
    sets = load_sets(specs, settings.limit)

    module: SafetyAlignModule = cli.model
    if ckpt_path:
        loaded = load_checkpoint_weights(module, ckpt_path)
        log.info("loaded %d trained tensors from %s", len(loaded), ckpt_path)
    # Data parallel: every rank holds the whole model and generates for its own slice; nothing to wrap.
    module = fabric.strategy.precision.convert_module(module).to(fabric.device).eval()
    with fabric.autocast():
        generations = generate_for_rank(module, sets, fabric.global_rank, fabric.world_size, generation)
    del module
    cli.model = cli.config_init = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    judges: list[KeywordJudge | ClassifierJudge] = [*keyword_judges(settings.judges, sets)]
    if settings.classifier is not None:
        judges.append(ClassifierJudge(settings.classifier, fabric.device))
    result = judge_and_reduce(sets, generations, judges, fabric.device)
    generations = gather_generations(generations)
    utility = score_utility(sets, generations)
    if not fabric.is_global_zero:
        return None
    meta = {
        "model": cfg.model.as_dict(),
        "checkpoint": ckpt_path,
        "benchmarks": [asdict(spec) for spec in specs],
        "generation": generation.as_dict(),
        "settings": {"limit": settings.limit, "world_size": fabric.world_size},
    }
    measures = {j.name: j.measures for j in judges}
    per_set = {s.name: generation.for_set(s).as_dict() for s in sets}
    folder = write_report(cfg.output, sets, result, generations, measures, meta, utility, per_set)
    print((folder / "summary.md").read_text(encoding="utf-8"))
    return {**result.metrics, "utility": utility}


def rescore(cfg: Namespace) -> dict[str, Any]:
    """Recompute ``report.json`` and ``summary.md`` of ``cfg.rescore`` from its ``generations.jsonl``: the sets
    are rebuilt from the benchmarks (configured, else recorded in the old report) and judged and scored anew."""
    folder = Path(cfg.rescore)
    if not folder.is_dir():
        raise FileNotFoundError(f"rescore: {folder} is not a folder")
    old_path = folder / "report.json"
    old = read_json(old_path, "evaluation report") if old_path.is_file() else {}
    settings = _eval_settings(cfg)
    recorded = [BenchmarkSpec(**spec) for spec in old.get("benchmarks") or []]
    specs = settings.benchmarks or recorded or [BenchmarkSpec("demo")]
    limit = settings.limit if settings.limit is not None else (old.get("settings") or {}).get("limit")
    sets = load_sets(specs, limit)
    generations = read_generations(folder, sets)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    judges: list[KeywordJudge | ClassifierJudge] = [*keyword_judges(settings.judges, sets)]
    if settings.classifier is not None:
        judges.append(ClassifierJudge(settings.classifier, device))
    result = judge_and_reduce(sets, generations, judges)
    utility = score_utility(sets, generations)
    keep = ("model", "checkpoint", "generation", "settings")
    meta = {key: old[key] for key in keep if key in old}
    meta |= {"benchmarks": [asdict(spec) for spec in specs], "rescored": True}
    per_set = {name: entry.get("generation") for name, entry in (old.get("sets") or {}).items()}
    measures = {j.name: j.measures for j in judges}
    write_report(folder, sets, result, generations, measures, meta, utility, per_set)
    print((folder / "summary.md").read_text(encoding="utf-8"))
    return {**result.metrics, "utility": utility}


def _eval_settings(cfg: Namespace) -> EvaluationSettings:
    """The ``eval`` section as its dataclass, without building the model."""
    section = cfg.eval.as_dict()
    section["benchmarks"] = [BenchmarkSpec(**spec) for spec in section.get("benchmarks") or []] or None
    section["classifier"] = ClassifierSettings(**section["classifier"]) if section.get("classifier") else None
    section["generation"] = GenerationSettings(**section["generation"]) if section.get("generation") else None
    return EvaluationSettings(**section)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
