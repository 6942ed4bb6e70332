"""Trains the tiny model on fixed global batches with 1 or N CPU processes; rank 0 writes what the tests compare.

Run by tests/test_parallel.py as ``python tests/distributed_fit.py --devices 2 --strategy fsdp2 --out DIR``; Lightning
relaunches the same command line for the other ranks. Every step's global batch is the same whatever the number of
processes and micro-batches (``--accumulate K`` cuts it into K micro-batches, and rank r takes samples r, r+N, ... of
each), so one process, N processes and gradient accumulation must agree.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from planted import planted_weights  # noqa: E402
from tiny_models import TINY_LLM  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mllm_safety.constants import cache_dir  # noqa: E402
from mllm_safety.data.shards import iter_conversations  # noqa: E402
from mllm_safety.data.synthetic import ensure_demo_shards  # noqa: E402
from mllm_safety.evaluation.callback import SafetyEvalCallback  # noqa: E402
from mllm_safety.evaluation.generation import GenerationSettings  # noqa: E402
from mllm_safety.evaluation.registry import BenchmarkSpec  # noqa: E402
from mllm_safety.model.hub_vlm import HubOptions  # noqa: E402
from mllm_safety.model.llm import LLMConfig  # noqa: E402
from mllm_safety.model.vision import VisionConfig  # noqa: E402
from mllm_safety.train.checkpoints import TrainableWeightsCheckpoint  # noqa: E402
from mllm_safety.train.module import LoraSettings, OptimSettings, SafetyAlignModule, TrainableParts  # noqa: E402
from mllm_safety.train.parallel import FSDP2Strategy  # noqa: E402

GLOBAL_BATCH = 4
BATCHES_PER_EPOCH = 2
PROMPTS = ["Describe the image.", "What is the capital of France?", "List three colours.", "Say hello."]


class FixedBatches(L.LightningDataModule):
    """``BATCHES_PER_EPOCH`` global batches of the demo data, each cut into ``accumulate`` micro-batches, split over
    the ranks sample by sample."""

    def __init__(self, accumulate: int) -> None:
        super().__init__()
        self.accumulate = accumulate

    def train_dataloader(self) -> DataLoader:
        processor = self.trainer.lightning_module.processor
        shards = ensure_demo_shards(cache_dir() / "data", 32, 0)
        conversations = list(iter_conversations(str(shards[0])))[: GLOBAL_BATCH * BATCHES_PER_EPOCH]
        samples = [processor(c) for c in conversations]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        micro = GLOBAL_BATCH // self.accumulate
        batches = [samples[i : i + micro][rank::world] for i in range(0, len(samples), micro)]
        return DataLoader(batches, batch_size=None, collate_fn=processor.collate)


class RecordSteps(L.Callback):
    """The logged loss of every optimizer step, and the gradients of the first one (whole tensors, on every rank)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_gradients: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: no optimizer step yet
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if len(self.losses) == 1:  # gradients stay until the next step's first micro-batch zeroes them
            for name, param in pl_module.named_parameters():
                if param.grad is not None:
                    grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                    self.first_gradients[name] = grad.detach().cpu().clone()


def generate_uneven(module: SafetyAlignModule, trainer: L.Trainer) -> list[torch.Tensor]:
    """Rank r replies to prompt r with an end token that stops rank 0 after one token and never stops rank 1, so the
    ranks generate different lengths (one process plays both ranks in turn). Returns every rank's new tokens."""
    processor = module.processor
    ranks = range(2) if trainer.world_size == 1 else [trainer.global_rank]
    outputs = []
    for rank in ranks:
        prompt = processor.collate([processor.prompt("p", PROMPTS[rank], None)], "left")
        inputs = (prompt.input_ids, prompt.attention_mask, prompt.pixel_values)
        free = module.model.generate(*inputs, max_new_tokens=5)[0]
        end = int(free[0]) if rank == 0 else min(set(range(len(free) + 1)) - set(free.tolist()))
        outputs.append(module.model.generate(*inputs, max_new_tokens=5, eos_token_id=end)[0])
    if trainer.world_size == 1:
        return outputs
    gathered: list[list[torch.Tensor] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, outputs)
    return [tokens for part in gathered for tokens in part]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--single_file", action="store_true", help="fsdp2 gathers checkpoints into one file")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--pretrained", default=None, help="A hub VLM folder instead of the tiny assembled model.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    # The CLI stores hyperparameters as plain dicts; built in Python they are these dataclasses.
    safe = [LLMConfig, VisionConfig, LoraSettings, OptimSettings, TrainableParts, HubOptions]
    torch.serialization.add_safe_globals(safe)
    L.seed_everything(0)
    if args.pretrained is None:  # the planted tiny model, whose replies and figures vary (tests/planted.py)
        planted = [str(planted_weights())]
        source = {
            "llm": LLMConfig(random_init=TINY_LLM),
            "vision": VisionConfig(name="tiny-vit"),
            "init_weights": planted,
        }
    else:
        source = {"pretrained": args.pretrained}
    module = SafetyAlignModule(
        **source,
        max_length=256,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        optim=OptimSettings(lr=1e-2, projector_lr=1e-2, warmup_ratio=0.0),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    record = RecordSteps()
    # 3 prompts per set over 2 ranks, one per call: rank 0 makes two calls, rank 1 one plus a discarded filler call
    evaluation = SafetyEvalCallback(
        benchmarks=[BenchmarkSpec("demo", modes=["text", "benign", "shapes"])],
        generation=GenerationSettings(max_new_tokens=4, batch_size=1),
        limit=3,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=FSDP2Strategy(save_distributed_checkpoint=False) if args.single_file else args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=args.out,
        callbacks=[
            record,
            evaluation,
            TrainableWeightsCheckpoint(),
            ModelCheckpoint(dirpath=args.out / "checkpoints", save_top_k=-1),
        ],
    )
    trainer.fit(module, FixedBatches(args.accumulate), ckpt_path=args.ckpt_path)

    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    full_state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    processor = module.processor
    prompts = processor.collate([processor.prompt(str(i), q, None) for i, q in enumerate(PROMPTS)], "left")
    replies = module.model.generate(prompts.input_ids, prompts.attention_mask, prompts.pixel_values, max_new_tokens=5)
    uneven = generate_uneven(module, trainer)
    if trainer.is_global_zero:
        torch.save(
            {
                "losses": record.losses,
                "first_gradients": record.first_gradients,
                "weights": {k: v for k, v in full_state.items() if k in trainable},
                "replies": replies,
                "uneven": uneven,
                "safety": evaluation.history,
                "world_size": trainer.world_size,
            },
            args.out / "result.pt",
        )


if __name__ == "__main__":
    main()
