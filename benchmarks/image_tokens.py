"""Image tokens per model family at the image sizes of the training data, with the published processor settings.

A sample is kept when its prompt, image included, fits ``model.max_length`` (a longer reply is truncated; an image is
never cut: the sample is skipped as ``too_long``). Each family's processor is built offline from the published
checkpoint's processor files (``tests/fixtures/published/<owner>--<name>/``) with the config's
``model.hub.processor_kwargs``, through ``AutoProcessor`` as training builds it, beside SmolLM2's tokenizer with the
family's special tokens (only the image marker's expansion is counted, and it is made of special tokens, so the
tokenizer does not change the figures).

    python benchmarks/image_tokens.py                      # the configs of this checkout
    python benchmarks/image_tokens.py --configs OTHER/configs

Sizes: COCO 640x480, 640x427 and 480x640 (portrait), Visual Genome / GQA 500x375 and 800x600, TextVQA 1024x768.
The last column is the 640x480 image after the paper's LLaMA-Factory cap (longest edge 512 px, the default
``image_resolution`` of its version).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from mllm_safety.model.llm import resolve_llm_path

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "published"
SIZES = [(640, 480), (640, 427), (480, 640), (500, 375), (800, 600), (1024, 768)]
LLAMA_FACTORY_EDGE = 512
"""The paper's LLaMA-Factory (late 2024) resized every image to this longest edge before its processor."""
PROMPT_TOKENS = 64
"""Room for the chat template and a question beside the image: the prompt a kept sample needs."""
SPECIAL_TOKENS = [
    "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<fake_token_around_image>",
    "<global-img>", "<end_of_utterance>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]  # fmt: skip
QWEN_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class Row:
    label: str
    checkpoint: str
    config: str | None = None
    """A config of configs/ (its max_length and processor_kwargs are read), or None for the published defaults."""
    marker: str = "<image>"
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Used when ``config`` is None; a config's own processor_kwargs otherwise."""
    missing: dict[str, Any] = field(default_factory=dict)
    """Processor attributes the published files lack, taken from the checkpoint's config as LLaMA-Factory does."""
    max_length: int = 2048


ROWS = [
    Row("LLaVA-NeXT Mistral-7B", "llava-hf/llava-v1.6-mistral-7b-hf", "llava_next_mistral_7b_lora"),
    Row("LLaVA-NeXT Llama-3-8B", "llava-hf/llama3-llava-next-8b-hf", "llama3_llava_next_8b_lora"),
    Row("Qwen2.5-VL-7B", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen25_vl_7b_lora", QWEN_MARKER),
    Row("Qwen2.5-VL-7B, published bound", "Qwen/Qwen2.5-VL-7B-Instruct", None, QWEN_MARKER),
    Row(
        "Yi-VL-6B",
        "BUAADreamer/Yi-VL-6B-hf",
        "yi_vl_6b_lora",
        missing={"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1},
    ),
    Row("Idefics3-8B, published", "HuggingFaceM4/Idefics3-8B-Llama3"),
    Row("Idefics3-8B, 728 px", "HuggingFaceM4/Idefics3-8B-Llama3", processor_kwargs={"size": {"longest_edge": 728}}),
    Row("SmolVLM-Instruct, published", "HuggingFaceTB/SmolVLM-Instruct"),
]  # fmt: skip


def published_processor(checkpoint: str, processor_kwargs: dict[str, Any]):
    """The checkpoint's transformers processor from its published processor files and SmolLM2's tokenizer."""
    folder = Path(tempfile.mkdtemp(prefix="published-processor-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path("smollm2-135m-instruct"))
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
        tokenizer.save_pretrained(folder)
        for path in (FIXTURES / checkpoint.replace("/", "--")).glob("*.json"):
            shutil.copy(path, folder / path.name)
        return AutoProcessor.from_pretrained(folder, **processor_kwargs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def image_tokens(processor, marker: str, size: tuple[int, int]) -> int:
    """The tokens the processor expands the image marker into for an image of ``size`` (width, height)."""
    out = processor(text=[marker], images=[Image.new("RGB", size, "gray")], add_special_tokens=False)
    return len(out["input_ids"][0])


def capped(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """LLaMA-Factory's resize: the longest edge down to ``edge``, sides truncated to integers."""
    factor = min(1.0, edge / max(size))
    return int(size[0] * factor), int(size[1] * factor)


def measure(row: Row, configs: Path) -> dict[str, Any]:
    kwargs, max_length = dict(row.processor_kwargs), row.max_length
    if row.config is not None:
        model = yaml.safe_load((configs / f"{row.config}.yaml").read_text())["model"]
        kwargs, max_length = dict((model.get("hub") or {}).get("processor_kwargs") or {}), model["max_length"]
    processor = published_processor(row.checkpoint, {**row.missing, **kwargs})
    tokens = [image_tokens(processor, row.marker, size) for size in SIZES]
    return {
        "family": row.label,
        "config": f"{row.config}.yaml" if row.config else "-",
        "processor_kwargs": json.dumps(kwargs) if kwargs else "-",
        "max_length": max_length,
        **{f"{w}x{h}": n for (w, h), n in zip(SIZES, tokens, strict=True)},
        "kept": f"{sum(n + PROMPT_TOKENS <= max_length for n in tokens)}/{len(SIZES)}",
        "text room at 640x480": max_length - tokens[0],
        "640x480 capped at 512": image_tokens(processor, row.marker, capped(SIZES[0], LLAMA_FACTORY_EDGE)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, default=ROOT / "configs", help="folder of the configs to measure")
    args = parser.parse_args()
    rows = [measure(row, args.configs) for row in ROWS]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
