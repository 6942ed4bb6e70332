"""Peak host memory of ``mllm_safety.export`` against the size of what it writes, and the llama3-llava-next-8b figure.

A scaled-down Llama-3-LLaVA-NeXT (configs/architectures/llama3_llava_next_8b.json with narrower, fewer layers: about
230M parameters) is written in bfloat16 with random weights; a run's trainable-weights file is made for it with the
paper's LoRA (every linear layer of the LLM; r=128 at 8B, scaled to the width here) and a trained projector; and the
export CLI writes it in bfloat16, in a fresh process per code tree. The peak is the process's maximum resident set
size (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``; Linux) above what it held after the
imports, over the bytes of the safetensors written.

    python benchmarks/export_memory.py                       # this tree
    python benchmarks/export_memory.py --code /path/to/other/checkout --code .

The 8B figure scales the measured ratio to the 8B export's size, next to the budget it should meet: the bfloat16
weights, the float32 adapters and one 2 GB shard being serialised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).parents[1]
ARCHITECTURE = ROOT / "configs" / "architectures" / "llama3_llava_next_8b.json"
SCALED = {  # the 8B architecture, narrower and shallower
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    "vision_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8},
}
LORA = {"r": 32, "alpha": 64, "dropout": 0.0}
"""The paper's r=128, alpha=256 on a 4096-wide LLM, scaled with the width (adapters are r/width of a layer), so that
the adapters are the same share of the model as at 8B (8%)."""
LORA_8B_RANK = 128
CHILD = """
import json, sys
from pathlib import Path
from mllm_safety.export import main

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1])

baseline = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark: the imports' own peak does not count
main(sys.argv[1:])
print(json.dumps({"baseline_kib": baseline, "peak_kib": status("VmHWM")}))
"""


def architecture(scaled: bool) -> dict:
    config = json.loads(ARCHITECTURE.read_text())
    if scaled:
        for part, overrides in SCALED.items():
            config[part] |= overrides
    return config


def write_checkpoint(folder: Path) -> str:
    """The scaled architecture with random bfloat16 weights, SmolLM2's tokenizer with the image token, and a
    LLaVA-NeXT processor with the published 336 px settings."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from mllm_safety.model.llm import resolve_llm_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path("smollm2-135m-instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    raw = architecture(scaled=True)
    raw["text_config"]["vocab_size"] = len(tokenizer)
    raw["image_token_index"] = tokenizer.convert_tokens_to_ids("<image>")
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(image_grid_pinpoints=raw["image_grid_pinpoints"]),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}",
    )
    processor.save_pretrained(folder)
    return str(folder)


def write_trainable(path: str, file: Path) -> None:
    """A run's trainable-weights file: LoRA adapters and projector moved off their start."""
    from mllm_safety.model.hub_vlm import HubOptions
    from mllm_safety.model.lora import LoraSettings
    from mllm_safety.train.module import SafetyAlignModule, TrainableParts

    torch.manual_seed(0)
    module = SafetyAlignModule(
        pretrained=path,
        hub=HubOptions(),
        lora=LoraSettings(**LORA),
        trainable=TrainableParts(projector=True),
        frozen_dtype="bfloat16",
    )
    with torch.no_grad():
        for param in module.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    module.save_trainable(file)


def measure(code: Path, args: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"export with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def eight_b_sizes() -> tuple[int, int]:
    """Bytes of llama3-llava-next-8b in bfloat16 and of its float32 LoRA adapters (r=128 on every LLM linear)."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(AutoConfig.for_model(**architecture(scaled=False)))
    weights = sum(p.numel() for p in model.parameters()) * 2
    linears = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    adapters = sum(LORA_8B_RANK * (m.in_features + m.out_features) for m in linears) * 4
    return weights, adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, action="append", help="checkout whose export to measure (repeatable)")
    options = parser.parse_args()
    codes = options.code or [ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_checkpoint(tmp / "checkpoint")
        write_trainable(path, tmp / "trainable.safetensors")
        model = {"llm": None, "vision": None, "projector": None, "pretrained": path, "lora": LORA}
        (tmp / "model.yaml").write_text(yaml.safe_dump({"model": model | {"trainable": {"projector": True}}}))
        gib = 1024**3
        weights_8b, adapters_8b = eight_b_sizes()
        print(
            f"llama3-llava-next-8b: {weights_8b / gib:.2f} GiB in bfloat16, LoRA r=128 adapters "
            f"{adapters_8b / gib:.2f} GiB in float32; budget weights + adapters + one 2 GB shard = "
            f"{(weights_8b + adapters_8b + 2e9) / gib:.1f} GiB ({(weights_8b + adapters_8b + 2e9) / weights_8b:.2f}x)"
        )
        for code in codes:
            out = tmp / f"out-{len(list(tmp.glob('out-*')))}"
            args = [
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--config",
                str(tmp / "model.yaml"),
                f"--ckpt_path={tmp / 'trainable.safetensors'}",
                f"--output={out}",
                "--dtype=bfloat16",
            ]
            rss = measure(code.resolve(), args)
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            above = (rss["peak_kib"] - rss["baseline_kib"]) * 1024
            ratio = above / written
            print(
                f"{code}: exported {written / gib:.3f} GiB; peak RSS {rss['peak_kib'] / 1024**2:.2f} GiB, "
                f"{above / gib:.3f} GiB above the imports = {ratio:.2f}x the export; "
                f"llama3-llava-next-8b at that ratio: {ratio * weights_8b / gib:.1f} GiB"
            )


if __name__ == "__main__":
    main()
