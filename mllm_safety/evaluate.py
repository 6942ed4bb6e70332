"""``python -m mllm_safety.evaluate --config CONFIG [--ckpt_path CKPT] --output DIR``: a model's evaluation report.

CONFIG is the config the model was trained with: its ``model`` section rebuilds the model (frozen parts from their
sources), and the checkpoint adds the trained weights (LoRA, projector: all a checkpoint of ``mllm_safety.fit``
holds), from a Lightning checkpoint file, the sharded folder an FSDP2 run saves, or ``trainable.safetensors``; frozen
parts rebuilt from the config must match the checkpoint's fingerprints. The benchmarks and generation settings
default to those of the config's ``SafetyEvalCallback``, so the figures are comparable with the training run's.
Writes ``report.json`` (every figure, with the judges, protocols and generation settings), ``generations.jsonl``
(every prompt, reply and verdict) and ``summary.md`` into DIR.

Several devices (``--runtime.devices 8``, or a SLURM / torchrun launch) each generate for a slice of the prompts.

``python -m mllm_safety.evaluate --rescore DIR [--eval.judges ...]`` recomputes DIR's report and summary from its
``generations.jsonl`` with the judges and scorers configured now, without a model: compare judges on the same
replies.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric import Fabric, seed_everything

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


@dataclass
class RuntimeSettings:
    """Where the evaluation runs; unset fields take the config's ``trainer`` values."""

    accelerator: str | None = None
    """``cpu``, ``gpu``, ``auto`` ... (default: trainer.accelerator, else auto)."""
    devices: int | None = None
    """Devices per node, each generating for its own slice of the prompts (default: trainer.devices, else 1)."""
    num_nodes: int | None = None
    """Nodes (default: trainer.num_nodes, else 1)."""
    precision: str | None = None
    """Lightning precision: ``32-true``, ``bf16-true``, ``bf16-mixed`` ... (default: trainer.precision)."""


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # --help shows each field's docstring
    parser = ArgumentParser(prog="python -m mllm_safety.evaluate", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="The fit config of the model to evaluate.")
    parser.add_class_arguments(SafetyAlignModule, "model", help="The model (the fit config's model section).")
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="Trained weights of mllm_safety.fit: a Lightning checkpoint file, the folder an FSDP2 run saves, or "
        "trainable.safetensors.",
    )
    parser.add_argument("--output", type=str | None, default=None, help="Folder for report.json, generations.jsonl ...")
    parser.add_argument(
        "--rescore",
        type=str | None,
        default=None,
        help="Recompute the report in this folder from its generations.jsonl with the judges and scorers configured "
        "now (no model; benchmarks and limit default to those recorded in its report.json).",
    )
    parser.add_class_arguments(EvaluationSettings, "eval", help="What to evaluate and how to judge it.")
    parser.add_class_arguments(RuntimeSettings, "runtime", help="Devices and precision.")
    # The rest of a fit config: read for defaults (trainer) or ignored (data).
    parser.add_argument("--trainer", type=dict[str, Any] | None, default=None, help="Fit config's trainer section.")
    parser.add_argument("--data", type=dict[str, Any] | None, default=None, help="Fit config's data (not used).")
    parser.add_argument(
        "--seed_everything", type=int | bool | None, default=0, help="Seed the model is built with (the fit's)."
    )
    return parser


def _callback_args(trainer: dict[str, Any] | None) -> dict[str, Any]:
    """The init_args of the SafetyEvalCallback in a fit config's trainer section ({} without one)."""
    callbacks = (trainer or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        callback = callback.as_dict() if isinstance(callback, Namespace) else callback  # parsed: a Namespace
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("SafetyEvalCallback"):
            return callback.get("init_args") or {}
    return {}


def callback_benchmarks(trainer: dict[str, Any] | None) -> list[BenchmarkSpec] | None:
    """The benchmarks of the SafetyEvalCallback in a fit config's trainer section, if it lists any."""
    specs = _callback_args(trainer).get("benchmarks")
    return [BenchmarkSpec(**spec) for spec in specs] if specs else None


def callback_generation(trainer: dict[str, Any] | None) -> GenerationSettings | None:
    """The generation settings of the SafetyEvalCallback in a fit config's trainer section, if it sets any."""
    settings = _callback_args(trainer).get("generation")
    return GenerationSettings(**settings) if settings else None


def keyword_judges(names: list[str], sets: list[EvalSet]) -> list[KeywordJudge]:
    """The configured keyword judges, plus those of the sets' protocols (a protocol's figures are its judge's)."""
    wanted = list(dict.fromkeys([*names, *(s.protocol.judge for s in sets if s.protocol is not None)]))
    return [KeywordJudge(name) for name in wanted]


def build(parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """The model and the evaluation settings, built like ``mllm_safety.fit`` builds the model: after seeding with
    the config's seed, so the parts a checkpoint does not hold (frozen and randomly initialised ones, such as the
    demo's vision tower) come out exactly as they were in training, and identical on every rank. The fit config's
    trainer and data sections stay plain data."""
    seed = cfg.seed_everything
    seed_everything(seed if isinstance(seed, int) and not isinstance(seed, bool) else 0, verbose=False)
    to_build = cfg.clone()
    to_build.trainer = to_build.data = None
    return parser.instantiate_classes(to_build)


def main(args: list[str] | None = None) -> dict[str, Any] | None:
    """Run the evaluation (or a rescore); returns the report's figures on rank 0 (None elsewhere)."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    if cfg.rescore is not None:
        return rescore(cfg)
    if cfg.output is None:
        parser.error("--output is required (the folder for the report), unless --rescore names one")
    trainer = cfg.trainer or {}
    runtime = cfg.runtime
    fabric = Fabric(
        accelerator=runtime.accelerator or trainer.get("accelerator", "auto"),
        devices=runtime.devices or trainer.get("devices", 1),
        num_nodes=runtime.num_nodes or trainer.get("num_nodes", 1),
        precision=runtime.precision or trainer.get("precision", "32-true"),
    )
    fabric.launch()
    init = build(parser, cfg)
    settings: EvaluationSettings = init.eval
    specs = settings.benchmarks or callback_benchmarks(cfg.trainer) or [BenchmarkSpec("demo")]
    generation = settings.generation or callback_generation(cfg.trainer) or GenerationSettings()
    sets = load_sets(specs, settings.limit)

    module: SafetyAlignModule = init.model
    if cfg.ckpt_path:
        loaded = load_checkpoint_weights(module, cfg.ckpt_path)
        log.info("loaded %d trained tensors from %s", len(loaded), cfg.ckpt_path)
    # Data parallel: every rank holds the whole model and generates for its own slice; nothing to wrap.
    module = fabric.strategy.precision.convert_module(module).to(fabric.device).eval()
    with fabric.autocast():
        generations = generate_for_rank(module, sets, fabric.global_rank, fabric.world_size, generation)
    del module, init
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
        "checkpoint": cfg.ckpt_path,
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
    old = json.loads(old_path.read_text(encoding="utf-8")) if old_path.is_file() else {}
    settings = _eval_settings(cfg)
    recorded = [BenchmarkSpec(**spec) for spec in old.get("benchmarks") or []]
    specs = settings.benchmarks or recorded or callback_benchmarks(cfg.trainer) or [BenchmarkSpec("demo")]
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
