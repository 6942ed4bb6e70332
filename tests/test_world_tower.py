"""Stage 1, the reading tower: a short pretraining writes weights that a world model loads with init_weights."""

import numpy as np
import torch
from safetensors import safe_open

from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import SafetyAlignModule, TrainableParts
from mllm_safety.world.tower import BLANK, Boards, TowerSettings, pretrain, reading_vocab, world_texts
from mllm_safety.world.typography import CELL, GRID, IMAGE_SIZE, glyph


def test_the_reading_vocabulary_covers_every_token_of_the_world(tokenizer):
    vocab = reading_vocab(tokenizer, 100, world_texts(200))
    for text in world_texts(200)[:300]:
        assert set(tokenizer(text, add_special_tokens=False)["input_ids"]) <= set(vocab), text
    assert tokenizer(BLANK, add_special_tokens=False)["input_ids"][0] in vocab


def test_every_token_the_tower_reads_looks_unlike_every_other(tokenizer):
    # byte-fallback pieces (<0xE2>, ...) all decode to U+FFFD: one glyph for a hundred tokens caps reading at ~92%
    vocab = reading_vocab(tokenizer, 300, world_texts(200))
    glyphs = {glyph(tokenizer.decode([i])).tobytes() for i in vocab if tokenizer.decode([i]) != BLANK}
    assert len(glyphs) == len(vocab) - 1


def test_boards_name_the_token_of_every_cell(tokenizer):
    """Each cell's pixels are the glyph of the token its target names (blank cells are white), so a board drawn in
    another order or offset than its targets fails."""
    vocab = reading_vocab(tokenizer, 100, world_texts(20))
    pieces = {i: tokenizer.decode([i]) for i in vocab}
    blank = tokenizer(BLANK, add_special_tokens=False)["input_ids"][0]
    images, targets = Boards(vocab, pieces, blank, lambda image: torch.from_numpy(np.array(image)), seed=0).batch(6)
    assert images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and targets.shape == (6, GRID * GRID)
    assert set(targets.flatten().tolist()) <= set(vocab)
    assert max(len(set(row)) for row in targets.tolist()) > 2, "a board holds several tokens, so order shows"
    for image, row in zip(images.numpy(), targets.tolist(), strict=True):
        text = [t for t in row if t != blank]
        assert row == text + [blank] * (len(row) - len(text)), "text first, blanks after"
        for index, token in enumerate(row):
            top, left = (CELL * k for k in divmod(index, GRID))
            cell = image[top : top + CELL, left : left + CELL]
            assert (cell == cell[..., :1]).all(), "black on white, grey only"
            ink = 255 - cell[..., 0]
            expected = np.zeros((CELL, CELL), np.uint8) if token == blank else glyph(pieces[token])
            assert np.array_equal(ink, expected), f"cell {index} does not show {pieces[token]!r}"


def test_a_short_pretraining_writes_a_tower_the_world_model_loads(tmp_path):
    out = tmp_path / "tower.safetensors"
    figures = pretrain(TowerSettings(output=str(out), steps=2, batch_size=2, frequent_tokens=10, eval_every=2))
    assert 0.0 <= figures["token_lookup"] <= 1.0 and figures["vocab"] > 1000
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
    assert {n.split(".")[0] for n in names} == {"vision", "projector"}
    module = SafetyAlignModule(
        vision=VisionConfig(name="world-vit", select_layer=-1),
        llm=LLMConfig(),
        lora=LoraSettings(r=2, alpha=4),
        trainable=TrainableParts(projector=True, lora=False),
        init_weights=[str(out)],
    )
    params = dict(module.model.named_parameters())
    with safe_open(str(out), "pt") as f:
        for name in names:
            assert torch.equal(params[name], f.get_tensor(name)), name
