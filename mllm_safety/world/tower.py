"""Stage 1: ``python -m mllm_safety.world.tower --config configs/world/stage1.yaml``, a vision tower that reads.

The world's CLIP. A small ViT whose patches are the cells of the world's typography learns, from pixels, to name
the token written in each cell (a classifier over the reading vocabulary; blank cells stand for a space), and the
model's projector learns, from the tower's features, to write what was read as the LLM's input embedding of that
token (a squared error plus a cross-entropy on cosine similarities to the vocabulary's embeddings). An image of a
text then reaches the LLM as the text; stage 2 aligns the projector further through the LLM itself. The tower
never sees a request: it reads boards of tokens drawn at random from the reading vocabulary (every token of the
world's texts and the LLM's most frequent pieces).

Writes a trainable-weights file (``vision.*`` and ``projector.*``) that a fit loads with ``model.init_weights``.
The run is seeded: the same settings on the same software give the same file.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jsonargparse import auto_cli
from torch import nn
from transformers import PreTrainedTokenizerBase

from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer
from mllm_safety.model.projector import build_projector
from mllm_safety.model.trainable import save_trainable
from mllm_safety.model.vision import VisionConfig, build_vision_encoder
from mllm_safety.world import bank
from mllm_safety.world.typography import GRID, fits, glyph, render_board

log = logging.getLogger(__name__)

BLANK = " "
"""What a blank cell stands for: the embedding of a single space."""


def world_texts(count: int = 4000, seed: int = 0) -> list[str]:
    """Every text the world writes on a board: the request pairs and answers, and many everyday questions,
    answers and sentences."""
    rng = random.Random(seed)
    texts = [t for p in bank.load_pairs() for t in (p.harmful, p.benign, p.answer)]
    for _ in range(count):
        q = bank.question(rng)
        texts += [q.question, q.answer, bank.sentence(rng)]
    return texts


def reading_vocab(tokenizer: PreTrainedTokenizerBase, frequent: int, extra_texts: list[str]) -> list[int]:
    """Token ids the tower learns to read: those below ``frequent`` (BPE merges come roughly in order of frequency)
    and every token of ``extra_texts``, where the piece fits a cell; plus the blank."""
    ids = set(range(frequent))
    for encoded in tokenizer(extra_texts, add_special_tokens=False)["input_ids"]:
        ids.update(encoded)
    blank = tokenizer(BLANK, add_special_tokens=False)["input_ids"]
    if len(blank) != 1:
        raise ValueError(f"the tokenizer writes a space as {len(blank)} tokens; the blank cell needs one")
    readable = {i for i in ids if fits(tokenizer.decode([i]))}
    return sorted(readable | set(blank))


@dataclass
class TowerSettings:
    """How the reading tower is pretrained."""

    output: str = "runs/world/stage1/trainable.safetensors"
    """The trainable-weights file to write (vision tower and projector)."""
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(name="world-vit", select_layer=-1))
    """The tower (an open_clip ViT whose patch size is the world's cell)."""
    projector: str = "mlp2x_gelu"
    """The projector mapping the tower's tokens to the LLM's embeddings (as ``model.projector``)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The LLM whose input embeddings the tower learns to produce."""
    frequent_tokens: int = 2000
    """Token ids below this join the reading vocabulary (besides every token of the world's texts)."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 32
    """Boards per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate of the projector (cosine decay after 5% warmup)."""
    vision_lr: float = 1e-4
    """Peak learning rate of the tower (from its seeded, PCA-started initialisation); 0 freezes it, so that only the
    projector learns to read its features (cheaper per step, but attention then mixes neighbouring cells in: token
    lookup 0.97 after 500 steps, where the trained tower had 0.99 after 250)."""
    classifier_lr: float = 1e-2
    """Peak learning rate of the reading classifier on the tower's features."""
    temperature: float = 0.1
    """Softmax temperature on the cosine similarities of the projector's output to the vocabulary's embeddings."""
    seed: int = 0
    """Seed of initialisation and boards."""
    eval_every: int = 250
    """Steps between token-lookup checks on fixed, unjittered boards."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice); the shipped weights were trained with 1, and the same
    settings on the same software give the same file only with the same thread count."""

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.eval_every, self.frequent_tokens) < 1:
            raise ValueError("steps, batch_size, eval_every and frequent_tokens must be >= 1")
        if min(self.lr, self.classifier_lr, self.temperature) <= 0 or self.vision_lr < 0:
            raise ValueError("lr, classifier_lr and temperature must be > 0, vision_lr >= 0")


class Boards:
    """Random boards of reading-vocabulary tokens and their per-cell targets."""

    def __init__(self, vocab: list[int], pieces: dict[int, str], blank: int, transform, seed: int) -> None:
        self.vocab, self.pieces, self.blank, self.transform = vocab, pieces, blank, transform
        self.readable = [i for i in vocab if i != blank]
        self.rng = random.Random(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        for _ in range(size):
            n = self.rng.randint(1, GRID * GRID)
            ids = self.rng.choices(self.readable, k=n)
            image = render_board([self.pieces[i] for i in ids])
            images.append(self.transform(image))
            targets.append(ids + [self.blank] * (GRID * GRID - n))
        return torch.stack(images), torch.tensor(targets)


def pretrain(settings: TowerSettings) -> dict[str, float]:
    """Train the tower and its projector, write them to ``settings.output``; returns the final lookup accuracy."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(settings.llm)
    embeddings = load_llm(settings.llm, tokenizer, torch.float32).get_input_embeddings().weight.detach().clone()
    vocab = reading_vocab(tokenizer, settings.frequent_tokens, world_texts())
    blank = tokenizer(BLANK, add_special_tokens=False)["input_ids"][0]
    pieces = {i: tokenizer.decode([i]) for i in vocab}
    for i in vocab:
        glyph(pieces[i])  # draw every piece once up front: boards are then composed from cached ink
    log.info("reading vocabulary: %d tokens", len(vocab))

    encoder = build_vision_encoder(settings.vision)
    init_patch_embedding(encoder, Boards(vocab, pieces, blank, encoder.image_transform, settings.seed + 2))
    projector = build_projector(settings.projector, encoder.hidden_size, embeddings.shape[1])
    classifier = nn.Linear(encoder.hidden_size, len(vocab))
    parts = nn.ModuleDict({"vision": encoder, "projector": projector, "classifier": classifier})
    encoder.requires_grad_(settings.vision_lr > 0)
    groups = [(projector, settings.lr), (classifier, settings.classifier_lr)]
    groups += [(encoder, settings.vision_lr)] if settings.vision_lr > 0 else []
    optimizer = torch.optim.AdamW([{"params": m.parameters(), "lr": lr} for m, lr in groups], weight_decay=0.01)
    warmup = max(1, settings.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    boards = Boards(vocab, pieces, blank, encoder.image_transform, settings.seed)
    check = Boards(vocab, pieces, blank, encoder.image_transform, settings.seed + 1).batch(256)
    vocab_tensor = torch.tensor(vocab)
    table = embeddings[vocab_tensor]
    unit_table = F.normalize(table, dim=-1)
    scale = table.pow(2).sum(-1).mean()
    start, figures = time.time(), {}
    for step in range(settings.steps):
        images, targets = boards.batch(settings.batch_size)
        goal = torch.searchsorted(vocab_tensor, targets.flatten())
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(settings.vision_lr > 0):
            features = encoder(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = classifier(features).float().flatten(0, 1)
            out = projector(features.detach()).float().flatten(0, 1)
        # the classifier shows (and, when it trains, teaches the tower) reading; the projector writes it as embeddings
        similarity = F.normalize(out, dim=-1) @ unit_table.T / settings.temperature
        mse = F.mse_loss(out, table[goal], reduction="sum") / (len(goal) * scale)
        loss = F.cross_entropy(logits, goal) + F.cross_entropy(similarity, goal) + mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            figures = _check(parts, *check, unit_table, vocab_tensor, blank)
            seconds = time.time() - start
            log.info("step %d/%d loss %.4f %s (%.0fs)", step + 1, settings.steps, loss.item(), figures, seconds)
    model = nn.ModuleDict({"vision": encoder, "projector": projector})
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_trainable(Path(settings.output), state)
    log.info("wrote %s", settings.output)
    return {**figures, "vocab": float(len(vocab)), "seconds": time.time() - start}


@torch.no_grad()
def init_patch_embedding(encoder: nn.Module, boards: Boards) -> None:
    """Start the patch embedding at the principal components of the vocabulary's glyphs (each written once, whitened),
    so the tower tells pieces apart from the first step instead of first discovering what varies between them."""
    conv = encoder.visual.conv1
    size, cells_per_board = conv.kernel_size[0], GRID * GRID
    readable = boards.readable
    images = torch.stack(
        [
            boards.transform(render_board([boards.pieces[i] for i in readable[start : start + cells_per_board]]))
            for start in range(0, len(readable), cells_per_board)
        ]
    )
    cells = images.unfold(2, size, size).unfold(3, size, size).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(0, 2)
    cells = cells[: len(readable)]  # the last board's blank cells are not glyphs
    mean = cells.mean(0)
    _, singular, components = torch.linalg.svd(cells - mean, full_matrices=False)
    width = conv.out_channels
    scale = (singular[:width] / (len(cells) - 1) ** 0.5).clamp(min=1e-3)
    conv.weight.copy_((components[:width] / scale[:, None]).reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(-(conv.weight.flatten(1) @ mean))


@torch.no_grad()
def _check(parts: nn.ModuleDict, images, targets, unit_table, vocab, blank: int) -> dict[str, float]:
    """Token lookup on fixed, unjittered boards: the projector's output is nearest (cosine) to the embedding of the
    token written in the cell (``token_lookup``), and the classifier names it (``classifier``); non-blank cells."""
    features = torch.cat([parts["vision"](chunk) for chunk in images.split(64)])
    keep = targets != blank
    out = F.normalize(parts["projector"](features)[keep], dim=-1)
    lookup = (vocab[(out @ unit_table.T).argmax(-1)] == targets[keep]).float().mean().item()
    named = (vocab[parts["classifier"](features)[keep].argmax(-1)] == targets[keep]).float().mean().item()
    return {"token_lookup": round(lookup, 4), "classifier": round(named, 4)}


def main(args: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return pretrain(auto_cli(TowerSettings, args=args, as_positional=False))


if __name__ == "__main__":
    main()
