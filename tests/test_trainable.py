"""Trainable-only checkpoints: write LoRA + projector, put them back on the base model, export after a run."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from mllm_safety.export import main as export_main
from mllm_safety.fit import main
from mllm_safety.model.chat_templates import LLAVA_V1_CHAT_TEMPLATE
from mllm_safety.model.llava_hf import load_llava_hf
from mllm_safety.model.lora import LoraSettings, apply_lora
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.projector import build_projector
from mllm_safety.model.trainable import load_trainable, save_trainable, trainable_state_dict
from mllm_safety.train.checkpoints import TrainableWeightsCheckpoint
from mllm_safety.train.module import SafetyAlignModule

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LLAVA_SOURCE = ["--model.llm=null", "--model.vision=null", "--model.projector=null"]
"""With --model.llava.path: the run starts from a llava-hf checkpoint instead of tiny.yaml's assembled parts."""


def finetuned(path):
    """The imported model with LoRA and projector moved away from their initial values, as after training."""
    model = load_llava_hf(path)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.llm = apply_lora(model.llm, LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def logits(model):
    ids = torch.tensor([[5, 6, model.image_token_id] + [model.image_token_id] * 24 + [7, 8]])
    pixels = torch.linspace(-1, 1, 3 * 30 * 30).reshape(1, 3, 30, 30)
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), pixels).logits


def test_trainable_file_holds_only_trainable_weights_and_restores_the_model(tiny_llava_path, tmp_path):
    model = finetuned(tiny_llava_path)
    file = tmp_path / "trainable.safetensors"
    save_trainable(file, trainable_state_dict(model), lora=LORA, chat_template="T")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(file), framework="pt") as f:
        assert set(f.keys()) == trainable
        assert json.loads(f.metadata()["lora"])["r"] == 4 and f.metadata()["chat_template"] == "T"
    assert any(".lora_B." in n for n in trainable) and any(n.startswith("projector.") for n in trainable)

    base = load_llava_hf(tiny_llava_path).eval()
    assert not torch.allclose(logits(base), logits(model))
    loaded = load_trainable(base, file, require_every_trainable=False)  # a bare base model: everything requires grad
    assert set(loaded) == trainable
    torch.testing.assert_close(logits(base), logits(model), atol=0, rtol=0)


def test_loading_into_a_model_of_other_sizes_is_a_clear_error(tiny_llava_path, tmp_path, tiny_llm):
    file = tmp_path / "trainable.safetensors"
    save_trainable(file, trainable_state_dict(finetuned(tiny_llava_path)), lora=LORA)
    from mllm_safety.model.vision import OpenClipVisionEncoder, VisionConfig

    vision = OpenClipVisionEncoder(VisionConfig(name="tiny-vit"))
    other = MultimodalLM(vision, build_projector("mlp2x_gelu", vision.hidden_size, 32), tiny_llm)
    with pytest.raises(ValueError, match=f"{file}: projector.0.weight has shape \\(32, 48\\).*expects \\(32, 128\\)"):
        load_trainable(other, file, require_every_trainable=False)


def test_foreign_or_missing_files_are_refused(tiny_llava_path, tmp_path):
    model = load_llava_hf(tiny_llava_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        load_trainable(model, tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"projector.0.weight": torch.zeros(32, 48)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors is not a trainable-weights file"):
        load_trainable(model, foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors is not a safetensors file"):
        load_trainable(model, garbage)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"projector.9.weight": torch.zeros(1)}, str(unknown), metadata={"format": "mllm_safety.trainable/1"})
    with pytest.raises(ValueError, match="does not have, e.g. \\['projector.9.weight'\\]"):
        load_trainable(model, unknown)


def test_a_run_writes_the_trainable_file_that_reproduces_its_weights(tmp_path, caplog):
    callbacks = json.dumps([{"class_path": "mllm_safety.train.checkpoints.TrainableWeightsCheckpoint"}])
    args = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with caplog.at_level(logging.INFO):
        cli = main([*args, "--trainer.max_steps=2", f"--trainer.callbacks={callbacks}"])
    trainable_count, total = cli.model.parameter_counts["all"]
    assert f"all {trainable_count:,} of {total:,} trainable" in caplog.text, "counts logged at start"
    hparams = (Path(cli.trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert f"parameters/trainable: {trainable_count}" in hparams
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, TrainableWeightsCheckpoint))
    file = callback.path(cli.trainer)
    assert file.parent == Path(cli.trainer.checkpoint_callback.dirpath) and file.exists()
    fresh = main([*args, "--trainer.max_steps=0", "--trainer.callbacks=[]"]).model
    trained = dict(cli.model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh.named_parameters()), "training changed something"
    assert isinstance(fresh, SafetyAlignModule)
    fresh.load_trainable(file)
    for name, param in fresh.named_parameters():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0)
    checkpoint_size = next(file.parent.glob("*.ckpt")).stat().st_size
    assert file.stat().st_size < checkpoint_size, "weights only: no optimizer state"
    other_seed = main([*args, "--trainer.max_steps=0", "--trainer.callbacks=[]", "--seed_everything=1"]).model
    with pytest.raises(ValueError, match="trained with another frozen 'vision' than this model's"):
        other_seed.load_trainable(file)  # its random tower is not the one the projector learned to read


def test_export_cli_writes_a_llava_hf_folder_with_the_training_template(tiny_llava_path, tmp_path):
    model = finetuned(tiny_llava_path)
    file = tmp_path / "trainable.safetensors"
    save_trainable(file, trainable_state_dict(model), lora=LORA, chat_template=LLAVA_V1_CHAT_TEMPLATE)
    out = tmp_path / "exported"
    llava = [f"--model.llava.path={tiny_llava_path}", "--model.llava.chat_template=llava_v1"]
    export_main(["--config", CONFIG, *LLAVA_SOURCE, *llava, f"--ckpt_path={file}", f"--output={out}"])
    exported = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, model.image_token_id] + [model.image_token_id] * 24 + [7, 8]])
    pixels = torch.linspace(-1, 1, 3 * 30 * 30).reshape(1, 3, 30, 30)
    with torch.no_grad():
        expected = exported(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    assert (out / "chat_template.jinja").read_text() == LLAVA_V1_CHAT_TEMPLATE


def test_finetune_a_llava_hf_checkpoint_and_export_it_for_transformers(tiny_llava_path, tmp_path):
    """The user path: fit from a llava-hf folder, then export the run from its saved config and newest checkpoint."""
    args = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", *LLAVA_SOURCE]
    args += [f"--model.llava.path={tiny_llava_path}", "--model.llava.chat_template=llava_v1"]
    callbacks = json.dumps([{"class_path": "mllm_safety.train.checkpoints.TrainableWeightsCheckpoint"}])
    cli = main([*args, f"--trainer.callbacks={callbacks}"])
    saved_config = Path(cli.trainer.log_dir) / "config.yaml"
    out = tmp_path / "exported"
    export_main(["--config", str(saved_config), "--ckpt_path=last", f"--output={out}"])
    trained = cli.model.model.eval()
    exported = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6] + [trained.image_token_id] * 25 + [7, 8]])
    pixels = torch.linspace(-1, 1, 3 * 30 * 30).reshape(1, 3, 30, 30)
    with torch.no_grad():
        expected = exported(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits(trained), expected, atol=1e-5, rtol=0)
    base = load_llava_hf(tiny_llava_path).eval()
    assert (logits(base) - expected).abs().max() > 1e-4, "training moved the exported weights"
    assert (out / "chat_template.jinja").read_text() == LLAVA_V1_CHAT_TEMPLATE
