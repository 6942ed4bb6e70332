"""Vision backends (open_clip, Hugging Face CLIP / SigLIP) and LLaVA-1.5's pad-to-square preprocessing."""

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mllm_safety.model.vision import (
    HFVisionEncoder,
    OpenClipVisionEncoder,
    VisionConfig,
    build_vision_encoder,
    expand_to_square,
)

TOWER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2}


@pytest.fixture
def clip_folder(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWER, image_size=30, patch_size=6)).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.fixture
def siglip_folder(tmp_path):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TOWER, image_size=32, patch_size=8)).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return str(tmp_path)


def reference_hidden(tower, pixels, layer):
    with torch.no_grad():
        return tower(pixels, output_hidden_states=True).hidden_states[layer]


@pytest.mark.parametrize(("select_layer", "keep_cls"), [(-2, False), (-1, True), (1, False)])
def test_hf_clip_gives_the_selected_hidden_state(clip_folder, select_layer, keep_cls):
    config = VisionConfig(backend="hf", path=clip_folder, select_layer=select_layer, keep_cls=keep_cls)
    encoder = build_vision_encoder(config)
    assert isinstance(encoder, HFVisionEncoder) and encoder.hidden_size == 48 and encoder.image_size == (30, 30)
    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        out = encoder(pixels)
    expected = reference_hidden(CLIPVisionModel.from_pretrained(clip_folder), pixels, select_layer)
    assert out.shape == (2, encoder.num_tokens, 48) and encoder.num_tokens == 25 + keep_cls
    torch.testing.assert_close(out, expected if keep_cls else expected[:, 1:])


def test_hf_clip_tower_loads_from_a_full_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(TOWER, image_size=30, patch_size=6),
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    clip = CLIPModel(config)
    clip.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(tmp_path)
    encoder = build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path)))
    pixels = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        expected = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(encoder(pixels), expected)


def test_hf_siglip_has_no_class_token_to_drop(siglip_folder):
    encoder = build_vision_encoder(VisionConfig(backend="hf", path=siglip_folder))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = encoder(pixels)
    assert encoder.num_tokens == 16 and out.shape == (1, 16, 48)
    torch.testing.assert_close(out, reference_hidden(SiglipVisionModel.from_pretrained(siglip_folder), pixels, -2))
    assert encoder.image_transform(Image.new("RGB", (50, 20), "red")).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="no class token"):
        build_vision_encoder(VisionConfig(backend="hf", path=siglip_folder, keep_cls=True))


def test_expand_to_square_pads_evenly_like_llava():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 9)) == (1, 2, 3) and square.getpixel((0, 10)) == (255, 0, 0)
    assert square.getpixel((39, 29)) == (255, 0, 0) and square.getpixel((39, 30)) == (1, 2, 3)
    tall = expand_to_square(Image.new("RGB", (11, 20), (255, 0, 0)), (0, 0, 0))
    assert tall.getpixel((3, 0)) == (0, 0, 0) and tall.getpixel((4, 0)) == (255, 0, 0)  # (20 - 11) // 2 = 4
    assert tall.getpixel((14, 0)) == (255, 0, 0) and tall.getpixel((15, 0)) == (0, 0, 0)


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_pad_keeps_the_whole_image_and_fills_with_the_mean_colour(clip_folder, backend):
    """A wide image: ``crop`` cuts its sides off, ``pad`` keeps them and adds mean-colour bands (≈0 once normalised)."""
    image = Image.new("RGB", (120, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 40))  # a red stripe at the left edge
    config = {"backend": "hf", "path": clip_folder} if backend == "hf" else {"name": "tiny-vit"}
    padded = build_vision_encoder(VisionConfig(**config, image_aspect_ratio="pad")).image_transform(image)
    cropped = build_vision_encoder(VisionConfig(**config, image_aspect_ratio="crop")).image_transform(image)
    size = padded.shape[-1]
    assert padded.shape == cropped.shape == (3, size, size)
    assert padded[:, :2].abs().max() < 0.02, "top band is the mean colour, zero after normalisation"
    middle = size // 2
    assert padded[0, middle, 0] > padded[2, middle, 0], "pad keeps the red stripe at the left edge"
    assert cropped[0, middle, 0] < cropped[2, middle, 0], "crop cuts it away"


def test_open_clip_backend_still_selects_blocks():
    encoder = build_vision_encoder(VisionConfig(name="tiny-vit", select_layer=-1, keep_cls=True))
    assert isinstance(encoder, OpenClipVisionEncoder) and encoder.num_tokens == 37


def test_hf_tower_dtype_follows_the_request(clip_folder):
    encoder = build_vision_encoder(VisionConfig(backend="hf", path=clip_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "hf"}, "needs vision.path"),
        ({"backend": "hf", "path": "x", "pretrained": "openai"}, "pretrained='openai' is for backend 'open_clip'"),
        ({"path": "some/folder"}, "vision.path='some/folder' is for backend 'hf'"),
        ({"backend": "timm"}, "unknown vision.backend 'timm'"),
        ({"image_aspect_ratio": "anyres"}, "unknown vision.image_aspect_ratio 'anyres'"),
        ({"name": "tiny-vit", "select_layer": 0}, "select_layer=0"),
    ],
)
def test_bad_vision_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(**kwargs)


def test_bad_hf_vision_folder_is_a_clear_error(tmp_path, clip_folder, tiny_llm):
    with pytest.raises(ValueError, match="select_layer=-9 is outside the 3 blocks"):
        build_vision_encoder(VisionConfig(backend="hf", path=clip_folder, select_layer=-9))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}.*config.json"):
        build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path / "empty")))
    tiny_llm.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=f"{tmp_path / 'llama'}.*'llama' model.*CLIP or SigLIP"):
        build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path / "llama")))
    (tmp_path / "no-processor").mkdir()
    CLIPVisionModel(CLIPVisionConfig(**TOWER, image_size=30, patch_size=6)).save_pretrained(tmp_path / "no-processor")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no-processor'}.*image processor config"):
        build_vision_encoder(VisionConfig(backend="hf", path=str(tmp_path / "no-processor")))
