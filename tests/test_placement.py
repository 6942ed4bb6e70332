"""Where a rank's model is built: checkpoint weights straight onto the rank's device, random weights on the CPU.

A CPU-only machine has no second device to load onto, so these tests give the DDP ranks the meta device (which holds
no data) as a stand-in for a GPU: whatever lands there was never copied into host memory. Random weights are drawn on
the CPU as for a GPU (on the meta device itself a dry run keeps them there), and transformers' hub kernels, which know
no meta device, are off.
"""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from mllm_safety.cli import rank_device
from mllm_safety.fit import SafetyCLI
from mllm_safety.model.placement import random_init_device
from mllm_safety.train import module

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
META = torch.device("meta")


@pytest.fixture
def ranks_on_meta(monkeypatch):
    """DDP and FSDP2 ranks whose own device is the meta device, standing in for a GPU."""
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    monkeypatch.setattr(module, "random_init_device", lambda device: torch.device("cpu"))
    for strategy in (DDPStrategy, ModelParallelStrategy):
        monkeypatch.setattr(strategy, "root_device", property(lambda self: META))


def test_the_rank_builds_on_its_own_device_only_when_it_builds_its_own_whole_model(ranks_on_meta):
    def device(strategy: str) -> torch.device:
        return rank_device(Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False).strategy)

    assert device("ddp") == META, "Lightning starts the command once per device: each rank builds its model"
    assert device("fsdp2") == torch.device("cpu"), "FSDP2 shards a model built on the CPU"
    assert device("ddp_spawn") == torch.device("cpu"), "one process builds the model for the processes it spawns"
    assert rank_device(Trainer(accelerator="cpu", devices=1, logger=False).strategy) == torch.device("cpu")


def fit_cli(*overrides: str) -> SafetyCLI:
    """fit's command line with two DDP ranks, built but not run."""
    return SafetyCLI(
        [
            "--config",
            CONFIG,
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            *overrides,
        ]
    )


def model_sources(hub_checkpoint, tiny_llava_path) -> dict[str, list[str]]:
    no_parts = ["--model.llm", "null", "--model.vision", "null", "--model.projector", "null"]
    return {
        "assembled": ["--model.llm.random_init", "null"],  # SmolLM2-135M's checkpoint beside a random tiny tower
        "llava": [*no_parts, "--model.llava.path", tiny_llava_path],
        "pretrained": [*no_parts, "--model.pretrained", hub_checkpoint("llava_next_mistral")],
    }


@pytest.mark.parametrize("source", ["assembled", "llava", "pretrained"])
def test_fit_reads_the_checkpoint_weights_straight_onto_the_ranks_device(
    source, ranks_on_meta, hub_checkpoint, tiny_llava_path
):
    module = fit_cli(*model_sources(hub_checkpoint, tiny_llava_path)[source]).model
    parameters = dict(module.model.named_parameters())
    loaded = {name for name in parameters if ".lora_" not in name}
    if source == "assembled":  # the tower is the tests' random tiny-vit and the projector is new: both random
        loaded = {name for name in loaded if name.startswith("llm.")}
    assert loaded
    on_cpu = sorted(name for name in loaded if parameters[name].device != META)
    assert not on_cpu, f"checkpoint weights were read into host memory first, e.g. {on_cpu[:3]}"
    lora = [p for name, p in parameters.items() if ".lora_" in name]
    assert lora and all(p.device == META for p in lora), "adapters follow the weights they adapt"


def test_random_weights_are_drawn_on_the_cpu_with_the_seeds_values(ranks_on_meta):
    """A random part (the tests' tower, a fresh projector) gets the same values whatever device the rank has, so its
    fingerprint in a checkpoint matches when the run is evaluated elsewhere."""
    on_meta = fit_cli().model.model
    on_cpu = fit_cli("--trainer.devices", "1", "--trainer.strategy", "auto").model.model
    for part in ("vision", "projector"):
        ranked = dict(getattr(on_meta, part).named_parameters())
        plain = dict(getattr(on_cpu, part).named_parameters())
        assert ranked.keys() == plain.keys() and len(ranked) > 1
        assert all(torch.equal(ranked[name], plain[name]) for name in ranked), part
    assert any(p.abs().sum() > 0 for p in on_cpu.projector.parameters()), "the projector is drawn, not zeros"
    assert random_init_device(torch.device("cuda", 1)) == torch.device("cpu"), "a GPU rank draws on the CPU"
    assert random_init_device(META) == META, "a dry run on the meta device allocates nothing"
