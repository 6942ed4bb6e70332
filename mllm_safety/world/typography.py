"""The world's typography: text laid out one LLM token per cell of a grid, the cells aligned with the tower's patches.

A tower of this size cannot learn to read free-flowing text in the minutes a laptop has, but it can learn to read
one word-piece per patch: the image is a ``grid x grid`` board of ``cell``-pixel cells, each holding the characters
of one token of the text (its leading space drawn as a space), wrapped over up to three lines, in reading order;
the cells after the text stay blank. The world's vision tower (stage 1) learns to turn each cell into the LLM's
embedding of the token written in it, so an image of a request reaches the LLM as that request, in its own words.

The font is Pillow's bundled one and every piece sits at its cell's top left, so the same text gives the same
pixels on every machine and in every stage: reading, in this world, is recognising the world's one typeface.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GRID = 5
"""Cells per side: a board holds GRID * GRID tokens."""
CELL = 32
"""Cell side in pixels; the tower's patch size."""
IMAGE_SIZE = GRID * CELL
"""Side of a board image in pixels."""
MAX_PIECE_LINES = 3
_FONT_SIZES = (9, 8, 7)
_MARGIN = 1


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(piece: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Characters wrapped greedily by rendered width (pieces have no spaces inside, so wrap anywhere)."""
    lines, line = [], ""
    for char in piece:
        if line and font.getlength(line + char) > width:
            lines.append(line)
            line = char
        else:
            line += char
    return [*lines, line] if line else lines


@cache
def _layout(piece: str) -> tuple[int, tuple[str, ...]] | None:
    """(font size, lines) of the largest font that fits ``piece`` into a cell, or None when none does."""
    width = CELL - 2 * _MARGIN
    for size in _FONT_SIZES:
        lines = _wrap(piece, _font(size), width)
        if len(lines) <= MAX_PIECE_LINES and len(lines) * (size + 1) <= CELL - 2 * _MARGIN:
            return size, tuple(lines)
    return None


def fits(piece: str) -> bool:
    """Whether ``piece`` can be written in one cell (printable, no line break, short enough)."""
    return piece.isprintable() and "\ufffd" not in piece and bool(piece.strip()) and _layout(piece) is not None


@cache
def glyph(piece: str) -> np.ndarray:
    """The ink of ``piece`` as a ``(CELL, CELL)`` uint8 array (255 = black), placed at the cell's top left."""
    layout = _layout(piece)
    if layout is None:
        raise ValueError(f"piece {piece!r} does not fit a {CELL}px cell")
    size, lines = layout
    image = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((_MARGIN, _MARGIN + row * (size + 1)), line, fill=255, font=_font(size), anchor="lt")
    return np.asarray(image)


def render_board(pieces: Sequence[str]) -> Image.Image:
    """The board image of ``pieces``: one per cell, in reading order, black on white."""
    if len(pieces) > GRID * GRID:
        raise ValueError(f"{len(pieces)} pieces do not fit a {GRID}x{GRID} board")
    ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for index, piece in enumerate(pieces):
        row, col = divmod(index, GRID)
        ink[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = glyph(piece)
    grey = 255 - ink
    return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
