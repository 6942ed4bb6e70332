"""Training throughput of a LLaVA-1.5- or Qwen2.5-VL-shaped model with LoRA under FSDP2 in bf16: tokens/s, step
time and MFU.

    python benchmarks/gpu_throughput.py                      # LLaVA-1.5-7B shape on every GPU of this machine
    python benchmarks/gpu_throughput.py --model 13b --devices 8 --batch_size 4 --activation_checkpointing
    python benchmarks/gpu_throughput.py --model qwen25-vl-7b  # Qwen2.5-VL-7B through its transformers class

The model is built from its shape alone, with random weights, directly on the GPU (no download): CLIP ViT-L/14-336
(patch tokens of the second-to-last block), the mlp2x_gelu projector and a Vicuna-shaped Llama decoder (SmolLM2's
tokenizer, so the vocabulary is 49152 rather than 32000), LoRA r=128 on every linear layer of the LLM as in the paper.
Batches are synthetic LLaVA samples: 576 image positions, prompt text, and a reply that carries the loss. Training
goes through the project's own path (``SafetyAlignModule``, ``trainer.strategy: fsdp2``).

MFU = model FLOPs per second / (GPUs x peak dense bf16 FLOPs). Model FLOPs count what the training step needs, not
what is recomputed: per LLM token 4 x frozen weights (forward + activation gradients) + 6 x trainable weights
(LoRA, projector) + 12 x layers x hidden x sequence for attention (PaLM's convention); the vision tower forward only
(it is frozen and nothing before it learns); the LM head for the positions that predict a reply token.
The Qwen2.5-VL-7B shape (``benchmarks/qwen_shape.py``) is the published architecture with random weights, trained
through ``model.pretrained`` as a downloaded checkpoint would be (LoRA on the language model, vision tower and merger
frozen), on samples with one 672 x 672 image (2304 patches, 576 image tokens, as many as LLaVA-1.5's).

``--cpu_check`` runs a tiny model of the chosen family on 2 CPU processes to check the script itself; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from mllm_safety.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from mllm_safety.data.processor import Batch
from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import LoraSettings, OptimSettings, SafetyAlignModule, TrainableParts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qwen_shape  # noqa: E402  (a sibling module of this script)

LLM_SHAPES = {
    # Vicuna-7B/13B v1.5 (Llama 2): the LLMs of LLaVA-1.5-7B/13B.
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
VISION = {"7b": "ViT-L-14-336", "13b": "ViT-L-14-336", "tiny": "tiny-vit"}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0}
PEAK_BF16_TFLOPS |= {"A100": 312.0, "L40S": 362.0, "A10": 125.0, "GH200": 989.0, "B200": 2250.0}
"""Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched as substrings of the device name."""


def llm_config(model: str) -> LLMConfig:
    shape = dict(LLM_SHAPES[model])
    heads = shape["num_attention_heads"]
    shape |= {"num_key_value_heads": heads, "head_dim": shape["hidden_size"] // heads, "tie_word_embeddings": False}
    shape |= {"max_position_embeddings": 4096}
    return LLMConfig(random_init=shape)


def synthetic_batches(
    num_batches: int, batch_size: int, seq_len: int, vocab: int, image_tokens: int, image_size: tuple[int, int]
) -> list[Batch]:
    """LLaVA-like samples of exactly ``seq_len`` tokens: 6 prompt tokens, the image, a question, then a reply.

    The reply (the last 40% of the text after the image) carries the loss, as in instruction data.
    """
    text = seq_len - image_tokens
    if text < 16:
        raise ValueError(f"--seq_len {seq_len} leaves no room for text after {image_tokens} image tokens")
    reply_start = image_tokens + 6 + int(0.6 * (text - 6))
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(num_batches):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
        ids[:, 6 : 6 + image_tokens] = IMAGE_TOKEN_ID
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, reply_start:] = ids[:, reply_start:]
        pixels = torch.randn((batch_size, 3, *image_size), generator=generator)
        names = [f"synthetic-{index}-{row}" for row in range(batch_size)]
        batches.append(Batch(names, ids, torch.ones_like(ids), labels, pixels))
    return batches


@dataclass
class FlopCount:
    per_sample: float
    reply_tokens_per_sample: int


def count_model_flops(module: SafetyAlignModule, batch: Batch) -> FlopCount:
    """Model FLOPs of one training sample of ``batch``'s shape (see the module docstring for what is counted)."""
    model = module.model
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    config = llm.config
    head = llm.get_output_embeddings()
    embed = llm.get_input_embeddings()
    frozen = trainable = 0
    for param in model.llm.parameters():
        if param.dim() < 2 or param is head.weight or param is embed.weight:
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    seq_len = batch.input_ids.shape[1]
    reply_tokens = int((batch.labels[0, 1:] != IGNORE_INDEX).sum())
    llm_flops = seq_len * (4 * frozen + 6 * trainable)
    llm_flops += 12 * config.num_hidden_layers * config.hidden_size * seq_len * seq_len
    llm_flops += reply_tokens * 4 * head.weight.numel()
    images = int((batch.input_ids[0] == IMAGE_TOKEN_ID).sum()) // model.vision.num_tokens
    vision = model.vision.visual
    vision_params = sum(p.numel() for p in vision.transformer.parameters() if p.dim() >= 2)
    vision_tokens = (vision.grid_size[0] * vision.grid_size[1]) + 1
    vision_blocks = len(vision.transformer.resblocks)
    vision_flops = 2 * vision_params * vision_tokens + 4 * vision_blocks * vision.transformer.width * vision_tokens**2
    projector_flops = 6 * sum(p.numel() for p in model.projector.parameters() if p.dim() >= 2) * model.vision.num_tokens
    return FlopCount(llm_flops + images * (vision_flops + projector_flops), reply_tokens)


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    matches = [name for name in PEAK_BF16_TFLOPS if name in device_name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


class StepTimer(L.Callback):
    """Wall time of each training step after the warm-up, synchronising the GPU only at the measured boundaries."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.step_times: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 < self.warmup:
            return
        now = self._now()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["7b", "13b", "qwen25-vl-7b"], default="7b", help="LLaVA-1.5 or Qwen shape.")
    parser.add_argument("--devices", type=int, default=None, help="GPUs on this machine (default: all).")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16-true", "bf16-mixed"], default="bf16-true")
    parser.add_argument("--batch_size", type=int, default=4, help="Samples per GPU per step.")
    parser.add_argument("--seq_len", type=int, default=1024, help="Tokens per sample, the 576 image tokens included.")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps.")
    parser.add_argument("--warmup", type=int, default=5, help="Steps run before measuring.")
    parser.add_argument("--lora_r", type=int, default=128)
    parser.add_argument("--activation_checkpointing", action="store_true", help="Recompute LLM layers in backward.")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak dense bf16 TFLOP/s of one GPU.")
    parser.add_argument("--cpu_check", action="store_true", help="Tiny model on 2 CPU processes: checks the script.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    qwen = args.model == "qwen25-vl-7b"
    if args.cpu_check:
        args.model = args.model if qwen else "tiny"
        args.devices, args.precision, args.seq_len, args.lora_r = 2, "32-true", 64, 8
        args.steps, args.warmup = 3, 1
    elif not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_throughput.py measures GPU training throughput and needs CUDA GPUs, but "
            "torch.cuda.is_available() is False here. (--cpu_check runs a tiny model on CPU to check the script.)"
        )
    accelerator = "cpu" if args.cpu_check else "gpu"
    devices = args.devices or (torch.cuda.device_count() if accelerator == "gpu" else 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if args.cpu_check else torch.device("cuda", local_rank)

    L.seed_everything(0)
    num_batches = args.warmup + args.steps
    with device:  # random weights created in place: a 7B model never goes through host memory
        if qwen:
            module = qwen_shape.build_module(args.cpu_check, args.seq_len, args.lora_r, args.activation_checkpointing)
        else:
            module = SafetyAlignModule(
                llm=llm_config(args.model),
                vision=VisionConfig(name=VISION[args.model]),
                max_length=args.seq_len,
                lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05),
                trainable=TrainableParts(vision=False, projector=True, llm=False),
                optim=OptimSettings(lr=2e-4, projector_lr=2e-5),
                gradient_checkpointing=args.activation_checkpointing,
            )
    if qwen:
        image_px = 56 if args.cpu_check else 672
        batches = qwen_shape.synthetic_batches(module, num_batches, args.batch_size, args.seq_len, image_px)
        flops = qwen_shape.count_model_flops(module, batches[0])
        image_tokens, shape = flops.image_tokens_per_sample, "Qwen2.5-VL-7B"
    else:
        vocab = module.model.llm.get_input_embeddings().num_embeddings
        image_tokens, shape = module.model.vision.num_tokens, f"LLaVA-1.5-{args.model}"
        batches = synthetic_batches(
            num_batches, args.batch_size, args.seq_len, vocab, image_tokens, module.processor.image_size
        )
        flops = count_model_flops(module, batches[0])
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy="fsdp2",
        precision=args.precision,
        max_steps=num_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(module, train_dataloaders=loader)

    if not trainer.is_global_zero:
        return
    world = trainer.world_size
    step = statistics.median(timer.step_times)
    samples = args.batch_size * world
    tokens_per_s = samples * args.seq_len / step
    name = torch.cuda.get_device_name(local_rank) if accelerator == "gpu" else "CPU (check only: not a measurement)"
    peak = peak_flops(name, args.peak_tflops) if accelerator == "gpu" else None
    rows = [
        ("device", f"{world} x {name}"),
        ("model", f"{shape} shape, LoRA r={args.lora_r}, FSDP2, {args.precision}"),
        (
            "batch",
            f"{args.batch_size}/GPU x {args.seq_len} tokens ({image_tokens} image, "
            f"{flops.reply_tokens_per_sample} reply)",
        ),
        ("activation checkpointing", str(args.activation_checkpointing)),
        ("step time (median)", f"{step * 1000:.1f} ms over {len(timer.step_times)} steps"),
        ("tokens/s", f"{tokens_per_s:,.0f} ({tokens_per_s / world:,.0f} per GPU)"),
        ("samples/s", f"{samples / step:,.2f}"),
        ("model TFLOP/s per GPU", f"{flops.per_sample * samples / step / world / 1e12:.1f}"),
    ]
    if peak is not None:
        rows.append(
            ("MFU", f"{100 * flops.per_sample * samples / step / (world * peak):.1f}% of {peak / 1e12:.0f} TFLOP/s")
        )
    else:
        rows.append(("MFU", "unknown peak: pass --peak_tflops" if accelerator == "gpu" else "n/a on CPU"))
    if accelerator == "gpu":
        rows.append(("peak memory", f"{torch.cuda.max_memory_allocated(local_rank) / 2**30:.1f} GiB on rank 0"))
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key.ljust(width)}  {value}" for key, value in rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())
