"""An assembled model (model.llm + model.vision + mlp2x_gelu, as the demo) exports as a llava-hf folder.

The open_clip ViT becomes the CLIPVisionModel it is, the tokenizer gets an <image> token, and transformers computes
the trained model's logits from the exported folder, with the exported processor preparing images as training did.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.evaluate import main as evaluate_main
from mllm_safety.export import main as export_main
from mllm_safety.fit import main as fit_main
from mllm_safety.model.open_clip_to_hf import hf_vision_encoder
from mllm_safety.model.vision import OpenClipVisionEncoder, VisionConfig

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def picture():
    image = Image.new("RGB", (130, 70), "red")
    image.paste((0, 0, 255), (10, 10, 50, 40))
    return image


@pytest.mark.parametrize("keep_cls", [False, True])
def test_an_open_clip_tower_is_the_clip_vision_model_it_converts_to(keep_cls):
    torch.manual_seed(0)
    encoder = OpenClipVisionEncoder(VisionConfig(name="tiny-vit", select_layer=-2, keep_cls=keep_cls)).eval()
    converted = hf_vision_encoder(encoder)
    assert converted.tower.config.num_hidden_layers == 2, "the blocks up to the selected one"
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels), encoder(pixels), atol=1e-5, rtol=0)
    image = picture()
    torch.testing.assert_close(converted.image_transform(image), encoder.image_transform(image), atol=1e-5, rtol=0)
    square = Image.new("RGB", (200, 131), "green")  # crop mode: an odd excess, where the crops may differ by a pixel
    encoder.image_transform.aspect_ratio = converted.image_transform.aspect_ratio = "crop"
    assert converted.image_transform(square).shape == encoder.image_transform(square).shape


def test_the_demo_shaped_run_exports_as_a_llava_hf_folder_with_the_trained_logits(tmp_path):
    args = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"]
    callbacks = json.dumps([{"class_path": "mllm_safety.train.checkpoints.TrainableWeightsCheckpoint"}])
    cli = fit_main([*args, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.callbacks={callbacks}"])
    trained = cli.model.eval()
    image = picture()
    inputs = trained.processor.collate([trained.processor.prompt("a", "Describe it.", image)]).generation_inputs()
    with torch.no_grad():
        expected = trained.model(**inputs).logits
    run = ["--config", str(Path(cli.trainer.log_dir) / "config.yaml"), "--ckpt_path=last"]
    evaluation = tmp_path / "eval"
    benchmarks = json.dumps([{"name": "demo", "modes": ["text"], "limit": 2}])
    evaluate_args = [f"--output={evaluation}", f"--eval.benchmarks={benchmarks}", "--eval.judges=[xstest]"]
    evaluate_main([*run, *evaluate_args, "--eval.generation.max_new_tokens=3"])
    out = tmp_path / "exported"
    export_main([*run, f"--output={out}", f"--evaluation={evaluation}"])

    exported = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = inputs["input_ids"].clone()
    ids[ids == IMAGE_TOKEN_ID] = image_id
    with torch.no_grad():
        got = exported(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    vocab = expected.shape[-1]
    assert got.logits.shape[-1] == vocab + 1, "one more row: the <image> token"
    torch.testing.assert_close(got.logits[..., :vocab], expected, atol=1e-5, rtol=0)
    # the exported processor prepares the image as training did (pad to square, resize, normalise), and expands
    # <image> to as many tokens as the tower gives
    hf_inputs = processor(text="<image>\nDescribe it.", images=image, return_tensors="pt")
    torch.testing.assert_close(hf_inputs["pixel_values"], inputs["pixel_values"], atol=1e-5, rtol=0)
    assert int((hf_inputs["input_ids"] == image_id).sum()) == int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["vision_feature_layer"] == -1
    card = (out / "README.md").read_text()
    assert "an assembled model: the LLM `smollm2-135m-instruct` (random weights)" in card
    assert "open_clip `tiny-vit` (random weights)" in card
    assert "| demo_text | asr |" in card, "the card carries the evaluation's figures"
