"""Reading webdataset shards safely: only JSON and image members are decoded, nothing is ever unpickled."""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image

from mllm_safety.data.conversation import Conversation, SampleError, parse_llava_record

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns: str | list[str]) -> list[str]:
    """Brace- and glob-expand shard patterns (``data/train-{000..009}.tar``, ``data/*.tar``) into sorted paths."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise FileNotFoundError(f"shard pattern {pattern!r} matches no file ({expanded!r} does not exist)")
            paths += matches
    return paths


def read_manifest(shards: list[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` written beside the shards by this project's writers, if all shards share one."""
    folders = {Path(shard).parent for shard in shards}
    if len(folders) != 1:
        return None
    manifest = folders.pop() / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else None


def decode_sample(raw: dict[str, Any]) -> Conversation:
    """A raw webdataset sample (member name -> bytes) to a validated :class:`Conversation`.

    Members other than ``json`` and one image are ignored, never decoded: webdataset's default decoders would
    unpickle ``.pyd``/``.pickle`` members, which runs arbitrary code from whoever wrote the shard.
    """
    key = raw.get("__key__", "<no key>")
    where = f"{key} in {raw.get('__url__', '<unknown shard>')}"
    if "json" not in raw:
        raise SampleError(where, "bad_json", "no .json member")
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError(where, "bad_json", f"invalid JSON: {error}") from error
    if not isinstance(record, dict):
        raise SampleError(where, "bad_json", "the .json member is not an object")
    record.setdefault("id", key)
    image_keys = [ext for ext in IMAGE_EXTENSIONS if ext in raw]
    image = None
    if image_keys:
        try:
            image = Image.open(io.BytesIO(raw[image_keys[0]]))
            image.load()
        except Exception as error:  # PIL raises many types for corrupt files
            raise SampleError(where, "bad_image", f"unreadable .{image_keys[0]} member: {error}") from error
    try:
        return parse_llava_record(record, image)
    except SampleError as error:
        raise SampleError(where, error.reason, error.detail) from None


def iter_conversations(shard: str) -> Iterator[Conversation]:
    """All samples of one shard, in order (for inspection and tests; training uses the streaming pipeline)."""
    for raw in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()):
        yield decode_sample(raw)
