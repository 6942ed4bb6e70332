"""Demo benign instruction-tuning data, generated rather than downloaded, so the whole pipeline runs offline.

Image samples are scenes of one to three coloured shapes with questions whose answers are computed from the scene
(names, colours, counts, left/right), so a model that learns from them learns something checkable. About 30% of the
samples are text-only everyday Q&A (arithmetic, unit conversion, capitals, spelling, synonyms), as in LLaVA's
instruction mix, so the text-only path is exercised too. Everything derives from one ``random.Random(seed)``: the
same seed gives the same samples, pixels and shard bytes.

Shards follow the project layout (:class:`~mllm_safety.data.manifest.ShardSetWriter`, source ``demo``; members
``json`` and, for image samples, ``png``) plus a ``manifest.json`` that records the parameters, so a cache directory
is reused only when it matches the request.
"""

import io
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mllm_safety.data.manifest import Manifest, ShardSetWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
    "orange": (249, 115, 22),
}
SHAPES = ("circle", "square", "triangle")
TEXT_ONLY_FRACTION = 0.3
MIN_IMAGE_SIZE = 64
SOURCE = "demo"
_VERSION = 2
"""Bump when generation changes, so caches written by an older version are regenerated rather than reused."""

_NUMBERS = ("no", "one", "two", "three")
_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "Norway": "Oslo",
    "Argentina": "Buenos Aires",
}
_SYNONYMS = {
    "happy": "glad",
    "big": "large",
    "quick": "fast",
    "small": "little",
    "begin": "start",
    "difficult": "hard",
    "smart": "clever",
    "quiet": "silent",
    "angry": "mad",
    "tired": "sleepy",
}
_WORDS = ("apple", "garden", "window", "planet", "yellow", "river", "pencil", "bridge", "castle", "morning")
_UNITS = (
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
)


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``radius`` is half the side of a square or of a triangle's base and height."""

    kind: str
    colour: str
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class DemoSample:
    """A LLaVA-layout conversation record, its PNG (None for text-only) and the scene the answers describe."""

    record: dict
    png: bytes | None
    scene: tuple[Shape, ...]
    """Shapes from left to right; empty for a text-only sample."""


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _count(n: int, noun: str) -> str:
    return f"There is one {noun}." if n == 1 else f"There are {_NUMBERS[n]} {noun}s."


def _sample_scene(rng: random.Random, image_size: int) -> tuple[Shape, ...]:
    """1-3 distinct (kind, colour) shapes, each in its own vertical band so left/right is never ambiguous."""
    pairs = rng.sample([(kind, colour) for kind in SHAPES for colour in COLOURS], rng.randint(1, 3))
    band = image_size // len(pairs)
    shapes = []
    for i, (kind, colour) in enumerate(pairs):
        radius = rng.randint(max(3, band // 6), band // 3)
        x = rng.randint(i * band + radius + 2, (i + 1) * band - radius - 2)
        y = rng.randint(radius + 2, image_size - radius - 2)
        shapes.append(Shape(kind, colour, x, y, radius))
    return tuple(shapes)


def _draw_scene(rng: random.Random, scene: tuple[Shape, ...], image_size: int) -> bytes:
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    for s in scene:
        box = (s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius)
        if s.kind == "circle":
            draw.ellipse(box, fill=COLOURS[s.colour])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLOURS[s.colour])
        else:
            corners = [(s.x, s.y - s.radius), (s.x - s.radius, s.y + s.radius), (s.x + s.radius, s.y + s.radius)]
            draw.polygon(corners, fill=COLOURS[s.colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_QA = tuple[str, str]


def _what_shapes(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    question = rng.choice(("What shapes are in this picture?", "Which shapes can you see in the image?"))
    return question, f"There is {_listing([_a(s.name) for s in scene])}."


def _how_many_shapes(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    question = rng.choice(("How many shapes are in the image?", "How many shapes can you count in this picture?"))
    return question, _count(len(scene), "shape")


def _how_many_of_kind(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    kind = rng.choice(SHAPES)
    return f"How many {kind}s are there in the image?", _count(sum(s.kind == kind for s in scene), kind)


def _colour_of(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    unique = [s for s in scene if sum(t.kind == s.kind for t in scene) == 1]
    if not unique:
        return None
    s = rng.choice(unique)
    return f"What colour is the {s.kind}?", f"The {s.kind} is {s.colour}."


def _is_there(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    present = {s.name for s in scene}
    if rng.random() < 0.5:
        name = rng.choice(sorted(present))
    else:
        name = rng.choice(sorted(f"{c} {k}" for k in SHAPES for c in COLOURS if f"{c} {k}" not in present))
    question = f"Is there {_a(name)} in the image?"
    return question, f"Yes, there is {_a(name)}." if name in present else f"No, there is no {name}."


def _furthest(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    if len(scene) < 2:
        return None
    side = rng.choice(("left", "right"))
    s = scene[0] if side == "left" else scene[-1]
    return f"Which shape is furthest to the {side}?", f"The {s.name} is furthest to the {side}."


def _left_or_right(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    if len(scene) < 2:
        return None
    i, j = rng.sample(range(len(scene)), 2)
    a, b = scene[i].name, scene[j].name
    side = "left" if i < j else "right"
    return f"Is the {a} to the left or to the right of the {b}?", f"The {a} is to the {side} of the {b}."


DESCRIBE_PROMPT = "Describe the image briefly."
"""The description question of the training scenes, also asked of held-out scenes (the world's description check)."""


def _describe(rng: random.Random, scene: tuple[Shape, ...]) -> _QA | None:
    shapes = _listing([_a(s.name) for s in scene])
    order = "" if len(scene) == 1 else ", from left to right"
    return DESCRIBE_PROMPT, f"The image shows {shapes} on a light background{order}."


_IMAGE_QA: tuple[Callable[[random.Random, tuple[Shape, ...]], _QA | None], ...] = (
    _what_shapes,
    _how_many_shapes,
    _how_many_of_kind,
    _colour_of,
    _is_there,
    _furthest,
    _left_or_right,
    _describe,
)


def _arithmetic(rng: random.Random) -> _QA:
    op = rng.choice(("plus", "minus", "times"))
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    result = a + b if op == "plus" else a - b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {result}."


def _units(rng: random.Random) -> _QA:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 20)
    return f"How many {small} are in {n} {big}?", f"There are {n * factor} {small} in {n} {big}."


def _capital(rng: random.Random) -> _QA:
    country = rng.choice(sorted(_CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."


def _backwards(rng: random.Random) -> _QA:
    word = rng.choice(_WORDS)
    return f'Spell the word "{word}" backwards.', f'"{word}" spelled backwards is "{word[::-1]}".'


def _synonym(rng: random.Random) -> _QA:
    word = rng.choice(sorted(_SYNONYMS))
    return f'What is a synonym for "{word}"?', f'A synonym for "{word}" is "{_SYNONYMS[word]}".'


def _letters(rng: random.Random) -> _QA:
    word = rng.choice(_WORDS)
    return f'How many letters are in the word "{word}"?', f'The word "{word}" has {len(word)} letters.'


_TEXT_QA: tuple[Callable[[random.Random], _QA], ...] = (_arithmetic, _units, _capital, _backwards, _synonym, _letters)


def _conversation(pairs: list[_QA], image: bool) -> list[dict[str, str]]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        prompt = f"<image>\n{question}" if image and i == 0 else question
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return turns


def _sample(rng: random.Random, index: int, image_size: int) -> DemoSample:
    sample_id = f"demo-{index:06d}"
    turns = rng.randint(1, 3)
    if rng.random() < TEXT_ONLY_FRACTION:
        pairs = [make(rng) for make in rng.sample(_TEXT_QA, turns)]
        return DemoSample({"id": sample_id, "conversations": _conversation(pairs, image=False)}, None, ())
    scene = _sample_scene(rng, image_size)
    png = _draw_scene(rng, scene, image_size)
    candidates = [qa for make in _IMAGE_QA if (qa := make(rng, scene)) is not None]
    pairs = rng.sample(candidates, min(turns, len(candidates)))
    record = {"id": sample_id, "image": f"{sample_id}.png", "conversations": _conversation(pairs, image=True)}
    return DemoSample(record, png, scene)


def generate_demo_samples(num_samples: int, seed: int = 0, image_size: int = 224) -> Iterator[DemoSample]:
    """Yield ``num_samples`` samples, identical for the same seed; a shorter run is a prefix of a longer one."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} so the shapes stay recognisable, got {image_size}")
    rng = random.Random(seed)
    return (_sample(rng, index, image_size) for index in range(num_samples))


HELD_OUT_SEED = "demo-held-out"
"""The random stream of the held-out scenes: a string, so no integer training seed can reproduce it."""
HELD_OUT_KINDS = ("colour", "count", "presence", "side")


@dataclass(frozen=True)
class SceneQuestion:
    """A question about a held-out scene whose answer can be checked: a colour, a number word, yes/no, left/right."""

    id: str
    png: bytes
    question: str
    kind: str
    """One of :data:`HELD_OUT_KINDS`."""
    answer: str


def _checkable_question(rng: random.Random, kind: str, scene: tuple[Shape, ...]) -> tuple[str, str] | None:
    """A question of ``kind`` phrased as in the training data, and its one-word answer (None if the scene has
    none)."""
    if kind == "colour":
        unique = [s for s in scene if sum(t.kind == s.kind for t in scene) == 1]
        return (f"What colour is the {(s := rng.choice(unique)).kind}?", s.colour) if unique else None
    if kind == "count":
        return "How many shapes are in the image?", _NUMBERS[len(scene)]
    if kind == "presence":
        present = {s.name for s in scene}
        absent = sorted(f"{c} {k}" for k in SHAPES for c in COLOURS if f"{c} {k}" not in present)
        name = rng.choice(sorted(present)) if rng.random() < 0.5 else rng.choice(absent)
        return f"Is there {_a(name)} in the image?", "yes" if name in present else "no"
    if len(scene) < 2:
        return None
    i, j = rng.sample(range(len(scene)), 2)
    question = f"Is the {scene[i].name} to the left or to the right of the {scene[j].name}?"
    return question, "left" if i < j else "right"


@dataclass(frozen=True)
class SceneDescription:
    """A held-out scene to describe: its image and the shapes a full description names."""

    id: str
    png: bytes
    shapes: tuple[str, ...]
    """Each shape's name ("red circle"), left to right."""


def held_out_scene_descriptions(num_scenes: int, image_size: int, stream: str) -> list[SceneDescription]:
    """Scenes drawn from the random ``stream`` (a string, so no integer training seed reproduces it), to be described:
    the image-description utility that the paper reports dropping after its finetuning."""
    rng = random.Random(stream)
    out = []
    for index in range(num_scenes):
        scene = _sample_scene(rng, image_size)
        png = _draw_scene(rng, scene, image_size)
        out.append(SceneDescription(f"scene-{index:03d}", png, tuple(s.name for s in scene)))
    return out


def held_out_scene_questions(num_questions: int, image_size: int = 224) -> list[SceneQuestion]:
    """Questions about scenes drawn from their own random stream (:data:`HELD_OUT_SEED`), kinds in turn: demo-world
    images never seen in training, with answers a scorer can check."""
    rng = random.Random(HELD_OUT_SEED)
    out: list[SceneQuestion] = []
    while len(out) < num_questions:
        kind = HELD_OUT_KINDS[len(out) % len(HELD_OUT_KINDS)]
        scene = _sample_scene(rng, image_size)
        qa = _checkable_question(rng, kind, scene)
        if qa is not None:
            png = _draw_scene(rng, scene, image_size)
            out.append(SceneQuestion(f"held-out-{len(out):03d}", png, qa[0], kind, qa[1]))
    return out


def _existing_shards(out_dir: Path, source: str, params: dict) -> list[Path] | None:
    """The shards of a complete set written with ``params``, or None if there is none to reuse."""
    try:
        manifest = Manifest.read(out_dir)
    except (OSError, ValueError):
        return None
    if manifest is None or manifest.params.get(source) != params:
        return None
    shards = [out_dir / entry.name for entry in manifest.shards]
    return shards if shards and all(shard.is_file() for shard in shards) else None


def write_demo_shards(
    out_dir: str | Path, num_samples: int = 512, seed: int = 0, shard_size: int = 128, image_size: int = 224
) -> list[Path]:
    """Write the demo set as webdataset shards plus ``manifest.json`` and return the shard paths.

    Reuses a complete set with the same parameters untouched (see :func:`write_generated_shards`).
    """
    params = {
        "version": _VERSION,
        "num_samples": num_samples,
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
    }
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples} and {shard_size}")
    samples = (
        (s.record, ("png", s.png) if s.png else None) for s in generate_demo_samples(num_samples, seed, image_size)
    )
    return write_generated_shards(out_dir, SOURCE, params, samples, shard_size)


def write_generated_shards(
    out_dir: str | Path,
    source: str,
    params: dict,
    samples: Iterable[tuple[dict, tuple[str, bytes] | None]],
    shard_size: int = 128,
) -> list[Path]:
    """Write generated ``(record, image)`` samples as one source's shards plus ``manifest.json``; the shard paths.

    ``params`` records how the set was made: a complete set under ``out_dir`` with the same ``params`` is reused
    untouched (and ``samples`` not consumed). Otherwise the set is written to a temporary sibling directory and
    renamed into place, so an interrupted run or a concurrent writer never leaves a half-written set under
    ``out_dir``; if another process installs the same set first, its copy is kept.
    """
    out_dir = Path(out_dir)
    if (shards := _existing_shards(out_dir, source, params)) is not None:
        return shards
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        with ShardSetWriter(tmp, source, shard_size) as writer:
            for record, image in samples:
                writer.write(record["id"], record, image)
        Manifest(shards=writer.entries, params={source: params}).write(tmp)
        _install(tmp, out_dir, source, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out_dir / entry.name for entry in writer.entries]


def _install(tmp: Path, out_dir: Path, source: str, params: dict) -> None:
    """Move a finished set into place with one rename, first moving aside anything stale already there."""
    if _existing_shards(out_dir, source, params) is not None:
        return
    stale = out_dir.with_name(f".{out_dir.name}.stale-{uuid.uuid4().hex}")
    if out_dir.exists():
        out_dir.rename(stale)
    try:
        tmp.rename(out_dir)
    except OSError:
        if _existing_shards(out_dir, source, params) is None:
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def ensure_demo_shards(
    cache_dir: str | Path, num_samples: int = 512, seed: int = 0, image_size: int = 224
) -> list[Path]:
    """The demo shards for these parameters under ``cache_dir``, generated on first use.

    The folder name carries the format version, so checkouts of different versions sharing a cache never rewrite
    each other's sets.
    """
    out_dir = Path(cache_dir) / f"demo-v{_VERSION}-n{num_samples}-s{seed}-px{image_size}"
    return write_demo_shards(out_dir, num_samples=num_samples, seed=seed, image_size=image_size)
