"""A checkpoint folder whose tokenizer cannot be read: the error names the files it lacks, not the last reader tried.

Llama-2-era checkpoints (Yi-VL, LLaVA-NeXT-Mistral) ship their tokenizer as a sentencepiece ``tokenizer.model`` with
``tokenizer_class: LlamaTokenizer``; a folder keeping only that file needs the sentencepiece package.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece

from mllm_safety.model.hub_vlm import HubOptions, load_hub_vlm
from mllm_safety.model.llava_hf import load_llava_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def without_tokenizer(source: str, target: Path) -> Path:
    shutil.copytree(source, target)
    for name in TOKENIZER_FILES:
        (target / name).unlink(missing_ok=True)
    return target


def with_sentencepiece_tokenizer_only(source: str, target: Path) -> Path:
    """``source`` with its tokenizer replaced by a sentencepiece ``tokenizer.model`` (no tokenizer.json), as the
    published Llama-2-era checkpoints write it."""
    folder = without_tokenizer(source, target)
    corpus = target.parent / "corpus.txt"
    corpus.write_text("\n".join(["the image shows a red box on a white table", "what is it? why?"] * 40))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(target.parent / "sp"),
        vocab_size=60,
        model_type="bpe",
        user_defined_symbols=["<image>", "[INST]", "[/INST]"],
        minloglevel=2,
    )
    shutil.copy(target.parent / "sp.model", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(params=["pretrained", "llava"])
def load(request, hub_checkpoint, tiny_llava_path):
    """``(source folder, a loader of a folder's tokenizer)`` for a hub VLM and for a llava-hf checkpoint."""
    if request.param == "pretrained":
        return hub_checkpoint("llava_next_mistral"), lambda path: load_hub_vlm(str(path), HubOptions())[1].tokenizer
    return tiny_llava_path, lambda path: load_llava_tokenizer(str(path))


def test_a_folder_without_tokenizer_files_is_named_with_the_files_it_lacks(load, tmp_path):
    source, read = load
    folder = without_tokenizer(source, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=f"'{folder}' holds no tokenizer files: none of tokenizer.json, "):
        read(folder)


def test_a_sentencepiece_only_tokenizer_needs_the_sentencepiece_package(load, tmp_path, monkeypatch):
    source, read = load
    folder = with_sentencepiece_tokenizer_only(source, tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as where it is not installed
    with pytest.raises(FileNotFoundError, match="only as tokenizer.model.*sentencepiece package is not installed"):
        read(folder)


def test_a_sentencepiece_only_tokenizer_loads(hub_checkpoint, tmp_path):
    """sentencepiece is a dependency: such a folder loads."""
    folder = with_sentencepiece_tokenizer_only(hub_checkpoint("llava_next_mistral"), tmp_path / "ckpt")
    tokenizer = load_hub_vlm(str(folder), HubOptions())[1].tokenizer
    ids = tokenizer("the image shows a red box").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "the image shows a red box"
