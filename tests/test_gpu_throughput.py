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
