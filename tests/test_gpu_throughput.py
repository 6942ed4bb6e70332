"""benchmarks/gpu_throughput.py measures GPUs only; on a machine without one it says so instead of printing figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_without_a_gpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    script = ROOT / "benchmarks" / "gpu_throughput.py"
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert "needs CUDA GPUs, but torch.cuda.is_available() is False" in result.stderr


def test_the_qwen25_vl_7b_shape_builds_with_its_published_size_and_synthetic_inputs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import qwen_shape

    with torch.device("meta"):
        module = qwen_shape.build_module(tiny=False, seq_len=1024, lora_r=128, gradient_checkpointing=False)
    trainable, total = module.parameter_counts["all"]
    assert (trainable, total - trainable) == (322_961_408, 8_292_166_656), "LoRA r=128 on Qwen2.5-VL-7B's LLM"
    batch = qwen_shape.synthetic_batches(module, 1, 2, 1024, image_px=672)[0]
    assert (batch.input_ids == module.model.hf.config.image_token_id).sum(1).tolist() == [576, 576]
    assert batch.pixel_values.shape == (2 * 2304, 1176)  # 48 x 48 patches of 14 px, 2 frames x 3 channels each
    assert batch.extra_inputs["image_grid_thw"].tolist() == [[1, 48, 48]] * 2
    flops = qwen_shape.count_model_flops(module, batch)
    # ~2 x 7.6B frozen LLM weights x 1024 tokens forward and backward, plus the vision tower: a few 1e13
    assert 3e13 < flops.per_sample < 1e14 and flops.image_tokens_per_sample == 576
