"""FSDP2 on 2 CPU processes: the same training as one process (gradient accumulation included), generation through
the sharded model, sharded resume, and evaluating what the sharded run wrote."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from planted import assert_figures_vary
from tiny_models import TINY_LLM

from mllm_safety.evaluate import EvaluateCLI
from mllm_safety.evaluate import main as evaluate_main
from mllm_safety.model.hub_vlm import HubOptions
from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.checkpoints import load_checkpoint_weights
from mllm_safety.train.module import LoraSettings, OptimSettings, TrainableParts
from mllm_safety.train.parallel import FSDP2Strategy, decoder_layers

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "distributed_fit.py"
MODEL_SECTION = {
    "llm": {"random_init": TINY_LLM},
    "vision": {"name": "tiny-vit"},
    "max_length": 256,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "optim": {"lr": 1e-2, "projector_lr": 1e-2, "warmup_ratio": 0.0},
}
"""The model distributed_fit.py trains, as the ``model`` section of a fit config."""
# distributed_fit.py builds the module in Python: the hyperparameters in its checkpoints are these dataclasses.
torch.serialization.add_safe_globals([LLMConfig, VisionConfig, LoraSettings, OptimSettings, TrainableParts, HubOptions])


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


def assert_same_weights(a: dict, b: dict, projector: str = "projector", atol: float = 1e-4) -> None:
    """Equal up to float noise: Adam divides by the root of tiny second moments, so a weight whose gradients are
    near zero moves by up to ~4e-5 apart under FSDP2's other summation order (the first gradients, compared exactly
    elsewhere, agree to 1e-7); one missed or doubled step moves weights by about the learning rate, 1e-2."""
    assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any(projector in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, planted_weights) -> dict[str, tuple[Path, dict]]:
    """The same two epochs of 2 global batches: whole batches in one process, 2 accumulated micro-batches in one
    process, and 2 accumulated micro-batches under FSDP2 on 2 processes."""
    root = tmp_path_factory.mktemp("runs")
    commands = {
        "single": [],
        "accumulated": ["--accumulate", "2"],
        "fsdp2": ["--devices", "2", "--strategy", "fsdp2", "--accumulate", "2"],
    }
    return {name: (root / name, run_script(root / name, *args)) for name, args in commands.items()}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any("lora_B" in k for k in a) and any("projector" in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_accumulated_micro_batches_on_one_or_two_fsdp2_processes_train_like_whole_batches(runs):
    single, accumulated, sharded = (runs[name][1] for name in ("single", "accumulated", "fsdp2"))
    assert sharded["world_size"] == 2 and len(single["losses"]) == len(sharded["losses"]) == 4
    # one mean over the reply tokens of both micro-batches (and both ranks): the gradients of a whole batch
    assert_same_gradients(accumulated["first_gradients"], single["first_gradients"])
    assert_same_gradients(sharded["first_gradients"], single["first_gradients"])
    for run in (accumulated, sharded):
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
        assert_same_weights(run["weights"], single["weights"])
    assert single["losses"][-1] < single["losses"][0]
    # generation runs through the sharded root (the safety callback before, during and after training, and directly)
    assert len({tuple(row.tolist()) for row in single["replies"]}) > 1, "replies differ from prompt to prompt"
    assert torch.equal(sharded["replies"], single["replies"])
    assert_figures_vary(single["safety"], every_evaluation=False)
    assert sharded["safety"] == single["safety"]
    # ranks whose replies end at different lengths keep gathering the layers together (no hang), same tokens
    assert [len(tokens) for tokens in single["uneven"]] == [1, 5]
    assert all(torch.equal(a, b) for a, b in zip(sharded["uneven"], single["uneven"], strict=True))
    assert [label for label, _ in sharded["safety"]] == ["before", "epoch 0", "epoch 1"]


def test_fsdp2_resumes_from_its_sharded_checkpoint(runs, tmp_path):
    """Each rank wrote its shard of the trainable weights only; resuming after epoch 0 (here with checkpoints gathered
    into one file) ends where the full run ended, and keeps the safety evaluations of the first epoch instead of
    evaluating trained weights as the baseline."""
    (folder, sharded), (_, single) = runs["fsdp2"], runs["single"]
    checkpoint = folder / "checkpoints" / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    args = ["--devices", "2", "--single_file", "--accumulate", "2", "--ckpt_path", str(checkpoint)]
    resumed = run_script(tmp_path, *args)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(single["losses"][2:]), rtol=1e-5, atol=0)
    assert_same_weights(resumed["weights"], single["weights"])
    assert_figures_vary(sharded["safety"], every_evaluation=False)  # a baseline of trained weights would differ
    assert resumed["safety"] == sharded["safety"]
    # this run gathered its checkpoints into single files on rank 0: the trainable weights, and nothing frozen
    gathered = torch.load(tmp_path / "checkpoints" / "epoch=1-step=4.ckpt", weights_only=True)["state_dict"]
    assert_same_weights(gathered, single["weights"])


def test_evaluate_reads_what_fsdp2_wrote_and_reports_the_figures_of_training(runs, tmp_path, planted_weights):
    """``evaluate --ckpt_path`` on the sharded checkpoint folder and on trainable.safetensors of a 2-process FSDP2 run,
    in one process: the figures the safety callback computed inside training at the same step."""
    folder, sharded = runs["fsdp2"]
    config = tmp_path / "config.yaml"
    model = {**MODEL_SECTION, "init_weights": [planted_weights]}
    config.write_text(json.dumps({"seed_everything": 0, "model": model}))
    trainable = sharded["weights"]
    in_training = dict(sharded["safety"])["epoch 1"]
    assert_figures_vary(sharded["safety"], every_evaluation=False)  # so the figures are those of the trained weights
    benchmarks = json.dumps([{"name": "demo", "modes": ["text", "benign", "shapes"]}])
    settings = [
        "--eval.limit=3",
        "--eval.generation.max_new_tokens=4",
        "--eval.generation.batch_size=1",
        "--eval.judges=[xstest]",
    ]
    checkpoints = folder / "checkpoints"
    for checkpoint in (checkpoints / "epoch=1-step=4.ckpt", checkpoints / "trainable.safetensors"):
        args = ["--config", str(config), "--ckpt_path", str(checkpoint), "--output", str(tmp_path / checkpoint.name)]
        figures = evaluate_main([*args, "--eval.benchmarks", benchmarks, *settings, "--trainer.accelerator", "cpu"])
        safety = {f"safety/{name}": value for name, value in figures["xstest"].items()}
        utility = {f"utility/{s}/{m}": value for s, scores in figures["utility"].items() for m, value in scores.items()}
        assert safety | utility == in_training, checkpoint.name
        module = EvaluateCLI(["--config", str(config), "--output", str(tmp_path)]).model
        load_checkpoint_weights(module, checkpoint)
        assert_same_weights({name: p for name, p in module.named_parameters() if name in trainable}, trainable)


def test_fsdp2_is_a_strategy_name_and_shards_over_every_rank():
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=1, strategy="fsdp2", logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    assert trainer.strategy.mixed_precision().param_dtype is None
    bf16 = L.Trainer(accelerator="cpu", devices=2, strategy="fsdp2", precision="bf16-mixed", logger=False)
    assert bf16.strategy.mixed_precision().param_dtype == torch.bfloat16
    assert bf16.strategy.mixed_precision().reduce_dtype == torch.float32


def test_decoder_layers_are_the_llm_blocks(tiny_llm):
    from peft import LoraConfig, get_peft_model

    head = torch.nn.Linear(2, 2)  # a language model part without blocks (a hub VLM's separate LM head)
    layers = decoder_layers([get_peft_model(tiny_llm, LoraConfig(r=2, target_modules="all-linear")), head])
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(ValueError, match=r"cannot find the decoder layers of the language model \['Linear'\]"):
        decoder_layers([head])


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
