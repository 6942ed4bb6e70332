"""The paper's recipe (LoRA r=128 α=256, lr 2e-4, 3 epochs, global batch 128, bf16), as every paper config resolves."""

from pathlib import Path

import pytest
import torch
import yaml

from mllm_safety.fit import main


def resolved_paper_config(config: Path, capsys, max_length: int = 2048) -> dict:
    """``config`` as fit's CLI resolves it, after checking the recipe that every model family shares (``max_length``:
    the paper's 2048, or what the family's image tokens need)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    trainer, data, model = resolved["trainer"], resolved["data"], resolved["model"]
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 128
    assert trainer["precision"] == "bf16-mixed" and trainer["max_epochs"] == 3
    assert model["lora"] == {"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": "all-linear"}
    assert model["optim"]["lr"] == 2e-4 and model["optim"]["warmup_ratio"] == 0.03 and model["max_length"] == max_length
    return resolved


def lora_adapters(model: torch.nn.Module) -> dict[str, int]:
    """``{adapted layer: its LoRA parameter count}``, read from the built model: each adapter's A is (r, in) and B is
    (out, r) for its base layer's in and out features, checked here."""
    adapters = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            r = a.shape[0]
            assert a.shape == (r, module.in_features) and b.shape == (module.out_features, r), name
            adapters[name] = a.numel() + b.numel()
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert total == sum(adapters.values()), "every LoRA weight belongs to an adapted layer"
    return adapters
