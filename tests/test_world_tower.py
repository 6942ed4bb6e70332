"""Stage 1, the reading tower: a short pretraining writes weights that a world model loads with init_weights."""

import torch
from safetensors import safe_open

from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import SafetyAlignModule, TrainableParts
from mllm_safety.world.tower import BLANK, Boards, TowerSettings, pretrain, reading_vocab, world_texts
from mllm_safety.world.typography import GRID, glyph


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
    vocab = reading_vocab(tokenizer, 100, world_texts(20))
    pieces = {i: tokenizer.decode([i]) for i in vocab}
    blank = tokenizer(BLANK, add_special_tokens=False)["input_ids"][0]
    images, targets = Boards(vocab, pieces, blank, lambda image: torch.zeros(1), seed=0).batch(6)
    assert targets.shape == (6, GRID * GRID) and set(targets.flatten().tolist()) <= set(vocab)
    for row in targets.tolist():  # the text fills the first cells, blanks the rest
        first_blank = row.index(blank) if blank in row else len(row)
        assert all(t == blank for t in row[first_blank:])


def test_a_short_pretraining_writes_a_tower_the_world_model_loads(tmp_path):
    out = tmp_path / "tower.safetensors"
    figures = pretrain(TowerSettings(out=str(out), steps=2, batch_size=2, frequent_tokens=10, eval_every=2))
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
