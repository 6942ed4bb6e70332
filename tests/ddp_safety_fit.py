"""``python tests/ddp_safety_fit.py OUT DEVICES``: a few training steps of the tiny model under Lightning (DDP when
DEVICES is 2) with the safety callback; rank 0 writes the callback's history to OUT."""

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from planted import planted_module
from torch.utils.data import DataLoader

from mllm_safety.data.conversation import parse_llava_record
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.generation import GenerationSettings
from mllm_safety.evaluation.registry import BenchmarkSpec

SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=4, do_sample=True, temperature=1.3, seed=1)
"""Sampled: the DDP test then also shows sampling seeded per prompt gives the same replies on 2 ranks as on 1. At
temperature 1.3 the planted model's replies, and so its figures, depend on each prompt's noise."""


def fit_tiny(out: Path, devices: int, callback: SafetyEvalCallback, accumulate: int = 1) -> L.Trainer:
    """Train the tiny model on 8 one-turn samples (batches of 2), up to 4 optimizer steps, with ``callback``."""
    module = planted_module()
    module.train()
    records = [
        {"id": f"s{i}", "conversations": [{"from": "human", "value": f"Count to {i}."}, {"from": "gpt", "value": "1"}]}
        for i in range(8)
    ]
    samples = [module.processor(parse_llava_record(record, None)) for record in records]
    loader = DataLoader(samples, batch_size=2, collate_fn=module.processor.collate)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=4 // accumulate,
        accumulate_grad_batches=accumulate,
        logger=CSVLogger(str(out)),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader)
    return trainer


def main(out: Path, devices: int) -> None:
    # the same callback settings as tests/test_callback.py's single-process run
    callback = SafetyEvalCallback([BenchmarkSpec("demo", limit=5)], generation=SETTINGS, log_table=False)
    if fit_tiny(out, devices, callback).is_global_zero:
        (out / "history.json").write_text(json.dumps(callback.history))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
