"""Host memory of each DDP rank while the model is built and trained one step.

Runs ``mllm_safety.fit`` on 2 processes (``--trainer.strategy ddp``; gloo on CPUs, NCCL on GPUs) with SmolLM2-135M
loaded from its checkpoint (float32, 513 MiB of LLM weights) beside the tests' tiny ViT, for one optimizer step, and
prints one JSON line per rank:

- ``imports_rss_mb``: the resident set size after the imports;
- ``built_rss_mb`` and ``llm_device``: the resident size right after the command line built the model (before the
  trainer moved anything) and where the LLM's weights were then;
- ``peak_rss_mb`` (``ru_maxrss``) and ``final_rss_mb``: over the whole run, and at its end, the latter split into
  ``final_anon_mb`` (allocated) and ``final_file_mb`` (mapped files).

On CPUs a rank's device is host memory, so every figure holds the model whatever the code does (``built_rss_mb``
stays low because safetensors are memory-mapped and read when first used). On GPUs (``--accelerator gpu``, one
device per rank) a rank that reads its weights straight onto its device reports ``llm_device`` ``cuda:N`` and no
model in its host figures. Compare two trees by running this file from each with ``PYTHONPATH`` set to it.

    python benchmarks/rank_memory.py [--accelerator cpu|gpu] [--devices 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path


def current_rss_mb(field: str = "VmRSS") -> float:
    """A resident size now, in MiB: ``VmRSS`` (all), ``RssAnon`` (memory the process allocated) or ``RssFile``
    (mapped files, such as memory-mapped safetensors, shared between processes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rank_figures(cli) -> dict:
    llm = [p for n, p in cli.model.model.named_parameters() if n.startswith("llm.") and not p.requires_grad]
    return {
        "rank": cli.trainer.global_rank,
        "llm_weights_mb": round(sum(p.numel() * p.element_size() for p in llm) / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_rss_mb": round(current_rss_mb(), 1),
        "final_anon_mb": round(current_rss_mb("RssAnon"), 1),
        "final_file_mb": round(current_rss_mb("RssFile"), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", default=None, help="Folder the ranks write their figures to (default: a temp dir).")
    args = parser.parse_args()
    out = Path(args.out or os.environ.get("RANK_MEMORY_OUT") or tempfile.mkdtemp(prefix="rank-memory-"))
    os.environ["RANK_MEMORY_OUT"] = str(out)  # the ranks Lightning relaunches see the same folder
    out.mkdir(parents=True, exist_ok=True)

    from mllm_safety import fit

    import_mb = current_rss_mb()
    built: dict = {}
    build_model = fit.SafetyCLI.instantiate_classes

    def measured_instantiate(self) -> None:
        build_model(self)
        llm = next(p for n, p in self.model.model.named_parameters() if n.startswith("llm."))
        built.update(built_rss_mb=round(current_rss_mb(), 1), llm_device=str(llm.device))

    fit.SafetyCLI.instantiate_classes = measured_instantiate
    cli = fit.main(
        [
            "--config",
            "configs/tiny.yaml",
            "--model.llm.random_init",
            "null",
            "--trainer.accelerator",
            args.accelerator,
            "--trainer.devices",
            str(args.devices),
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "1",
            "--trainer.callbacks",
            "[]",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(out / "run"),
        ]
    )
    figures = {"imports_rss_mb": round(import_mb, 1), **built, **rank_figures(cli)}
    (out / f"rank{figures['rank']}.json").write_text(json.dumps(figures))
    cli.trainer.strategy.barrier()
    if figures["rank"] == 0:
        for path in sorted(out.glob("rank*.json")):
            print(json.dumps(json.loads(path.read_text())))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
