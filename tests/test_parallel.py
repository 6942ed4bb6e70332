"""FSDP2 on 2 CPU processes: the same training as one process, generation through the sharded model, sharded resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mllm_safety.train.parallel import FSDP2Strategy, decoder_layers, global_token_mean

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "distributed_fit.py"


def run_script(out: Path, *args: str) -> dict:
    """Runs distributed_fit.py; a hang (ranks out of step) kills the whole process group, other ranks included."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish in 240 s:\n{output.decode()[-3000:]}")
    assert proc.returncode == 0, output.decode()[-6000:]
    return torch.load(out / "result.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, projector: str = "projector", atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any(projector in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)


def test_fsdp2_on_two_processes_trains_like_one_and_resumes_from_its_sharded_checkpoint(tmp_path):
    single = run_script(tmp_path / "single")
    sharded = run_script(tmp_path / "fsdp2", "--devices", "2", "--strategy", "fsdp2")
    assert sharded["world_size"] == 2 and len(single["losses"]) == len(sharded["losses"]) == 4
    # the loss is one mean over the reply tokens of both ranks, so every step matches the single process
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    assert single["losses"][-1] < single["losses"][0]
    assert_same_weights(sharded["weights"], single["weights"])
    # generation runs through the sharded root (the safety callback before, during and after training, and directly)
    assert torch.equal(sharded["replies"], single["replies"])
    # ranks whose replies end at different lengths keep gathering the layers together (no hang), same tokens
    assert [len(tokens) for tokens in single["uneven"]] == [1, 5]
    assert all(torch.equal(a, b) for a, b in zip(sharded["uneven"], single["uneven"], strict=True))
    assert [label for label, _ in sharded["safety"]] == ["before", "epoch 0", "epoch 1"]

    # each rank wrote its shard of the trainable weights only; resuming after epoch 0 ends where the full run ended
    checkpoint = tmp_path / "fsdp2" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = run_script(tmp_path / "resumed", "--devices", "2", "--strategy", "fsdp2", "--ckpt_path", str(checkpoint))
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(single["losses"][2:]), rtol=1e-5, atol=0)
    assert_same_weights(resumed["weights"], single["weights"])


def test_fsdp2_is_a_strategy_name_and_shards_over_every_rank():
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="fsdp2", logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert trainer.strategy.mixed_precision().param_dtype is None
    bf16 = L.Trainer(accelerator="cpu", devices=2, strategy="fsdp2", precision="bf16-mixed", logger=False)
    assert bf16.strategy.mixed_precision().param_dtype == torch.bfloat16
    assert bf16.strategy.mixed_precision().reduce_dtype == torch.float32


def test_decoder_layers_are_the_llm_blocks(tiny_llm):
    from peft import LoraConfig, get_peft_model

    layers = decoder_layers(get_peft_model(tiny_llm, LoraConfig(r=2, target_modules="all-linear")))
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_token_mean_is_unchanged_without_distributed():
    loss, logged = global_token_mean(torch.tensor(2.5, requires_grad=True), torch.tensor(7))
    assert loss.item() == 2.5 and logged.item() == 2.5 and loss.requires_grad and not logged.requires_grad


def test_fsdp2_on_two_processes_trains_a_hub_vlm_like_one_process(tmp_path, hub_checkpoint):
    """Qwen2.5-VL through its own transformers class: sharded decoder layers, vision blocks, merger and tower."""
    path = hub_checkpoint("qwen25_vl")
    single = run_script(tmp_path / "single", "--pretrained", path, "--epochs", "1")
    sharded = run_script(
        tmp_path / "fsdp2", "--pretrained", path, "--epochs", "1", "--devices", "2", "--strategy", "fsdp2"
    )
    assert sharded["world_size"] == 2 and len(single["losses"]) == len(sharded["losses"]) == 2
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    # AdamW turns float-rounding differences of near-zero gradients into steps of ~1e-6 (measured: 5.6e-6 at most)
    assert_same_weights(sharded["weights"], single["weights"], projector="visual.merger", atol=2e-5)
    assert torch.equal(sharded["replies"], single["replies"])
    assert all(torch.equal(a, b) for a, b in zip(sharded["uneven"], single["uneven"], strict=True))
    assert [label for label, _ in sharded["safety"]] == ["before", "epoch 0"]
    assert sharded["safety"] == single["safety"]
