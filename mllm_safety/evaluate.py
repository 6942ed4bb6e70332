"""``python -m mllm_safety.evaluate --config CONFIG [--ckpt_path CKPT] --output DIR``: a model's safety report.

CONFIG is the config the model was trained with: its ``model`` section rebuilds the model (frozen parts from their
sources), and the checkpoint adds the trained weights (LoRA, projector: all a checkpoint of ``mllm_safety.fit``
holds), from a Lightning checkpoint file, the sharded folder an FSDP2 run saves, or ``trainable.safetensors``; frozen
parts rebuilt from the config must match the checkpoint's fingerprints. The benchmarks default to those of the
config's ``SafetyEvalCallback``. Writes ``report.json`` (every figure), ``generations.jsonl`` (every prompt, reply and
verdict) and ``summary.md`` into DIR.

Several devices (``--runtime.devices 8``, or a SLURM / torchrun launch) each generate for a slice of the prompts.
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric import Fabric, seed_everything

from mllm_safety.evaluation.generation import gather_generations, generate_for_rank
from mllm_safety.evaluation.judge import KEYWORD_JUDGES, ClassifierJudge, ClassifierSettings, KeywordJudge
from mllm_safety.evaluation.metrics import all_prompts, judge_and_reduce, score_utility
from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.report import write_report
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
    """Keyword refusal judges: ``xstest``, ``vlguard``, ``gcg``."""
    classifier: ClassifierSettings | None = None
    """A safety classifier judge (a local Llama Guard folder), in addition to the keyword judges."""
    limit: int | None = None
    """Use at most this many prompts per set (a benchmark's own ``limit`` wins)."""
    batch_size: int = 16
    """Prompts generated together per device."""
    max_new_tokens: int = 256
    """Tokens generated per reply (VLGuard's evaluation uses 256; refusals show in the first few dozen)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.judges if name not in KEYWORD_JUDGES]
        if unknown:
            raise ValueError(f"unknown judge(s) {unknown}; choose from {', '.join(KEYWORD_JUDGES)} (or set classifier)")
        if not self.judges and self.classifier is None:
            raise ValueError("no judge: list keyword judges or set a classifier")
        if self.batch_size < 1 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("batch_size, max_new_tokens and limit must be >= 1")


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
    parser.add_argument("--output", type=str, required=True, help="Folder for report.json, generations.jsonl, ...")
    parser.add_class_arguments(EvaluationSettings, "eval", help="What to evaluate and how to judge it.")
    parser.add_class_arguments(RuntimeSettings, "runtime", help="Devices and precision.")
    # The rest of a fit config: read for defaults (trainer) or ignored (data).
    parser.add_argument("--trainer", type=dict[str, Any] | None, default=None, help="Fit config's trainer section.")
    parser.add_argument("--data", type=dict[str, Any] | None, default=None, help="Fit config's data (not used).")
    parser.add_argument(
        "--seed_everything", type=int | bool | None, default=0, help="Seed the model is built with (the fit's)."
    )
    return parser


def callback_benchmarks(trainer: dict[str, Any] | None) -> list[BenchmarkSpec] | None:
    """The benchmarks of the SafetyEvalCallback in a fit config's trainer section, if it lists any."""
    callbacks = (trainer or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("SafetyEvalCallback"):
            specs = (callback.get("init_args") or {}).get("benchmarks")
            if specs:
                return [BenchmarkSpec(**spec) for spec in specs]
    return None


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
    """Run the evaluation; returns the report's figures on rank 0 (None elsewhere)."""
    parser = build_parser()
    cfg = parser.parse_args(args)
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
    sets = [s for spec in specs for s in load_benchmark(spec, settings.limit)]

    module: SafetyAlignModule = init.model
    if cfg.ckpt_path:
        loaded = load_checkpoint_weights(module, cfg.ckpt_path)
        log.info("loaded %d trained tensors from %s", len(loaded), cfg.ckpt_path)
    # Data parallel: every rank holds the whole model and generates for its own slice; nothing to wrap.
    module = fabric.strategy.precision.convert_module(module).to(fabric.device).eval()
    with fabric.autocast():
        generations = generate_for_rank(
            module,
            all_prompts(sets),
            fabric.global_rank,
            fabric.world_size,
            settings.batch_size,
            settings.max_new_tokens,
        )
    del module, init
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    judges: list[KeywordJudge | ClassifierJudge] = [KeywordJudge(name) for name in settings.judges]
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
        "settings": {
            "batch_size": settings.batch_size,
            "max_new_tokens": settings.max_new_tokens,
            "limit": settings.limit,
            "world_size": fabric.world_size,
        },
    }
    measures = {j.name: j.measures for j in judges}
    folder = write_report(cfg.output, sets, result, generations, measures, meta, utility)
    print((folder / "summary.md").read_text(encoding="utf-8"))
    return {**result.metrics, "utility": utility}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
